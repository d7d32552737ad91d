"""Shared helpers of the AI backend tests (tests/test_backend_*.py)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
NNUNET_TINY = FIXTURES / "nnunet_tiny"
HELD_OUT_SEEDS = (7, 8)  # never used for training (scripts/train_tiny_nnunet.py uses 100..111)

_connects: list = []
_armed = {"on": False}


def _hook(event, args):
    if event == "socket.connect" and _armed["on"]:
        if getattr(args[0], "family", None) == socket.AF_UNIX:
            return  # local IPC (multiprocessing managers inside nnU-Net/TotalSegmentator), not network
        _connects.append(args[1] if len(args) > 1 else args)
        raise AssertionError(f"network connect during patient processing: {args[1] if len(args) > 1 else args}")


class fail_on_connect:
    """Audit hook that fails on any IP socket.connect inside the block, loopback included (and records
    it even when the library swallows the error).  AF_UNIX connects are local IPC and allowed."""

    installed = False

    def __enter__(self):
        if not fail_on_connect.installed:
            sys.addaudithook(_hook)
            fail_on_connect.installed = True
        _connects.clear()
        _armed["on"] = True
        return _connects

    def __exit__(self, *exc):
        _armed["on"] = False
        return False


def self_check_hook() -> None:
    """Prove the hook sees a connect (so a silent pass means no connect happened)."""
    with fail_on_connect() as seen:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", 9))
        except AssertionError:
            pass
        finally:
            s.close()
    assert seen, "audit hook did not see socket.connect"


def synth_tissue(name: str, **spec) -> dict:
    """A profile tissue for the synthetic ``organ`` (label 1) or ``bone`` (label 2); ``spec`` adds fields."""
    return {
        "name": name,
        "description": name,
        "color": {"organ": [50, 170, 60], "bone": [241, 214, 145]}.get(name, [200, 100, 100]),
        "category": {"value": "123037004", "meaning": "Anatomical Structure"},
        "type": {"value": "78961009", "meaning": "Spleen"} if name == "organ" else
        {"value": "3138006", "meaning": "Bone"},
        **spec,
    }


#: organ and bone with HU ranges for the HU backend and labels for the models, no meshes
SYNTH_TISSUES = [
    synth_tissue("organ", hu=[100, 170], labels=[1], mesh={"enabled": False}),
    synth_tissue("bone", hu=[200, 1500], labels=[2], mesh={"enabled": False}),
]


def tissue_profile(model_type: str, model: dict, tissues: list[tuple[str, dict]], name: str = "synth"):
    """A profile with tissues ``(name, {labels|structures})`` for the synthetic organ/bone."""
    from node.profiles import parse_profile

    data = {
        "name": name,
        "description": "synthetic shapes",
        "model_type": model_type,
        "model": model,
        "tissues": [synth_tissue(t, **spec) for t, spec in tissues],
    }
    return parse_profile(data, f"<test {name}>")


def write_case_series(case, out_dir: Path, **kw):
    """Write a synthetic case as a DICOM CT series; returns (files, truth labels on the loaded grid)."""
    from node.tools.synth_series import write_series
    from node.tools.synth_shapes import case_affine

    aff_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ case_affine(case)
    files = write_series(case.hu.transpose(2, 1, 0).astype(np.float32), out_dir, affine=aff_ras, **kw)
    return files


def truth_on_loaded(case, volume) -> np.ndarray:
    """The case's truth mapped onto a volume loaded from its DICOM series (via patient coordinates)."""
    from node.tools.synth_shapes import case_affine

    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    pts = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    src = np.linalg.inv(case_affine(case)) @ (volume.affine @ pts)
    idx = np.rint(src[:3]).astype(int)
    out = np.zeros(ii.size, dtype=np.uint8)
    ok = np.all((idx >= 0) & (idx < np.array(case.labels.shape[::-1])[:, None]), axis=0)
    out[ok] = case.labels[idx[2, ok], idx[1, ok], idx[0, ok]]
    return out.reshape(volume.shape)


# -- parity with the libraries' own entry points on NIfTIs of real series (issue 16, part 4) ----------

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NODE_TEST_DATA", REPO.parent / "shared" / "data"))
#: real series for the parity tests: a real DICOM series (JPEG 2000), and a NIfTI written as DICOM
REAL_SERIES = ("ct-abdomen-siemens-j2k", "ct-body-3mm-small")


def real_series_dicom(name: str, tmp: Path) -> Path:
    """The folder of a real series as DICOM: its own files, or its NIfTI written by ``write_series``."""
    import pytest

    src = DATA / name
    if (src / "dicom").is_dir():
        return src / "dicom"
    if not (src / "ct.nii.gz").exists():
        pytest.skip(f"test data not found under {DATA}")
    from node.tools.synth_series import write_series

    out = tmp / f"{name}-dicom"
    write_series(src / "ct.nii.gz", out)
    return out


def nifti_as(dicom_dir: Path, volume, codes: str, path: Path) -> Path:
    """The series as a NIfTI stored ``codes``: ``LAS`` converted by dcm2niix (what public models
    were trained on), any other orientation written from the loaded volume by flips and
    permutations."""
    import shutil
    import subprocess

    import nibabel as nib

    from node.pipeline.orientation import to_orientation

    if codes == "LAS":
        import pytest

        if not shutil.which("dcm2niix"):
            pytest.skip("dcm2niix not installed (apt-get install dcm2niix)")
        conv = path.parent / f"dcm2niix-{path.stem}"
        conv.mkdir(parents=True)
        subprocess.run(["dcm2niix", "-z", "y", "-f", "image", "-o", str(conv), str(dicom_dir)],
                       check=True, capture_output=True, timeout=300)
        shutil.copy(conv / "image.nii.gz", path)
        img: Any = nib.load(str(path))
        assert "".join(nib.aff2axcodes(img.affine)) == "LAS"  # dcm2niix's storage
        return path
    r = to_orientation(volume.array.astype(np.int16), volume.affine, codes)
    nib.save(nib.Nifti1Image(r.array.transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]) @ r.affine), str(path))
    return path


def on_volume_grid(nifti: Path, volume) -> np.ndarray:
    """A NIfTI label map on the volume grid ``[k, j, i]``, by its affine (flips and permutations only)."""
    import nibabel as nib

    img: Any = nib.load(str(nifti))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    pts = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    idx = np.rint(np.linalg.inv(lps) @ (volume.affine @ pts))[:3].astype(int)
    data = np.asarray(img.dataobj)
    assert np.all((idx >= 0) & (idx < np.array(data.shape)[:, None]))
    return data[idx[0], idx[1], idx[2]].reshape(volume.shape)
