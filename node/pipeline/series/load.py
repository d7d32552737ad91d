"""The files of ONE series -> :class:`~node.pipeline.volume.Volume`: a HU volume on a regular
grid with its LPS affine and the original frames; every problem with the input is a
:class:`SeriesError` naming the file and, where there is one, the tag.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.errors import SeriesError
from node.pipeline.series.decode import decode_volume
from node.pipeline.series.frames import Frame, check_consistency, image_frames
from node.pipeline.series.geometry import GridKind, order_frames, regular_grid
from node.pipeline.series.header import Header, RawPixels, read_header
from node.pipeline.series.identity import check_identity, check_one_series, contrast_applied
from node.pipeline.series.validate import validate_headers
from node.pipeline.volume import SeriesInfo, SourceFrame, Volume

log = logging.getLogger(__name__)


def load_series(
    files: Sequence[Path],
    *,
    fill_missing_uids: bool = False,
    require_modality: str | None = "CT",
    decode_workers: int | None = None,
    keep_headers: bool = True,
    header_cache: dict[Path, Any] | None = None,
    grid: GridKind = "orthogonal",
) -> Volume:
    """Load the files of ONE DICOM series into a HU volume on a regular grid.

    Args:
        files: the series' files (single-frame instances, or Enhanced / Legacy
            Converted Enhanced CT multi-frame objects).
        fill_missing_uids: offline-only opt-in: fill empty SOPClassUID / SOPInstanceUID
            from the file meta header and give all files one new Study and one new
            Series Instance UID (recorded in ``Volume.warnings``).  Otherwise empty
            identifying UIDs raise :class:`SeriesError`.
        require_modality: the Modality the caller needs (``None``: any).
        decode_workers: processes for decoding compressed pixel data
            (default ``os.cpu_count()``; ``1`` decodes in process).
        keep_headers: keep the source headers (pixel data removed) in
            ``Volume.info.source_datasets``.
        header_cache: the dict a :func:`~node.pipeline.series.find.find_series` call filled:
            the headers of these files are taken from it (and removed from it) instead of
            being parsed again, unless a file changed since (inode, size or mtime).
        grid: ``"exact"`` (every original pixel a voxel: tilt as a sheared affine, uneven gaps
            on a finer step through every slice; what HU thresholds need) or ``"orthogonal"``
            (tilt and uneven gaps resampled as dcm2niix does; what AI models expect), see
            :mod:`node.pipeline.series.geometry`.

    Returns:
        The :class:`Volume`; ``array`` is int16 when all rescale slopes/intercepts are
        integral and the HU fit, float32 otherwise.

    Raises:
        SeriesError: for any input problem (naming the file and the tag).
    """
    warnings: list[str] = []
    if not files:
        raise SeriesError("no files given")
    headers, raw_of = _read_headers(files, header_cache if header_cache is not None else {})

    # modality first: an MR series is refused whatever else is wrong with it
    if require_modality is not None:
        for path, ds in headers:
            mod = str(ds.get("Modality", "") or "").strip()
            if mod != require_modality:
                raise SeriesError(
                    f"Modality is {mod or 'empty'}, the profile needs {require_modality}", path=path, tag="Modality"
                )

    validate_headers(headers)  # every value read later, before anything is allocated
    check_identity(headers, fill_missing_uids, warnings)
    check_one_series(headers)
    frames = image_frames(headers, raw_of, warnings)
    pixel_spacing = check_consistency(frames, headers)
    stack = order_frames(frames, warnings)
    vol = decode_volume(stack.frames, decode_workers)
    on_grid = regular_grid(vol, stack, pixel_spacing, warnings, grid)
    del vol
    info = _series_info(stack.frames, keep_headers)
    src = _source_frames(stack.frames, pixel_spacing)
    return Volume(array=on_grid.array, affine=on_grid.affine, info=info, frames=src, resampled=on_grid.resampled,
                  warnings=warnings, frame_slices=on_grid.frame_slices)


def _read_headers(
    files: Sequence[Path], cache: dict[Path, Any]
) -> tuple[list[tuple[Path, Dataset]], dict[int, RawPixels | None]]:
    """The files' headers (from ``cache`` where still fresh), DICOMDIRs skipped, and the raw
    pixel location of each header (by ``id``)."""
    headers: list[tuple[Path, Dataset]] = []
    raw_of: dict[int, RawPixels | None] = {}
    for f in files:
        path = Path(f)
        hdr = cache.pop(path, None)
        if not (isinstance(hdr, Header) and hdr.fresh(path)):
            try:
                hdr = read_header(path)
            except InvalidDicomError as exc:
                raise SeriesError(f"not a DICOM file ({exc})", path=path) from None
            except Exception as exc:  # noqa: BLE001 - pydicom raises assorted errors on broken files
                raise SeriesError(f"unreadable DICOM header ({type(exc).__name__}: {exc})", path=path) from None
        ds = hdr.ds
        if "DirectoryRecordSequence" in ds:
            log.warning("%s: DICOMDIR, skipped", path)
            continue
        headers.append((path, ds))
        raw_of[id(ds)] = hdr.raw
    if not headers:
        raise SeriesError("no DICOM image files given")
    return headers, raw_of


def _source_frames(frames: list[Frame], pixel_spacing: tuple[float, float]) -> list[SourceFrame]:
    """Provenance: the original frames, for mapping masks back onto them."""
    dr, dc = pixel_spacing
    src: list[SourceFrame] = []
    for fr in frames:
        src.append(
            SourceFrame(
                path=fr.path, frame_number=fr.frame_number, sop_instance_uid=str(fr.header.SOPInstanceUID),
                position=fr.ipp.copy(), orientation=fr.iop.copy(), pixel_spacing=(float(dr), float(dc)),
                rows=fr.rows, columns=fr.cols,
            )
        )
    return src


def _series_info(frames: list[Frame], keep_headers: bool) -> SeriesInfo:
    """Provenance: the series' identity and description from its first frame's header."""
    datasets: list[Any] = []
    if keep_headers:
        seen: set[int] = set()
        for fr in frames:
            if id(fr.header) not in seen:
                seen.add(id(fr.header))
                datasets.append(fr.header)
    hdr = frames[0].header
    try:
        series_number = int(hdr.get("SeriesNumber")) if str(hdr.get("SeriesNumber", "") or "").strip() else None
    except (TypeError, ValueError):
        series_number = None
    return SeriesInfo(
        series_instance_uid=str(hdr.SeriesInstanceUID),
        study_instance_uid=str(hdr.StudyInstanceUID),
        frame_of_reference_uid=str(hdr.get("FrameOfReferenceUID", "") or "") or None,
        modality=str(hdr.get("Modality", "") or ""),
        series_description=str(hdr.get("SeriesDescription", "") or ""),
        series_number=series_number,
        contrast_applied=contrast_applied(hdr),
        source_datasets=datasets,
    )
