"""End-to-end pipeline benchmark: dicom-node (bones profile) vs a dicom2stl-style baseline.

Builds (once, cached) a 512x512xN DICOM CT series from the shared test data, in
Explicit VR Little Endian and in JPEG 2000 Lossless, then for each series runs

* **node**: ``node.pipeline.run.run_pipeline(files, "bones", out)`` (load, segment,
  mesh, seg; two tissues, two STL + PLY meshes and one DICOM SEG), and
* **baseline**: the steps of dicom2stl (github.com/dave3d/dicom2stl) with its default
  mesh settings: SimpleITK ``ImageSeriesReader`` -> threshold (HU >= 300, the
  node's cortical lower bound, as 0/255) -> pad 5 voxels -> numpy -> ``vtkImageData``
  (direction ignored, as dicom2stl does) -> ``vtkContourFilter`` at 64 (flying edges
  on image data) -> ``vtkCleanPolyData`` -> small-part removal (connectivity, 5 % of
  the largest part) -> ``vtkWindowedSincPolyDataFilter`` (25 iterations) ->
  ``vtkDecimatePro`` (target reduction 0.9) -> binary ``vtkSTLWriter``.
  dicom2stl shrinks the volume to 256 voxels per axis by default; that is off here
  so that both sides mesh the same full-resolution grid (``--baseline-shrink`` runs
  it with the shrink as an extra, informational row).

Each side runs in its own fresh Python subprocess, pinned to ``--cores`` CPUs with
the ITK / VTK / OpenMP thread pools and the node's decode workers sized to match.
Peak memory is measured per side from outside: the peak of the summed RSS of the
process tree (psutil polling every 50 ms, so decode worker processes count) and the
kernel's ``ru_maxrss`` of the subprocess (``wait4``).  The node's own per-stage
timings and peak RSS come from its ``report.json``.

Run ``python bench/pipeline.py --help``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NIFTI_REL = Path("ct-body-3mm") / "ct.nii.gz"

#: targets from the issue (uncompressed series, 2 cores)
TARGET_WALL_S = 10.0
#: --working-grid of this run (the node side only)
WORKING_GRID: list[float | None] = [None]
#: --profile of this run (the node side; the baseline and the targets are for bones only)
PROFILE: list[str] = ["bones"]
TARGET_RSS_MB = 2500.0
TARGET_SPEEDUP = 3.0

#: dicom2stl defaults (dicom2stl/utils/parseargs.py, Dicom2STL.py)
D2S_SMOOTH_ITERATIONS = 25
D2S_REDUCE = 0.9
D2S_SMALL_FACTOR = 0.05
D2S_PAD = 5
D2S_ISOVALUE = 64.0  # dicom2stl's isovalue on a 0/255 thresholded image
BONE_LOWER_HU = 300.0  # node bones profile, cortical: hu [300, 1500]


# --------------------------------------------------------------------------- series


def data_dir() -> Path:
    env = os.environ.get("NODE_TEST_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


def cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dicom-node-bench"


def ensure_series(cache: Path, slices: int, ts: str) -> tuple[Path, float | None]:
    """The cached series folder (built if missing) and the seconds spent building it."""
    nifti = data_dir() / NIFTI_REL
    folder = cache / f"ct-body-3mm_512x512x{slices}_{ts}"
    marker = cache / f"{folder.name}.complete"  # beside the folder: nothing non-DICOM inside it
    if marker.exists():
        return folder, None
    if not nifti.exists():
        raise SystemExit(f"input volume not found: {nifti} (set NODE_TEST_DATA)")
    from node.tools.synth_series import write_series

    if folder.exists():  # left over from an interrupted build
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    print(f"  building {folder.name} from {nifti} ...", flush=True)
    t0 = time.perf_counter()
    write_series(nifti, tmp, size=(512, 512, slices), transfer_syntax=ts,
                 series_description=f"bench {ts} 512x512x{slices}")
    tmp.rename(folder)
    marker.write_text(json.dumps({"nifti": str(nifti), "ts": ts, "slices": slices}) + "\n")
    return folder, round(time.perf_counter() - t0, 1)


# --------------------------------------------------------------------------- sides (run in a subprocess)


def _dicom_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.dcm"))


def side_node(series: Path, out: Path, workers: int, working_grid: float | None = None,
              profile: str = "bones") -> dict[str, Any]:
    t0 = time.perf_counter()
    from node.pipeline.run import run_pipeline

    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = run_pipeline([series], profile, out, decode_workers=workers, working_grid_mm=working_grid)
    total = time.perf_counter() - t1
    rep = res.report
    return {
        "import_s": round(t_import, 3),
        "total_s": round(total, 3),
        "timings_s": rep["timings_s"],
        "peak_rss_mb_self": rep["peak_rss_mb"],
        "tissues": rep["tissues"],
        "shape_kji": rep["input"]["shape_kji"],
    }


def side_baseline(series: Path, out: Path, shrink: bool) -> dict[str, Any]:
    """dicom2stl's steps (bone, HU >= 300) with its default mesh settings."""
    import gc
    import math
    import resource

    t0 = time.perf_counter()
    import numpy as np
    import SimpleITK as sitk
    import vtk
    from vtk.util import numpy_support

    t_import = time.perf_counter() - t0
    timings: dict[str, float] = {}
    rss: dict[str, float] = {}
    info: dict[str, Any] = {}
    t_start = time.perf_counter()
    t = [time.perf_counter()]

    def mark(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = round(now - t[0], 3)
        rss[stage] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
        t[0] = now

    # load: like dicomutils.loadLargestSeries (GDCM series ids, largest series)
    isr = sitk.ImageSeriesReader()
    series_ids = isr.GetGDCMSeriesIDs(str(series))
    best = max((isr.GetGDCMSeriesFileNames(str(series), s) for s in series_ids), key=len)
    isr.SetFileNames(best)
    img = isr.Execute()
    info["size_xyz"] = list(img.GetSize())
    mark("load")

    if shrink:  # Dicom2STL.shrinkVolume(img, 256)
        factors = [int(math.ceil(s / 256.0)) for s in img.GetSize()]
        if sum(factors) > 3:
            img = sitk.Shrink(img, factors)
        info["shrunk_xyz"] = list(img.GetSize())
        mark("shrink")

    # threshold: bone = HU >= 300, 0/255 like dicom2stl's DoubleThreshold output
    upper = {sitk.sitkInt16: 32767.0, sitk.sitkUInt16: 65535.0, sitk.sitkInt32: 2.0**31 - 1}.get(
        img.GetPixelID(), 1.0e9)
    info["pixel_type"] = img.GetPixelIDTypeAsString()
    img = sitk.BinaryThreshold(img, BONE_LOWER_HU, upper, 255, 0)
    gc.collect()
    stats = sitk.StatisticsImageFilter()
    stats.Execute(img)
    pad = [D2S_PAD] * 3
    img = sitk.ConstantPad(img, pad, pad, stats.GetMinimum())
    mark("threshold")

    # sitk2vtk: origin and spacing kept, direction ignored
    arr = sitk.GetArrayViewFromImage(img)
    vimg = vtk.vtkImageData()
    vimg.SetDimensions(img.GetSize())
    vimg.SetSpacing(img.GetSpacing())
    vimg.SetOrigin(img.GetOrigin())
    flat = np.ascontiguousarray(arr).reshape(-1)
    varr = numpy_support.numpy_to_vtk(flat, deep=True)
    vimg.GetPointData().SetScalars(varr)
    del arr, flat, img
    gc.collect()
    mark("to_vtk")

    iso = vtk.vtkContourFilter()
    iso.SetInputData(vimg)
    iso.SetValue(0, D2S_ISOVALUE)
    iso.Update()
    mesh = iso.GetOutput()
    info["contour_triangles"] = mesh.GetNumberOfPolys()
    del iso, vimg, varr
    gc.collect()
    mark("contour")

    clean = vtk.vtkCleanPolyData()
    clean.SetInputData(mesh)
    clean.Update()
    mesh = clean.GetOutput()
    del clean
    gc.collect()
    mark("clean")

    # removeSmallObjects(mesh, 0.05)
    conn = vtk.vtkPolyDataConnectivityFilter()
    conn.SetInputData(mesh)
    conn.SetExtractionModeToAllRegions()
    conn.Update()
    sizes = conn.GetRegionSizes()
    n_regions = conn.GetNumberOfExtractedRegions()
    max_size = max((sizes.GetValue(i) for i in range(n_regions)), default=0)
    conn.SetExtractionModeToSpecifiedRegions()
    for i in range(n_regions):
        if sizes.GetValue(i) > max_size * D2S_SMALL_FACTOR:
            conn.AddSpecifiedRegion(i)
    conn.Update()
    mesh = conn.GetOutput()
    info["regions"] = n_regions
    del conn
    gc.collect()
    mark("small_parts")

    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetNumberOfIterations(D2S_SMOOTH_ITERATIONS)
    smooth.SetInputData(mesh)
    smooth.Update()
    mesh = smooth.GetOutput()
    del smooth
    gc.collect()
    mark("smooth")

    deci = vtk.vtkDecimatePro()
    deci.SetTargetReduction(D2S_REDUCE)
    deci.SetInputData(mesh)
    deci.Update()
    mesh = deci.GetOutput()
    info["triangles"] = mesh.GetNumberOfPolys()
    del deci
    gc.collect()
    mark("decimate")

    writer = vtk.vtkSTLWriter()
    writer.SetInputData(mesh)
    writer.SetFileTypeToBinary()
    writer.SetFileName(str(out / "baseline_bone.stl"))
    writer.Write()
    mark("write")

    return {
        "import_s": round(t_import, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "timings_s": timings,
        "peak_rss_mb_self": rss,
        "info": info,
    }


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("side", choices=["node", "baseline", "baseline-shrink"])
    p.add_argument("series", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("result", type=Path)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--working-grid", type=float, default=None)
    p.add_argument("--profile", default="bones")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.side == "node":
        res = side_node(a.series, a.out, a.workers, a.working_grid, a.profile)
    else:
        res = side_baseline(a.series, a.out, shrink=(a.side == "baseline-shrink"))
    a.result.write_text(json.dumps(res))
    return 0


# --------------------------------------------------------------------------- parent: measurement


def _tree_rss_mb(procs: list[Any]) -> float:
    import psutil

    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / (1024.0 * 1024.0)


def _tree_pss_mb(procs: list[Any]) -> float | None:
    """Summed proportional set size (``/proc/<pid>/smaps_rollup``): a page shared by n
    processes counts 1/n in each, so a forked child (the node's decimator) is not counted
    twice for what it shares with its parent, as the summed RSS counts it.  ``None`` where
    the kernel has no ``smaps_rollup``."""
    total = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except FileNotFoundError:
            if p.pid == procs[0].pid:
                return None
        except (OSError, ValueError):
            pass
    return total / (1024.0 * 1024.0)


def measure(side: str, series: Path, work: Path, cores: list[int]) -> dict[str, Any]:
    """Run one side in a fresh subprocess; wall, CPU, peak RSS from outside."""
    import psutil

    out = work / side
    if out.exists():
        shutil.rmtree(out)
    result = work / f"{side}.json"
    env = dict(os.environ)
    n = str(len(cores))
    env.update({
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n,
        "VTK_SMP_MAX_THREADS": n,
        "OMP_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", side, str(series), str(out), str(result),
           "--workers", n]
    if side == "node" and WORKING_GRID[0]:
        cmd += ["--working-grid", str(WORKING_GRID[0])]
    if side == "node":
        cmd += ["--profile", PROFILE[0]]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO),
                            preexec_fn=(lambda: os.sched_setaffinity(0, cores)))
    peak = [0.0]
    peak_pss: list[float | None] = [0.0]
    done = threading.Event()

    def poll() -> None:
        try:
            ps = psutil.Process(proc.pid)
        except psutil.Error:
            return
        # listing children scans all of /proc: do it every 0.5 s, read the RSS every 50 ms
        # (cheap enough not to steal a noticeable share of the 2 cores being measured)
        procs = [ps]
        i = 0
        while not done.is_set():
            if i % 10 == 0:
                try:
                    procs = [ps] + ps.children(recursive=True)
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], _tree_rss_mb(procs))
            if peak_pss[0] is not None and i % 2 == 0:  # smaps_rollup walks the page tables: 10/s
                pss = _tree_pss_mb(procs)
                peak_pss[0] = None if pss is None else max(peak_pss[0], pss)
            i += 1
            done.wait(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{side} run failed (exit {proc.returncode}) on {series}")
    res = json.loads(result.read_text())
    res.update({
        "side": side,
        "process_wall_s": round(wall, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "ru_maxrss_mb": round(ru.ru_maxrss / 1024.0, 1),  # largest single process (incl. waited children)
        "tree_peak_rss_mb": round(peak[0], 1),  # summed RSS of the process tree, polled
        # summed PSS of the tree, polled: shared pages counted once (None: no smaps_rollup)
        "tree_peak_pss_mb": None if peak_pss[0] is None else round(peak_pss[0], 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    })
    res["peak_rss_mb"] = max(res["ru_maxrss_mb"], res["tree_peak_rss_mb"])
    shutil.rmtree(out, ignore_errors=True)
    return res


def pick(runs: list[dict[str, Any]], how: str) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["total_s"])
    chosen = dict(runs[0] if how == "best" else runs[(len(runs) - 1) // 2])
    chosen["all_total_s"] = [r["total_s"] for r in runs]
    chosen["all_peak_rss_mb"] = sorted(r["peak_rss_mb"] for r in runs)
    chosen["median_total_s"] = round(statistics.median(chosen["all_total_s"]), 3)
    return chosen


# --------------------------------------------------------------------------- report


def _yn(ok: bool) -> str:
    return "yes" if ok else "NO"


def print_case(name: str, case: dict[str, Any], check_targets: bool) -> None:
    node, base = case["node"], case.get("baseline")
    print(f"\n=== {name}: {case['series']} ({case['files']} files, {case['size_mb']:.0f} MB on disk)")
    print(f"    pick: {case['pick']} of {len(node['all_total_s'])} run(s);"
          f" node totals {node['all_total_s']} s" + (f", baseline totals {base['all_total_s']} s" if base else ""))
    grid = f", working grid ~{WORKING_GRID[0]} mm" if WORKING_GRID[0] else ", native grid"
    print(f"\n  node ({PROFILE[0]} profile{grid}: one STL + PLY per tissue, SEG, STL re-read check)")
    print(f"    {'stage':<12}{'wall s':>9}{'peak RSS MB':>14}")
    order = ["load", "segment", "mesh", "seg"]  # mesh: meshing left once segmentation is over
    stages = order + [k for k in node["timings_s"] if k not in order and k != "total"]
    for st in stages:
        if st not in node["timings_s"]:
            continue
        sec = node["timings_s"][st]
        rss = node["peak_rss_mb_self"].get(st)
        # mesh_span overlaps segmentation (meshing starts as soon as a tissue is final)
        label = "mesh (span)" if st == "mesh_span" else st
        print(f"    {label:<12}{sec:>9.2f}{(f'{rss:.0f}' if rss is not None else '-'):>14}")
    print(f"    {'pipeline':<12}{node['total_s']:>9.2f}{'':>14}")
    print(f"    process wall {node['process_wall_s']:.2f} s (imports {node['import_s']:.2f} s),"
          f" CPU {node['cpu_s']:.1f} s, peak RSS {node['peak_rss_mb']:.0f} MB"
          f" (tree {node['tree_peak_rss_mb']:.0f}, largest process {node['ru_maxrss_mb']:.0f}"
          + (f", tree PSS {node['tree_peak_pss_mb']:.0f}" if node.get("tree_peak_pss_mb") is not None else "") + ")")
    if base is None:
        print(f"\n  no baseline: it makes the bones profile's cortical surface, not {PROFILE[0]}'s"
              f"\n  load average before/after node: {node['loadavg_before']} / {node['loadavg_after']}")
        return
    print("\n  baseline (dicom2stl steps, full resolution, 1 surface HU>=300)")
    print(f"    {'stage':<12}{'wall s':>9}{'peak RSS MB':>14}")
    for st, sec in base["timings_s"].items():
        print(f"    {st:<12}{sec:>9.2f}{base['peak_rss_mb_self'][st]:>14.0f}")
    print(f"    {'pipeline':<12}{base['total_s']:>9.2f}")
    print(f"    process wall {base['process_wall_s']:.2f} s (imports {base['import_s']:.2f} s),"
          f" CPU {base['cpu_s']:.1f} s, peak RSS {base['peak_rss_mb']:.0f} MB;"
          f" {base['info'].get('contour_triangles', 0):,} -> {base['info'].get('triangles', 0):,} triangles")
    if "baseline_shrink" in case:
        bs = case["baseline_shrink"]
        print(f"\n  baseline with dicom2stl's default shrink to 256 (informational): pipeline {bs['total_s']:.2f} s,"
              f" process wall {bs['process_wall_s']:.2f} s, peak RSS {bs['peak_rss_mb']:.0f} MB,"
              f" grid {bs['info'].get('shrunk_xyz')}")
    r = case["ratio"]
    print(f"\n  speed-up node vs baseline: pipeline {r['pipeline']:.2f}x, process wall {r['process_wall']:.2f}x,"
          f" CPU {r['cpu']:.2f}x")
    if check_targets:
        t = case["targets"]
        print(f"  targets: end to end <= {TARGET_WALL_S:.0f} s: {_yn(t['wall_ok'])} ({node['process_wall_s']:.2f} s process,"
              f" {node['total_s']:.2f} s pipeline);  peak RSS <= {TARGET_RSS_MB:.0f} MB: {_yn(t['rss_ok'])}"
              f" ({node['peak_rss_mb']:.0f} MB);  >= {TARGET_SPEEDUP:.0f}x baseline: {_yn(t['speedup_ok'])}"
              f" ({r['pipeline']:.2f}x)")
    print(f"  load average before/after node: {node['loadavg_before']} / {node['loadavg_after']};"
          f" baseline: {base['loadavg_before']} / {base['loadavg_after']}")


def run_case(series: Path, ts: str, args: argparse.Namespace, cores: list[int], work: Path) -> dict[str, Any]:
    if PROFILE[0] != "bones":  # the baseline and the targets are the bones profile's
        sides = ["node"]
    else:
        sides = ["node", "baseline"] + (["baseline-shrink"] if args.baseline_shrink else [])
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for i in range(args.repeat):
        order = sides if i % 2 == 0 else list(reversed(sides))  # alternate to spread drift
        for side in order:
            print(f"  [{ts}] run {i + 1}/{args.repeat}: {side} ...", flush=True)
            runs[side].append(measure(side, series, work, cores))
    node = pick(runs["node"], args.pick)
    files = _dicom_files(series)
    case: dict[str, Any] = {
        "series": str(series),
        "transfer_syntax": ts,
        "files": len(files),
        "size_mb": sum(os.path.getsize(f) for f in files) / 1e6,
        "pick": args.pick,
        "node": node,
    }
    if "baseline" not in runs:
        return case
    base = pick(runs["baseline"], args.pick)
    case.update({
        "baseline": base,
        "ratio": {
            "pipeline": round(base["total_s"] / node["total_s"], 3),
            "process_wall": round(base["process_wall_s"] / node["process_wall_s"], 3),
            "cpu": round(base["cpu_s"] / max(node["cpu_s"], 1e-9), 3),
        },
    })
    if args.baseline_shrink:
        case["baseline_shrink"] = pick(runs["baseline-shrink"], args.pick)
    case["targets"] = {
        "wall_ok": node["process_wall_s"] <= TARGET_WALL_S,
        "rss_ok": node["peak_rss_mb"] <= TARGET_RSS_MB,
        "speedup_ok": case["ratio"]["pipeline"] >= TARGET_SPEEDUP,
    }
    return case


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return _child_main(argv[1:])
    p = argparse.ArgumentParser(prog="python bench/pipeline.py", description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=400, help="slices of the 512x512 series (default 400)")
    p.add_argument("--skip-j2k", action="store_true", help="only the uncompressed (explicit LE) series")
    p.add_argument("--repeat", type=int, default=1, help="runs per side (default 1)")
    p.add_argument("--pick", choices=["best", "median"], default="best",
                   help="which of the repeated runs to report (by pipeline time; default best)")
    p.add_argument("--cores", type=int, default=2, help="CPUs each side is pinned to (default 2)")
    p.add_argument("--baseline-shrink", action="store_true",
                   help="also run the baseline with dicom2stl's default shrink to 256 per axis")
    p.add_argument("--cache", default=None, help="series cache (default ~/.cache/dicom-node-bench)")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    p.add_argument("--working-grid", type=float, default=None, metavar="MM",
                   help="run the node on a ~MM mm working grid (dicom-node run --working-grid)")
    p.add_argument("--profile", default="bones",
                   help="the node's organ profile (default bones; any other runs the node side only:"
                        " the baseline and the targets are the bones profile's)")
    args = p.parse_args(argv)
    WORKING_GRID[0] = args.working_grid
    PROFILE[0] = args.profile
    if args.repeat < 1:
        p.error("--repeat must be >= 1")

    allowed = sorted(os.sched_getaffinity(0))
    cores = allowed[: max(1, args.cores)]
    if len(cores) < args.cores:
        print(f"warning: only {len(cores)} CPU(s) available, asked for {args.cores}")
    cache = cache_dir(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs,"
          f" pinned to {cores}; load average {[round(x, 2) for x in os.getloadavg()]}")
    print(f"series cache: {cache}")

    cases_ts = ["explicit"] + ([] if args.skip_j2k else ["j2k"])
    series: dict[str, Path] = {}
    built: dict[str, float | None] = {}
    for ts in cases_ts:
        series[ts], built[ts] = ensure_series(cache, args.slices, ts)
        print(f"  {ts}: {series[ts]}" + (f" (built in {built[ts]} s)" if built[ts] else " (cached)"))

    results: dict[str, Any] = {
        "machine": {
            "host": platform.node(), "cpus": os.cpu_count(), "pinned_cores": cores,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "slices": args.slices,
        "repeat": args.repeat,
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="dicom-node-bench-") as tmp:
        for ts in cases_ts:
            results["cases"][ts] = run_case(series[ts], ts, args, cores, Path(tmp))
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    for ts in cases_ts:
        title = "uncompressed (Explicit VR Little Endian)" if ts == "explicit" else "JPEG 2000 Lossless (reported separately)"
        print_case(title, results["cases"][ts], check_targets=(ts == "explicit" and args.profile == "bones"))
    print(f"\nload average at end: {results['machine']['loadavg_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
