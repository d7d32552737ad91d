"""The series among input files and folders: :func:`find_series` groups DICOM files by
SeriesInstanceUID from their headers, :func:`select_series` picks the one to process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from node.errors import SeriesError
from node.pipeline.series.header import read_header

log = logging.getLogger(__name__)


def _iter_files(inputs: Sequence[str | Path]) -> Iterable[Path]:
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for name in sorted(names):
                    yield Path(root) / name
        elif p.is_file():
            yield p
        else:
            log.warning("%s: no such file or folder, skipped", p)


def find_series(
    inputs: Sequence[str | Path], *, header_cache: dict[Path, Any] | None = None
) -> dict[str, list[Path]]:
    """Group DICOM image files by SeriesInstanceUID, reading headers only.

    Args:
        inputs: files and/or folders (walked recursively).
        header_cache: if given, filled with ``{path: parsed header}`` for every grouped
            file; pass it on to :func:`load_series` (``header_cache=``) so that it does not
            parse the files a second time.

    Returns:
        ``{SeriesInstanceUID: [files]}``; files whose SeriesInstanceUID is missing or
        empty are grouped under ``""`` (the caller decides what to do with them).
        Non-DICOM files and DICOMDIR files are skipped with a logged warning.
    """
    groups: dict[str, list[Path]] = {}
    for path in _iter_files(inputs):
        try:
            hdr = read_header(path)
        except Exception as exc:  # noqa: BLE001 - pydicom raises assorted errors on broken files
            log.warning("%s: not a readable DICOM file, skipped (%s)", path, exc)
            continue
        ds = hdr.ds
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
        if sop_class == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds:
            log.warning("%s: DICOMDIR, skipped", path)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        groups.setdefault(uid, []).append(path)
        if header_cache is not None:
            header_cache[path] = hdr
    return groups


def select_series(
    inputs: Sequence[str | Path], series_uid: str | None = None, header_cache: dict[Path, Any] | None = None
) -> list[Path]:
    """The files of the one series to process among ``inputs``.

    ``header_cache`` (optional) collects the headers parsed while grouping, for
    :func:`~node.pipeline.series.load.load_series` to reuse instead of parsing every file again.

    Raises :class:`SeriesError` when there is no DICOM file, when the wanted series is
    absent, or when several series are present and none was chosen.
    """
    groups = find_series(inputs, header_cache=header_cache)
    if not groups:
        raise SeriesError("no DICOM files found", path=", ".join(str(p) for p in inputs))
    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesError(f"series {series_uid} not found; present: {', '.join(sorted(groups))}")
        return groups[series_uid]
    if len(groups) > 1:
        listing = "; ".join(f"{uid or '<empty SeriesInstanceUID>'} ({len(f)} files)" for uid, f in sorted(groups.items()))
        raise SeriesError(f"the input holds {len(groups)} series, choose one with --series: {listing}")
    return next(iter(groups.values()))
