"""The share drop: a finished job's files in a folder on a file share.

The folder comes from ``share.path_template`` (every field sanitised, the folder kept inside
the root); files are copied atomically and ``manifest.json`` is written last.  How re-runs and
newer generations land there: docs/architecture.md (Generations).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import re
import string
import unicodedata
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from node import __version__
from node.durable import atomic_copy, atomic_write, fsync_dir, makedirs_durable
from node.config import ConfigError
from node.dicom_values import RULE_TAGS

__all__ = [
    "DEFAULT_TEMPLATE",
    "TEMPLATE_FIELDS",
    "PLACEHOLDER",
    "MANIFEST_NAME",
    "SUPERSEDED_NAME",
    "MAX_FIELD_LEN",
    "Superseded",
    "ShareFile",
    "ShareDrop",
    "sanitize_component",
    "validate_template",
    "render_folder",
    "drop",
    "software_versions",
    "sha256_file",
]

DEFAULT_TEMPLATE = "{PatientID}/{StudyDate}_{AccessionNumber}/{SeriesNumber}_{SeriesDescription}_{organ}/"
#: fields a template may use
TEMPLATE_FIELDS: frozenset[str] = frozenset(RULE_TAGS) | {
    "organ",
    "profile",
    "rule",
    "backend",
    "job_id",
    "generation",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "calling_ae",
}
#: what an empty (or entirely unsafe) field becomes
PLACEHOLDER = "_unknown_"
MANIFEST_NAME = "manifest.json"
SUPERSEDED_NAME = "SUPERSEDED.json"
#: characters kept per field (a path component is at most 255 bytes on most file systems)
MAX_FIELD_LEN = 64
_MAX_COMPONENT_BYTES = 200

# separators, the characters SMB/NTFS refuse, and whitespace -> "_"
_UNSAFE = re.compile(r'[/\\<>:"|?*\s]')
_WINDOWS_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])(\..*)?$", re.IGNORECASE)
_TEMPLATE_KEY = "share.path_template"


class Superseded(Exception):
    """The folder already holds a newer generation of this series' result; nothing was written."""

    def __init__(self, message: str, folder: Path, newer: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.folder = folder
        self.newer = dict(newer)


@dataclass(frozen=True)
class ShareFile:
    """One output file to publish: ``source`` is copied to ``<folder>/<name>``."""

    source: Path
    name: str
    kind: str  #: seg | stl | ply | report | qc | other


@dataclass
class ShareDrop:
    """What :func:`drop` wrote."""

    folder: Path
    relative: str  #: folder relative to the share root (POSIX separators)
    manifest: dict[str, Any]
    removed: list[str] = field(default_factory=list)  #: stale files of the previous run deleted
    marked_superseded: list[str] = field(default_factory=list)  #: older folders given a SUPERSEDED marker


# ---------------------------------------------------------------------------
# sanitising and templates


def _value_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return "-".join(_value_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def sanitize_component(value: Any, *, max_len: int = MAX_FIELD_LEN, placeholder: str = PLACEHOLDER) -> str:
    """Make one field value safe as (part of) a single folder name.

    * NFC-normalised; control and format characters (C0, DEL, C1, Unicode
      Cc/Cf/Zl/Zp), path separators, ``< > : " | ? *`` and whitespace become ``_``;
    * runs of dots collapse to one (``..`` can never appear), leading dots,
      leading/trailing ``_`` ``-`` and trailing dots are stripped, runs of ``_`` collapse;
    * at most ``max_len`` characters (and 200 UTF-8 bytes);
    * Windows device names (``CON``, ``NUL``, ``COM1`` ...) get a ``_`` prefix;
    * nothing left -> ``placeholder`` (``_unknown_``).
    """
    text = unicodedata.normalize("NFC", _value_text(value))
    text = "".join("_" if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn") else ch for ch in text)
    text = _UNSAFE.sub("_", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = re.sub(r"_{2,}", "_", text)
    text = text.lstrip("._-").rstrip("._- ")
    if len(text) > max_len:
        text = text[:max_len].rstrip("._- ")
    while len(text.encode("utf-8")) > _MAX_COMPONENT_BYTES:
        text = text[:-1]
    if _WINDOWS_RESERVED.match(text):
        text = "_" + text
    return text or placeholder


def _parse(template: str) -> list[list[tuple[str, str | None, str]]]:
    """Split ``template`` into folder components of (literal, field, format_spec) parts.

    Raises :class:`ConfigError` naming ``share.path_template``.
    """
    if not isinstance(template, str) or not template.strip():
        raise ConfigError("must be a non-empty path template", tag=_TEMPLATE_KEY)
    if template.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", template):
        raise ConfigError(f"must be a relative path (got {template!r})", tag=_TEMPLATE_KEY)
    comps: list[list[tuple[str, str | None, str]]] = []
    for comp in re.split(r"[/\\]", template):
        if not comp:
            continue
        try:
            parts = list(string.Formatter().parse(comp))
        except ValueError as exc:
            raise ConfigError(f"malformed template {template!r}: {exc}", tag=_TEMPLATE_KEY) from None
        out: list[tuple[str, str | None, str]] = []
        for literal, name, spec, conv in parts:
            if literal and (literal in (".", "..") or any(ord(c) < 0x20 for c in literal)):
                raise ConfigError(f"literal folder names '.'/'..' or control characters not allowed (got {template!r})", tag=_TEMPLATE_KEY)
            if name is None:
                out.append((literal, None, ""))
                continue
            spec = spec or ""  # Formatter.parse gives None only where there is no field
            if name == "" or not name.isidentifier():
                raise ConfigError(
                    f"field {{{name}}} is not a plain field name; known fields: {', '.join(sorted(TEMPLATE_FIELDS))}",
                    tag=_TEMPLATE_KEY,
                )
            if name not in TEMPLATE_FIELDS:
                raise ConfigError(
                    f"unknown field {{{name}}} in {template!r}; known fields: {', '.join(sorted(TEMPLATE_FIELDS))}",
                    tag=_TEMPLATE_KEY,
                )
            if conv:
                raise ConfigError(f"conversions (!{conv}) are not supported in {{{name}}}", tag=_TEMPLATE_KEY)
            if spec and "{" in spec:
                raise ConfigError(f"nested fields are not supported in {{{name}:{spec}}}", tag=_TEMPLATE_KEY)
            try:
                format("x", spec)
            except ValueError as exc:
                raise ConfigError(f"bad format spec in {{{name}:{spec}}}: {exc} (values are strings)", tag=_TEMPLATE_KEY) from None
            out.append((literal, name, spec))
        if "".join(lit for lit, _, _ in out).strip() in (".", "..") and not any(n for _, n, _ in out):
            raise ConfigError(f"'.'/'..' folder in {template!r}", tag=_TEMPLATE_KEY)
        comps.append(out)
    if not comps:
        raise ConfigError("must be a non-empty path template", tag=_TEMPLATE_KEY)
    return comps


def validate_template(template: str) -> list[str]:
    """Check a template; returns the field names it uses.  Raises :class:`ConfigError`."""
    return [name for comp in _parse(template) for _, name, _ in comp if name]


def render_folder(template: str, fields: Mapping[str, Any]) -> str:
    """The relative folder (POSIX separators, no trailing slash) for ``fields``.

    Every field is sanitised; a whole component is re-checked so that no
    combination of literal text and values yields ``.``/``..``/an empty name.
    """
    out = []
    for comp in _parse(template):
        text = ""
        for literal, name, spec in comp:
            text += literal
            if name is not None:
                value = sanitize_component(fields.get(name))
                if spec:
                    value = sanitize_component(format(value, spec))
                text += value
        # literal parts are trusted config, but the joint name must still be a plain, visible name
        text = text.lstrip(".")
        while len(text.encode("utf-8")) > 255:
            text = text[:-1]
        out.append(text or PLACEHOLDER)
    return "/".join(out)


# ---------------------------------------------------------------------------
# file helpers


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_VERSIONS: dict[str, str] | None = None


def software_versions() -> dict[str, str]:
    """Versions of the node and the libraries that shape its outputs (cached)."""
    global _VERSIONS
    if _VERSIONS is None:
        v = {"dicom-node": __version__, "python": platform.python_version()}
        for dist in ("pydicom", "highdicom", "vtk", "numpy", "pynetdicom", "SimpleITK", "trimesh", "pylibjpeg-openjpeg"):
            try:
                v[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                v[dist] = "not installed"
        _VERSIONS = v
    return dict(_VERSIONS)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# the drop


def _same_result(manifest: Mapping[str, Any], series_uid: str, organ: str) -> bool:
    inp = manifest.get("input") or {}
    job = manifest.get("job") or {}
    return inp.get("series_instance_uid") == series_uid and job.get("profile") == organ


def _choose_folder(root: Path, relative: str, series_uid: str, organ: str) -> tuple[Path, str]:
    """The folder for this (series, organ): ``relative``, or a deterministic ``~hash`` variant if taken."""
    folder = root / relative
    existing = _read_json(folder / MANIFEST_NAME)
    if existing is None or _same_result(existing, series_uid, organ):
        return folder, relative
    suffix = "~" + hashlib.sha256(f"{series_uid}\0{organ}".encode()).hexdigest()[:8]
    relative = relative + suffix
    return root / relative, relative


def _inside(root: Path, folder: Path) -> bool:
    try:
        folder.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def drop(
    root: str | Path,
    template: str,
    fields: Mapping[str, Any],
    files: Sequence[ShareFile],
    *,
    job: Mapping[str, Any],
    inputs: Mapping[str, Any],
    seg_series_uid: str | None = None,
    supersedes: Iterable[Mapping[str, Any]] = (),
) -> ShareDrop:
    """Publish ``files`` into the template folder under ``root`` with a ``manifest.json``.

    The folder holds ``<organ>_seg.dcm``, ``<organ>_<tissue>.stl``, ``<organ>_<tissue>_colored.ply``,
    ``report.json`` and ``manifest.json``, written last: its presence means the folder is complete.
    Each file goes to a temporary name inside the folder, is fsynced and renamed over its name.
    A re-run for the same series and organ writes the same folder again: files named by the
    previous manifest that it no longer produces are removed, nothing else is touched.  A folder
    already taken by another series (fields that sanitise to the same names, e.g. all empty) gets
    the suffix ``~<8 hex of a hash of series UID and organ>``, so re-runs land there again.

    Args:
        root: share root (created if missing).
        template: ``share.path_template``: fields of :data:`TEMPLATE_FIELDS` (the rule tags
            plus ``organ`` = the profile, ``profile``, ``rule``, ``backend``, ``job_id``,
            ``generation``, the study/series UIDs, ``calling_ae``), each with an optional
            string format spec (``{SeriesNumber:>04}``, ``{SeriesDescription:.20}``).
        fields: template field values (raw; sanitised here, see :func:`sanitize_component`).
        files: what to copy (each file's ``name`` must be a plain file name).
        job: ``id``, ``series_uid``, ``rule``, ``profile``, ``backend``,
            ``rules_version``, ``generation`` (+ anything else, kept in the manifest).
        inputs: ``study_instance_uid``, ``series_instance_uid``,
            ``instance_count``, ``source_ae`` ... (kept in the manifest).
        seg_series_uid: the SEG's SeriesInstanceUID.
        supersedes: older results of the same series this one replaces, each
            ``{job_id, generation, seg_series_instance_uid, folder}`` (folder
            relative to root, or None); a different existing folder gets a
            ``SUPERSEDED.json`` marker.

    Raises:
        ConfigError: bad template.
        Superseded: the folder holds a newer generation of this series/organ.
        OSError: the share cannot be written (transient for the dispatcher).
    """
    root = Path(root)
    relative = render_folder(template, fields)
    series_uid = str(inputs.get("series_instance_uid") or job.get("series_uid") or "")
    organ = str(job.get("profile") or fields.get("organ") or "")
    generation = int(job.get("generation") or 0)
    makedirs_durable(root)
    folder, relative = _choose_folder(root, relative, series_uid, organ)
    if not _inside(root, folder):  # cannot happen after sanitising; defence in depth
        raise ConfigError(f"rendered folder {relative!r} escapes the share root", tag=_TEMPLATE_KEY)

    previous = _read_json(folder / MANIFEST_NAME)
    if previous is not None and _same_result(previous, series_uid, organ):
        prev_gen = int((previous.get("job") or {}).get("generation") or 0)
        prev_id = (previous.get("job") or {}).get("id")
        if prev_gen > generation:
            raise Superseded(
                f"{relative}: holds generation {prev_gen} (job {prev_id}) of this series; generation {generation}"
                f" (job {job.get('id')}) not written",
                folder,
                previous.get("job") or {},
            )

    names = [f.name for f in files]
    for n in names:
        if n != sanitize_component(n, max_len=_MAX_COMPONENT_BYTES) or n in (MANIFEST_NAME, SUPERSEDED_NAME):
            raise ValueError(f"share output file name {n!r} is not a plain, safe name")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate share output names: {names}")

    makedirs_durable(folder)
    outputs = []
    for f in files:
        size, digest = atomic_copy(Path(f.source), folder / f.name)
        outputs.append({"name": f.name, "kind": f.kind, "size": size, "sha256": digest})
    fsync_dir(folder)

    supersede_list = []
    marked: list[str] = []
    for old in supersedes:
        entry = {
            "job_id": old.get("job_id"),
            "generation": old.get("generation"),
            "seg_series_instance_uid": old.get("seg_series_instance_uid"),
            "folder": old.get("folder"),
        }
        supersede_list.append(entry)
        old_rel = old.get("folder")
        if old_rel and old_rel != relative:
            old_folder = root / str(old_rel)
            old_manifest = _read_json(old_folder / MANIFEST_NAME)
            if (
                _inside(root, old_folder)
                and old_manifest is not None
                and (old_manifest.get("job") or {}).get("id") == old.get("job_id")
            ):
                marker = {
                    "superseded_by": {"job_id": job.get("id"), "generation": generation, "folder": relative,
                                      "seg_series_instance_uid": seg_series_uid},
                    "marked_at": _now_iso(),
                }
                atomic_write(old_folder / SUPERSEDED_NAME, (json.dumps(marker, indent=2) + "\n").encode())
                fsync_dir(old_folder)
                marked.append(str(old_rel))

    manifest: dict[str, Any] = {
        "manifest_version": 1,
        "created": _now_iso(),
        "folder": relative,
        "job": dict(job),
        "input": dict(inputs),
        "seg_series_instance_uid": seg_series_uid,
        "outputs": outputs,
        "software": software_versions(),
        "supersedes": supersede_list,
    }
    atomic_write(folder / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n").encode())
    # a re-run of a newer generation into this folder: an old SUPERSEDED marker no longer applies
    stale_marker = folder / SUPERSEDED_NAME
    if stale_marker.exists():
        newer = (_read_json(stale_marker) or {}).get("superseded_by") or {}
        if generation >= int(newer.get("generation") or 0):
            stale_marker.unlink(missing_ok=True)

    removed = []
    if previous is not None and _same_result(previous, series_uid, organ):
        for o in previous.get("outputs") or []:
            name = o.get("name") if isinstance(o, dict) else None
            if (
                isinstance(name, str)
                and name not in names
                and name == sanitize_component(name, max_len=_MAX_COMPONENT_BYTES)
                and name not in (MANIFEST_NAME, SUPERSEDED_NAME)
            ):
                try:
                    (folder / name).unlink()
                    removed.append(name)
                except FileNotFoundError:
                    pass
    # leftovers of a crash in the middle of an earlier drop
    for p in folder.glob(".*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass
    fsync_dir(folder)
    return ShareDrop(folder, relative, manifest, removed, marked)
