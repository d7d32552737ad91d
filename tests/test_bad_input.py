"""Bad input fails at once, naming the file and the tag (issue 17 items 9 and 10).

A series whose values the pipeline cannot use fails as bad input (no retry) before anything is
decoded or allocated, offline with the CLI's one-line error, and a failed try leaves no
``results/.N.tmp-PID`` folder behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.config import ModelsConfig
from node.contracts import FailureKind, JobSpec
from node.job_process import JobFailed, _execute

REPO = Path(__file__).resolve().parent.parent


def write_series(folder: Path, change: Callable[[Dataset], None], n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "BAD^INPUT", "ID9", "20240101", "120000"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.SliceThickness = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.zeros((16, 16), dtype=np.int16).tobytes()
        change(ds)
        p = folder / f"{i:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _thickness(ds: Dataset) -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    del ds.SliceThickness
    ds._dict[Tag("SliceThickness")] = RawDataElement(Tag("SliceThickness"), "DS", 4, b"abc ", 0, False, True)


def _date(ds: Dataset) -> None:
    ds.StudyDate = "../../.."


def _huge(ds: Dataset) -> None:
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\x00" * 2048


BAD: dict[str, tuple[Callable[[Dataset], None], str]] = {
    "SliceThickness abc": (_thickness, "SliceThickness: 'abc' is not a number"),
    "65535 x 65535 with 2 KB": (_huge, "Rows: 65535 is not an image size this node processes"),
}


def _bones_job(paths: list[Path], results: Path, job_id: int) -> JobSpec:
    """The spec of a bones job on ``paths`` writing ``results/<job_id>/``."""
    from pydicom import dcmread

    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    return JobSpec(job_id=job_id, series_uid=series_uid, paths=tuple(str(p) for p in paths), profile="bones",
                   profiles_dir=REPO / "profiles", backend=None, output_dir=results / str(job_id),
                   seg_series_uid=str(generate_uid()), decode_workers=1, models=ModelsConfig())


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_fail_the_job_at_once_and_leave_no_tmp_folder(tmp_path: Path, case: str) -> None:
    change, message = BAD[case]
    paths = write_series(tmp_path / "spool", change)
    results = tmp_path / "results"
    out: Any = _execute(_bones_job(paths, results, 7))
    assert isinstance(out, JobFailed)
    assert out.kind == FailureKind.INPUT, out  # bad input: no retry
    assert message in out.message and str(paths[0]) in out.message, out.message
    assert not list(results.glob(".7.tmp-*")) and not (results / "7").exists()  # item 10


def test_a_malformed_study_date_is_repaired_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """StudyDate '../../..' (a path in a date): the pipeline reads no date, so the job goes on; the
    SEG leaves the value out (node.pipeline.conform, the repair logged) and share paths sanitise it."""
    import logging

    from pydicom import dcmread

    results = tmp_path / "results"
    with caplog.at_level(logging.INFO):
        out: Any = _execute(_bones_job(write_series(tmp_path / "spool", _date), results, 8))
    assert not isinstance(out, JobFailed), out
    seg = dcmread(next((results / "8").glob("*_seg.dcm")), stop_before_pixels=True)
    assert str(seg.get("StudyDate", "")) == ""  # Type 2: emptied, not copied
    assert any("StudyDate" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("case", list(BAD))
def test_offline_run_prints_one_line(tmp_path: Path, case: str) -> None:
    change, message = BAD[case]
    write_series(tmp_path / "in", change)
    res = subprocess.run([sys.executable, "-m", "node.cli", "run", "--input", str(tmp_path / "in"), "--organ",
                          "bones", "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("dicom-node: error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
