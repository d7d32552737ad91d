"""The qc step: pictures for a person to check a result at a glance, written beside it.

Inputs: the volume the masks were made on, the tissue masks, the profile (names and colours:
the SEG's recommended display colours are the same RGB values), the STL file of each tissue.
Outputs: ``<out>/qc/qc_<tissue>_<plane>.png`` -- the segments drawn over the CT (translucent fill,
solid edge, every tissue on every picture) on the axial, coronal and sagittal slice through each
tissue's largest extent, square pixels from the voxel spacing, a legend and a caption below the
image -- and ``qc_<tissue>_mesh.png``, each mesh shaded from the front and from the patient's
left.  Only 2-D slices of the volume are read (views, no copy of the volume) and meshes are
clustered to at most :data:`MAX_TRIANGLES` for drawing, so the cost does not grow with a
500-slice series.  OpenCV only: no display, no OpenGL.  The caller makes a failure here a
warning: QC pictures never fail a job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from node.durable import atomic_write, makedirs_durable
from node.pipeline.mesh.files import read_stl
from node.profiles import Profile

log = logging.getLogger(__name__)

QC_DIR = "qc"
PLANES = ("axial", "coronal", "sagittal")
MAX_SIDE = 512  #: pixels of the longer side of a slice picture's image
MESH_VIEW = 384  #: pixels of each mesh view (square)
MAX_TRIANGLES = 100_000  #: triangles drawn per mesh view (more: vertex clustering); ~0.4 s per 100k
FILL_ALPHA = 0.35  #: opacity of a tissue's fill over the CT
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class QCPicture:
    """One picture written (``report.json``: ``qc.pictures``)."""

    name: str  #: file name inside ``qc/``
    kind: str  #: slice | mesh
    tissue: str  #: the tissue whose largest extent chose the slice, or whose mesh it shows
    width: int
    height: int
    #: the image inside the picture (x, y, width, height); the legend and caption lie outside it
    panel: tuple[int, int, int, int]
    plane: str | None = None  #: axial | coronal | sagittal
    #: index of the slice along the plane's normal in the LPS-ordered view of the volume
    #: (axial: towards S, coronal: towards P, sagittal: towards L)
    slice_index: int | None = None
    position_mm: float | None = None  #: the slice's LPS coordinate along that axis
    pixel_mm: tuple[float, float] | None = None  #: (row, column) spacing of the slice, mm
    triangles: int | None = None  #: of the mesh
    triangles_drawn: int | None = None  #: after clustering for the picture

    def report(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": f"{QC_DIR}/{self.name}", "kind": self.kind, "tissue": self.tissue,
                             "width": self.width, "height": self.height, "panel": list(self.panel)}
        if self.kind == "slice":
            d.update(plane=self.plane, slice_index=self.slice_index, position_mm=self.position_mm,
                     pixel_mm=list(self.pixel_mm or ()))
        else:
            d.update(triangles=self.triangles, triangles_drawn=self.triangles_drawn)
        return d


@dataclass(frozen=True)
class QCResult:
    """What :func:`write_qc` wrote."""

    folder: Path
    pictures: tuple[QCPicture, ...]
    warnings: tuple[str, ...]
    seconds: float

    @property
    def paths(self) -> list[Path]:
        return [self.folder / p.name for p in self.pictures]

    def report(self) -> dict[str, Any]:
        """``report.json``: ``qc``."""
        return {"pictures": [p.report() for p in self.pictures], "warnings": list(self.warnings),
                "seconds": round(self.seconds, 3)}


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _LPSView:
    """A volume-shaped array seen as ``[S, P, L]`` (index growing towards superior, posterior,
    patient left) by transposes and flips only: a view, never a copy."""

    perm: tuple[int, int, int]  #: target axis -> array axis
    flip: tuple[bool, bool, bool]  #: per target axis
    spacing: tuple[float, float, float]  #: mm per target axis (S, P, L)
    affine: np.ndarray  #: of the source array (i, j, k) -> LPS

    @classmethod
    def of(cls, affine: np.ndarray) -> _LPSView:
        from nibabel.orientations import io_orientation

        ornt = io_orientation(_LPS_TO_RAS @ np.asarray(affine, float))  # per input axis i, j, k: (RAS axis, dir)
        perm: list[int] = [0, 0, 0]
        flip: list[bool] = [False, False, False]
        spacing: list[float] = [0.0, 0.0, 0.0]
        for n in range(3):  # n: input axis i, j, k = array axis 2 - n
            ras_axis, direction = int(ornt[n, 0]), float(ornt[n, 1])
            t = 2 - ras_axis  # target axes: 0 = S (RAS 2), 1 = P (RAS 1), 2 = L (RAS 0)
            perm[t] = 2 - n
            # index must grow towards L and P (RAS -) and towards S (RAS +)
            flip[t] = direction > 0 if ras_axis < 2 else direction < 0
            spacing[t] = float(np.linalg.norm(np.asarray(affine, float)[:3, n]))
        return cls((perm[0], perm[1], perm[2]), (flip[0], flip[1], flip[2]),
                   (spacing[0], spacing[1], spacing[2]), np.asarray(affine, float))

    def view(self, array: np.ndarray) -> np.ndarray:
        v = np.transpose(array, self.perm)
        return v[tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)]

    def position_mm(self, shape_kji: Sequence[int], axis: int, index: int) -> float:
        """LPS coordinate (along the axis' own direction) of slice ``index`` of target ``axis``."""
        a = self.perm[axis]
        n = int(shape_kji[a])
        orig = n - 1 - index if self.flip[axis] else index
        centre = [(int(s) - 1) / 2.0 for s in shape_kji]  # k, j, i
        centre[a] = orig
        k, j, i = centre
        world = self.affine @ np.array([i, j, k, 1.0])
        return round(float(world[2 - axis]), 2)  # axis 0 -> S (z), 1 -> P (y), 2 -> L (x)


def _slice(view: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2-D image of ``plane`` in radiological display: axial with anterior up and the
    patient's right on the left; coronal and sagittal with superior up (sagittal: anterior left)."""
    if plane == "axial":
        return np.asarray(view[index])
    if plane == "coronal":
        return np.asarray(view[:, index, :])[::-1]
    return np.asarray(view[:, :, index])[::-1]


def _pixel_mm(spacing: tuple[float, float, float], plane: str) -> tuple[float, float]:
    s, p, l = spacing  # noqa: E741 - the patient axes' initials
    return {"axial": (p, l), "coronal": (s, l), "sagittal": (s, p)}[plane]


_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}


def extent_counts(mask_view: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask voxels per slice along each of the three axes, counted on a copy at every second voxel
    (an eighth of the work; bounded on any series).  Each count is of slices ``0, 2, 4, ...``."""
    sub = np.ascontiguousarray(mask_view[::2, ::2, ::2])
    if not sub.any():  # thinner than two voxels: count every voxel
        sub = np.ascontiguousarray(mask_view)
    s, p, l = (sub.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64) for axis in range(3))  # noqa: E741 - the axes' initials
    return s, p, l


def largest_extent(mask_view: np.ndarray, axis: int, counts: np.ndarray | None = None) -> int:
    """Index along ``axis`` of the slice with the most mask voxels: the best of the sampled slices
    (``counts`` from :func:`extent_counts`), then it and its neighbour counted in full."""
    if counts is None:
        counts = extent_counts(mask_view)[axis]
    n = mask_view.shape[axis]
    step = 2 if len(counts) < n else 1
    best = int(np.argmax(counts)) * step
    candidates = [c for c in range(best - 1, best + 2) if 0 <= c < n]

    def full(c: int) -> int:
        sl: list[Any] = [slice(None)] * 3
        sl[axis] = c
        return int(np.count_nonzero(mask_view[tuple(sl)]))

    return max(candidates, key=lambda c: (full(c), -abs(c - best)))


def display_size(rows: int, cols: int, pixel_mm: tuple[float, float], max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) in pixels of a slice shown with square pixels, the longer side ``max_side``."""
    h_mm, w_mm = rows * pixel_mm[0], cols * pixel_mm[1]
    scale = max_side / max(h_mm, w_mm)
    return max(1, round(w_mm * scale)), max(1, round(h_mm * scale))


# --------------------------------------------------------------------------- drawing


def window_for(profile: Profile, phase: str) -> tuple[float, float]:
    """(centre, width) HU that shows the profile's tissues and their surroundings: the span of their
    HU ranges, widened (soft tissue for the liver, a lung window for the lungs, bone for bones)."""
    lows, highs = [], []
    for t in profile.result_tissues:
        r = t.hu_range(phase) if t.hu is not None else None
        if r is not None:
            lows.append(max(-1000.0, float(r[0])))
            highs.append(min(1500.0, float(r[1])))
    if not lows:
        return 40.0, 400.0
    lo, hi = min(lows), max(highs)
    return (lo + hi) / 2.0, max(400.0, 1.5 * (hi - lo))


def _gray(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    c, w = window
    g = (hu.astype(np.float32) - (c - w / 2.0)) * (255.0 / w)
    return np.clip(g, 0, 255).astype(np.uint8)


def _bgr(rgb: Sequence[int]) -> tuple[int, int, int]:
    return int(rgb[2]), int(rgb[1]), int(rgb[0])


def _text_strip(lines: Sequence[tuple[str, tuple[int, int, int] | None]], width: int) -> np.ndarray:
    """Dark strip of text lines, each with an optional colour swatch (RGB) before it."""
    lh, sw, pad = 20, 12, 6
    strip = np.full((len(lines) * lh + pad, width, 3), 24, np.uint8)
    for n, (text, rgb) in enumerate(lines):
        y = pad + n * lh
        x = pad
        if rgb is not None:
            cv2.rectangle(strip, (x, y + 3), (x + sw, y + 3 + sw), _bgr(rgb), -1)
            x += sw + 6
        cv2.putText(strip, text, (x, y + 14), _FONT, 0.45, (235, 235, 235), 1, cv2.LINE_AA)
    return strip


def _legend_width(names: Sequence[str], minimum: int) -> int:
    widest = max((cv2.getTextSize(n, _FONT, 0.45, 1)[0][0] for n in names), default=0)
    return max(minimum, widest + 36)


def _stack(panel: np.ndarray, strip: np.ndarray) -> np.ndarray:
    width = max(panel.shape[1], strip.shape[1])
    canvas = np.zeros((panel.shape[0] + strip.shape[0], width, 3), np.uint8)
    canvas[: panel.shape[0], : panel.shape[1]] = panel
    canvas[panel.shape[0]:, : strip.shape[1]] = strip
    if strip.shape[1] < width:
        canvas[panel.shape[0]:, strip.shape[1]:] = strip[:, -1:]
    return canvas


def render_slice(hu: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[Sequence[int]],
                 pixel_mm: tuple[float, float], window: tuple[float, float],
                 max_side: int = MAX_SIDE) -> np.ndarray:
    """The slice (BGR, square pixels) with each mask as a translucent fill in its colour and a
    solid edge (the mask's own boundary pixels, so every coloured pixel lies inside a mask)."""
    width, height = display_size(hu.shape[0], hu.shape[1], pixel_mm, max_side)
    shrink = width < hu.shape[1] or height < hu.shape[0]
    g = cv2.resize(_gray(hu, window), (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    img = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR).astype(np.float32)
    edges = []
    for mask, rgb in zip(masks, colors):
        m = cv2.resize(np.ascontiguousarray(mask, dtype=np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        if not m.any():
            continue
        sel = m.astype(bool)
        img[sel] = (1 - FILL_ALPHA) * img[sel] + FILL_ALPHA * np.array(_bgr(rgb), np.float32)
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        edges.append((contours, _bgr(rgb)))
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    for contours, bgr in edges:
        cv2.drawContours(out, contours, -1, bgr, 1, cv2.LINE_8)
    return out


def _normals(tris: np.ndarray) -> np.ndarray:
    """Unit face normals of a triangle soup ``(m, 3, 3)``."""
    n = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]).astype(np.float64)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _cluster(tris: np.ndarray, max_triangles: int) -> tuple[np.ndarray, np.ndarray]:
    """``(triangles, normals)`` to draw: the soup itself with its face normals, or, above
    ``max_triangles``, the soup reduced by vertex clustering (corners on a grid merged into the
    mean of their positions, collapsed triangles dropped, duplicates merged), each triangle with
    the mean of its corners' area-weighted normals, so the reduced surface still shades smoothly."""
    if len(tris) <= max_triangles:
        return tris, _normals(tris)
    pts = tris.reshape(-1, 3).astype(np.float64)
    lo = pts.min(axis=0)
    extent = float(np.ptp(pts, axis=0).max()) or 1.0
    # triangles after clustering grow with the square of the grid: start near the target
    cells = int(np.clip(1024 * np.sqrt(max_triangles / len(tris)), 32, 1024))
    while True:
        keys = np.floor((pts - lo) / (extent / cells)).astype(np.int64)
        flat = (keys[:, 0] * (cells + 1) + keys[:, 1]) * (cells + 1) + keys[:, 2]
        _, inverse = np.unique(flat, return_inverse=True)
        vid = inverse.reshape(-1, 3)
        ok = (vid[:, 0] != vid[:, 1]) & (vid[:, 1] != vid[:, 2]) & (vid[:, 0] != vid[:, 2])
        srt = np.sort(vid[ok], axis=1).astype(np.int64)
        nv = int(inverse.max()) + 1  # < 2**21 corners per axis pack: 3 x 21 bits
        _, first = np.unique((srt[:, 0] << 42) | (srt[:, 1] << 21) | srt[:, 2], return_index=True) \
            if nv < 2**21 else np.unique(srt, axis=0, return_index=True)
        if len(first) <= max_triangles or cells <= 32:
            break
        # triangles left grow about with the square of the grid: aim just below the target
        cells = max(32, min(cells - 1, int(cells * 0.95 * np.sqrt(max_triangles / len(first)))))
    nv = int(inverse.max()) + 1
    count = np.bincount(inverse, minlength=nv).astype(np.float64)[:, None]
    vpos = np.stack([np.bincount(inverse, weights=pts[:, a], minlength=nv) for a in range(3)], axis=1) / count
    area_n = np.repeat(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]).astype(np.float64), 3, axis=0)
    vnorm: np.ndarray = np.stack([np.bincount(inverse, weights=area_n[:, a], minlength=nv) for a in range(3)], axis=1)
    vnorm = vnorm / np.maximum(np.linalg.norm(vnorm, axis=1, keepdims=True), 1e-12)
    faces = vid[ok][np.sort(first)]
    fn = vnorm[faces].mean(axis=1)
    return vpos[faces], fn / np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)


def render_mesh(tris: np.ndarray, rgb: Sequence[int], size: int = MESH_VIEW,
                max_triangles: int | None = None) -> tuple[np.ndarray, int]:
    """Two shaded views (BGR, side by side) of a triangle soup in LPS mm: from the front (the
    patient's right on the left) and from the patient's left (anterior on the left), painted far to
    near at twice the size and shrunk (smooth edges).  Returns (picture, triangles drawn)."""
    drawn, n = _cluster(tris, MAX_TRIANGLES if max_triangles is None else max_triangles)
    ss = 2 * size
    pts = drawn.reshape(-1, 3)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    views = []
    # (screen x axis, direction towards the viewer): the front (-P), the patient's left (+L)
    for sx, toward_viewer in ((0, np.array([0.0, -1.0, 0.0])), (1, np.array([1.0, 0.0, 0.0]))):
        extent = max(float(hi[sx] - lo[sx]), float(hi[2] - lo[2]), 1e-6)
        scale = 0.9 * ss / extent
        cx, cz = (lo[sx] + hi[sx]) / 2.0, (lo[2] + hi[2]) / 2.0
        xy = np.empty(drawn.shape[:2] + (2,), np.float64)
        xy[..., 0] = ss / 2.0 + (drawn[..., sx] - cx) * scale
        xy[..., 1] = ss / 2.0 - (drawn[..., 2] - cz) * scale  # superior up
        depth = (drawn @ toward_viewer).mean(axis=1)  # larger: nearer the viewer
        shade = 0.25 + 0.75 * np.abs(n @ toward_viewer)
        colors = np.clip(np.outer(shade, np.array(_bgr(rgb), np.float64)), 0, 255).astype(np.uint8)
        canvas = np.full((ss, ss, 3), 16, np.uint8)
        poly = np.rint(xy * 16).astype(np.int32)  # 4 bits of sub-pixel precision
        for t in np.argsort(depth, kind="stable"):  # far first
            c = colors[t]
            cv2.fillConvexPoly(canvas, poly[t], (int(c[0]), int(c[1]), int(c[2])), cv2.LINE_8, 4)
        views.append(cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA))
    return np.hstack(views), len(drawn)


# --------------------------------------------------------------------------- the step


def _write_png(path: Path, bgr: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])  # 3: a third of 9's time
    if not ok:
        raise OSError(f"cannot encode {path.name}")
    atomic_write(path, buf.tobytes())


def write_qc(
    array: np.ndarray,
    affine: np.ndarray,
    masks: Mapping[str, np.ndarray],
    profile: Profile,
    out: Path,
    *,
    phase: str,
    stl_paths: Mapping[str, Path] | None = None,
    planes: Sequence[str] = PLANES,
    max_side: int = MAX_SIDE,
) -> QCResult:
    """Write the QC pictures of a run into ``<out>/qc/`` (see the module docstring).

    ``array`` / ``affine``: the volume the ``masks`` are on (``[k, j, i]``, voxel -> LPS mm).
    A picture that cannot be made is a warning in the result, never an exception for the others.
    """
    t0 = time.perf_counter()
    folder = Path(out) / QC_DIR
    makedirs_durable(folder)
    geo = _LPSView.of(affine)
    hu_view = geo.view(array)
    tissues = [t for t in profile.result_tissues if t.name in masks]
    mask_views = {t.name: geo.view(masks[t.name]) for t in tissues}
    colors = [t.color for t in tissues]
    window = window_for(profile, phase)
    names = [f"{profile.name} {t.name}" for t in tissues]
    pictures: list[QCPicture] = []
    warnings: list[str] = []
    for t in tissues:
        mv = mask_views[t.name]
        counts = extent_counts(mv)
        if not counts[0].any():
            warnings.append(f"{t.name}: empty, no slice pictures")
            continue
        for plane in planes:
            try:
                axis = _AXIS[plane]
                idx = largest_extent(mv, axis, counts[axis])
                hu = _slice(hu_view, plane, idx)
                pmm = _pixel_mm(geo.spacing, plane)
                panel = render_slice(hu, [_slice(mask_views[o.name], plane, idx) for o in tissues], colors, pmm,
                                     window, max_side)
                pos = geo.position_mm(array.shape, axis, idx)
                letter = "SPL"[axis]
                caption = {
                    "axial": "axial: anterior up, patient right on the left",
                    "coronal": "coronal: superior up, patient right on the left",
                    "sagittal": "sagittal: superior up, anterior on the left",
                }[plane]
                lines: list[tuple[str, tuple[int, int, int] | None]] = [
                    (f"{caption}; {letter} = {pos:+.1f} mm (slice {idx + 1}/{mv.shape[axis]})", None),
                    (f"through the largest extent of {t.name}; window {window[0]:.0f}/{window[1]:.0f} HU", None),
                ]
                lines += [(f"{nm}{'  <' if o.name == t.name else ''}", o.color) for nm, o in zip(names, tissues)]
                strip = _text_strip(lines, _legend_width([x for x, _ in lines], panel.shape[1]))
                picture = _stack(panel, strip)
                name = f"qc_{t.name}_{plane}.png"
                _write_png(folder / name, picture)
                pictures.append(QCPicture(name, "slice", t.name, picture.shape[1], picture.shape[0],
                                          (0, 0, panel.shape[1], panel.shape[0]), plane, idx, pos,
                                          (round(pmm[0], 4), round(pmm[1], 4))))
            except Exception as exc:  # one picture failing leaves the others
                warnings.append(f"{t.name} {plane}: {type(exc).__name__}: {exc}")
                log.warning("QC picture %s %s failed: %s", t.name, plane, exc, exc_info=True)
    for t in tissues:
        stl = (stl_paths or {}).get(t.name)
        if stl is None or not Path(stl).is_file():
            continue
        try:
            tris, _ = read_stl(stl)
            if len(tris) == 0:
                continue
            views, drawn = render_mesh(tris, t.color)
            strip = _text_strip([
                (f"{profile.name} {t.name}: {len(tris)} triangles"
                 + (f" ({drawn} drawn)" if drawn != len(tris) else ""), t.color),
                ("left: from the front (patient right on the left); right: from the patient's left", None),
            ], views.shape[1])
            picture = _stack(views, strip)
            name = f"qc_{t.name}_mesh.png"
            _write_png(folder / name, picture)
            pictures.append(QCPicture(name, "mesh", t.name, picture.shape[1], picture.shape[0],
                                      (0, 0, views.shape[1], views.shape[0]), triangles=len(tris),
                                      triangles_drawn=drawn))
        except Exception as exc:  # one picture failing leaves the others
            warnings.append(f"{t.name} mesh: {type(exc).__name__}: {exc}")
            log.warning("QC picture of mesh %s failed: %s", t.name, exc, exc_info=True)
    return QCResult(folder, tuple(pictures), tuple(warnings), time.perf_counter() - t0)
