"""A real viewer, end to end (issue 14): scanner -> ``dicom-node serve`` (rule outputs: seg, sr,
overlay, stl) -> Orthanc by C-STORE -> Orthanc's DICOMweb plugin -> the OHIF viewer's published
build (``@ohif/app``) in headless Chromium (Debian's, driven by Playwright; WebGL by SwiftShader).

Checked as a reader sees it: the SEG drawn over the CT on the slices where it has the liver (and
in proportion to it), the SR's measurements listed with the report's values, the overlay series
scrolled.  Screenshots are kept in ``tests/.artifacts/ohif/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom import dcmread

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
ARTIFACTS = Path(os.environ.get("NODE_TEST_ARTIFACTS", REPO / "tests" / ".artifacts")) / "ohif"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not J2K.is_dir(), reason=f"test data not found at {DATA} (set NODE_TEST_DATA)"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed"),
    pytest.mark.skipif(not DICOMWEB_PLUGIN.is_file(), reason="apt-get install orthanc-dicomweb"),
]

RULES = {"rules": [{
    "name": "liver-all-outputs",
    "match": {"Modality": "CT"},
    "profile": "liver",
    "destinations": ["pacs"],
    "share": False,
    "outputs": ["seg", "sr", "overlay", "stl"],
    "overlay": {"style": "fill", "series_description": "OVERLAY {profile} {SeriesDescription}"},
}]}


@pytest.fixture(scope="module")
def tools() -> dict[str, Any]:
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from ohif import chromium_path, ohif_dist

    chromium = chromium_path()
    if chromium is None:
        pytest.skip("apt-get install chromium")
    dist = ohif_dist()
    if dist is None:
        pytest.skip("OHIF's published build not available (npm pack @ohif/app failed)")
    return {"playwright": playwright, "chromium": chromium, "dist": dist}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, tools: dict[str, Any]) -> Any:
    """Orthanc (with DICOMweb) holding the CT (sent by the 'scanner') and everything the node returned."""
    from orthanc import Orthanc
    from test_e2e_orthanc import Node, storescu

    tmp = tmp_path_factory.mktemp("viewer")
    pacs = Orthanc(tmp / "orthanc", config={"Plugins": [str(DICOMWEB_PLUGIN)],
                                            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    (tmp / "node").mkdir()
    node = Node(tmp / "node", pacs)
    (tmp / "node" / "routing_rules.yaml").write_text(yaml.safe_dump(RULES), encoding="utf-8")
    node.start()
    try:
        files = sorted(J2K.glob("*.dcm"))
        storescu(pacs.dicom_port, files)  # the PACS has the CT from the scanner
        storescu(node.port, files)  # ... and so has the node
        want = {"CT": 20, "SEG": 1, "SR": 1, "OT": 20, "M3D": 2}

        def arrived() -> bool:
            got: dict[str, int] = {}
            for s in pacs.series():
                m = s["MainDicomTags"].get("Modality", "")
                got[m] = got.get(m, 0) + len(s["Instances"])
            return got == want

        assert pacs.wait_for(arrived, timeout_s=180), f"not all objects arrived; node log:\n{node.log()[-5000:]}"
        (job,) = node.store.list_jobs()
        assert job.result.report is not None and job.result.seg is not None
        report = json.loads(job.result.report.read_text())
        seg = job.result.seg
        yield {"pacs": pacs, "node": node, "report": report, "seg": seg,
               "study_uid": str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)}
    finally:
        node.stop()
        pacs.stop()


def _seg_areas(seg_path: Path, label: str) -> dict[str, int]:
    from node.pipeline.seg import read_seg_masks

    return {str(k): int(v.sum()) for k, v in read_seg_masks(seg_path)[label].items()}


def _tinted(png: bytes) -> int:
    """Pixels of a screenshot that are clearly coloured (R, G, B apart), not grey CT."""
    import cv2

    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    img = decoded.astype(int)
    b, g, r = img[..., 0], img[..., 1], img[..., 2]
    return int(((r - b > 40) & (r - g > 15)).sum())  # the liver's salmon, over grey


def test_ohif_shows_seg_sr_and_overlay(study: dict[str, Any], tools: dict[str, Any]) -> None:
    from ohif import OhifServer

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    sync_playwright = tools["playwright"].sync_playwright
    pacs = study["pacs"]
    with OhifServer(tools["dist"], pacs.url) as viewer, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=tools["chromium"], args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            outside: list[str] = []

            def local_only(route: Any) -> None:  # no request leaves the machine
                if route.request.url.startswith(viewer.url):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{viewer.url}/viewer?StudyInstanceUIDs={study['study_uid']}")
            page.wait_for_function(
                "() => window.services && window.services.displaySetService.getActiveDisplaySets().length >= 5",
                timeout=90_000)
            sets = page.evaluate("() => window.services.displaySetService.getActiveDisplaySets()"
                                 ".map(d => [d.Modality, d.SeriesDescription, d.SOPClassHandlerId])")
            by_mod = {m: (desc, handler) for m, desc, handler in sets}
            assert set(by_mod) == {"CT", "SEG", "SR", "OT", "M3D"}
            assert "dicom-seg" in by_mod["SEG"][1] and "dicom-sr" in by_mod["SR"][1]
            assert by_mod["M3D"][1] == "unsupported"  # OHIF does not show 3D models: the STL is for the lab
            _wait_rendered(page)
            _skip_tour(page)
            page.screenshot(path=str(ARTIFACTS / "1_ct.png"))

            # --- SEG over the CT, on the right slices -------------------------------
            page.get_by_text(by_mod["SEG"][0]).first.dblclick()
            page.wait_for_function("() => window.services.segmentationService.getSegmentations().length === 1",
                                   timeout=60_000)
            if page.get_by_role("button", name="Yes").count():
                page.get_by_role("button", name="Yes").first.click()  # "open this Segmentation?"
            segs = page.evaluate("() => window.services.segmentationService.getSegmentations()"
                                 ".map(s => Object.values(s.segments).map(x => x.label))")
            assert segs == [["liver tissue", "liver vessels"]]
            areas = _seg_areas(study["seg"], "liver tissue")
            ct_uids = _image_uids(page)
            most = max(range(len(ct_uids)), key=lambda i: areas.get(ct_uids[i], 0))
            least = min(range(len(ct_uids)), key=lambda i: areas.get(ct_uids[i], 0))
            shots = {}
            for name, idx in (("most", most), ("least", least)):
                _go_to_slice(page, idx)
                shots[name] = page.locator(".viewport-wrapper").first.screenshot(
                    path=str(ARTIFACTS / f"2_seg_slice{idx + 1:02d}_{name}_liver.png"))
            t_most, t_least = _tinted(shots["most"]), _tinted(shots["least"])
            a_most, a_least = areas[ct_uids[most]], areas[ct_uids[least]]
            assert t_most > 2000, t_most
            # drawn in proportion to the SEG on each slice (screen pixels per SEG pixel agree)
            assert t_least / t_most == pytest.approx(a_least / a_most, abs=0.15), (t_most, t_least, a_most, a_least)

            # --- SR: measurements listed with the report's values ----------------------
            page.get_by_text(by_mod["SR"][0]).first.dblclick()
            page.wait_for_function("() => Array.from(document.querySelectorAll('svg text'))"
                                   ".some(t => (t.textContent || '').includes('Volume'))", timeout=60_000)
            time.sleep(2)
            page.screenshot(path=str(ARTIFACTS / "3_sr.png"))
            texts = " | ".join(page.evaluate(
                "() => Array.from(document.querySelectorAll('svg text')).map(t => t.textContent || '')"))
            tissues = study["report"]["tissues"]
            shown = sorted(_shown_volumes(texts))  # the finding on screen: voxel and mesh volume
            assert any(shown == pytest.approx(sorted([t["volume_ml_voxels"], t["volume_ml_mesh"]]), abs=0.006)
                       for t in tissues.values()), (shown, texts)
            assert "Mean" in texts and "Standard Deviation" in texts and "mL" in texts, texts

            # --- overlay: scrolls with the wheel, banner burned in --------------------------
            page.get_by_text(by_mod["OT"][0]).first.dblclick()
            time.sleep(3)
            _wait_rendered(page)
            first = page.locator(".viewport-wrapper").first.screenshot(path=str(ARTIFACTS / "4_overlay_a.png"))
            index_a = _index_text(page)
            box = page.locator(".viewport-wrapper").first.bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            for _ in range(6):
                page.mouse.wheel(0, 120)
                time.sleep(0.3)
            time.sleep(2)
            second = page.locator(".viewport-wrapper").first.screenshot(path=str(ARTIFACTS / "4_overlay_b.png"))
            index_b = _index_text(page)
            assert index_a != index_b, (index_a, index_b)
            assert first != second
            assert _banner_red(second) > 2000  # "NOT FOR DIAGNOSIS" band
            assert not errors, errors
            (ARTIFACTS / "blocked_requests.txt").write_text("\n".join(outside) + "\n")
        finally:
            browser.close()


def _image_uids(page: Any) -> list[str]:
    """SOP Instance UIDs of the default viewport's images, in display order (from the wadors image ids)."""
    ids = page.evaluate("() => window.services.cornerstoneViewportService.getCornerstoneViewport('default')"
                        ".getImageIds()")
    matches = [re.search(r"/instances/([0-9.]+)/frames", i) for i in ids]
    assert all(m is not None for m in matches), ids
    return [m.group(1) for m in matches if m is not None]


def _go_to_slice(page: Any, index: int) -> None:
    page.evaluate("""async (i) => {
        const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('default');
        await vp.setImageIdIndex(i);
        vp.render();
    }""", index)
    time.sleep(1.5)


def _wait_rendered(page: Any) -> None:
    page.wait_for_function("""() => {
        const s = window.services.cornerstoneViewportService;
        const vp = s && s.getCornerstoneViewport && s.getCornerstoneViewport('default');
        return !!(vp && vp.getImageData && vp.getImageData());
    }""", timeout=90_000)
    time.sleep(1)


def _skip_tour(page: Any) -> None:
    skip = page.get_by_text("Skip all")
    if skip.count():
        skip.first.click()


def _index_text(page: Any) -> str:
    m = re.search(r"I:\s*\d+\s*\(\d+/\d+\)", page.locator(".viewport-wrapper").first.inner_text())
    return m.group(0) if m else ""


def _shown_volumes(texts: str) -> list[float]:
    return [float(x) for x in re.findall(r"Volume:\s*([0-9.]+)\s*mL", texts)]


def _banner_red(png: bytes) -> int:
    import cv2

    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    img = decoded.astype(int)
    b, g, r = img[..., 0], img[..., 1], img[..., 2]
    return int(((r > 110) & (g < 40) & (b < 40)).sum())
