"""Every organ profile scored on every real reference, against its floor (the README's table).

The measurement is :mod:`node.tools.profile_quality`: each shipped profile on each scan of
``../shared/data`` that has a reference label map, Dice of the union of its output tissues
against the reference structures of its organ.  Where a reference has none of the organ,
the profile must find (almost) nothing there.  README.md's quality table must be the
rendering of these results: after a change that moves a figure, regenerate it with
``python -m node.tools.profile_quality --write-readme README.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from node.profiles import list_profiles
from node.tools import profile_quality as pq

README = Path(__file__).resolve().parents[1] / "README.md"

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def results() -> list[pq.Result]:
    if not any(s.available() for s in pq.SCANS):
        pytest.skip(f"no reference scans under {pq.data_dir()}")
    return pq.measure()


@pytest.mark.parametrize("profile", list_profiles())
def test_profile_reaches_its_floor_on_every_reference(results, profile):
    rows = [r for r in results if r.profile == profile]
    assert rows, f"{profile} is not in the quality table"
    for r in rows:
        print(f"\n{r}")
        assert r.passed, f"{profile} on {r.scan} ({r.phase}): {r}"


def test_every_measured_phase_has_a_floor(results):
    for r in results:
        if r.dice is not None:
            assert r.floor is not None, f"{r.profile} {r.phase} is measured but has no floor in FLOORS"


def test_the_issue_targets_are_measured(results):
    """Lungs, liver without contrast and kidneys without contrast are measured on a real scan."""
    measured = {(r.profile, r.phase) for r in results if r.dice is not None}
    for key in [("lungs", "non_contrast"), ("liver", "non_contrast"), ("liver", "contrast"),
                ("kidneys", "non_contrast"), ("bones", "contrast"), ("bones", "non_contrast")]:
        assert key in measured, key


def test_readme_table_is_current(results):
    table = pq.readme_table(README.read_text(encoding="utf-8"))
    assert table is not None, "README.md lacks the generated quality table (markers)"
    want = pq.render(results)
    if table != want:
        # figures within 0.002 of the README's are current (library versions may move a voxel)
        got_rows, want_rows = table.splitlines(), want.splitlines()
        assert len(got_rows) == len(want_rows), "rows differ: regenerate the README table\n" + want
        for a, b in zip(got_rows, want_rows):
            if a == b:
                continue
            ca, cb = a.split("|"), b.split("|")
            assert [c for i, c in enumerate(ca) if i != 4] == [c for i, c in enumerate(cb) if i != 4], (
                "README table out of date; regenerate it:\n" + want)
            assert abs(float(ca[4]) - float(cb[4])) <= 0.002, "README Dice out of date; regenerate:\n" + want
