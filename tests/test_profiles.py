"""Organ profiles: the seven seed organs, schema errors that name file/field/allowed, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.errors import ProfileError
from node.profiles import list_profiles, load_profile, load_profile_file

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "node.cli"]

ORGANS = ("brain", "liver", "lungs", "heart", "kidneys", "bones", "pancreas")
#: organs HU thresholds cannot separate: TotalSegmentator or a refused job (README, pancreas and heart)
MODEL_ONLY = ("heart", "pancreas")


def test_shipped_organs_load_with_codes_colours_and_descriptions():
    assert set(ORGANS) <= set(list_profiles())
    for organ in ORGANS:
        p = load_profile(organ)
        assert p.model_type == ("totalsegmentator" if organ in MODEL_ONLY else "hu_based"), organ
        assert p.result_tissues, organ
        for t in p.tissues:
            assert t.category.scheme == "SCT" and t.type.scheme == "SCT"
            assert len(t.color) == 3 and t.description
    # every organ's volume is checked in every result (bone is not: how much of it a series
    # shows depends on what it covers; nor are the vessels inside the liver)
    checked = {(o, t.name) for o in ORGANS for t in load_profile(o).result_tissues if t.expect is not None}
    assert checked == {("brain", "brain"), ("liver", "tissue"), ("lungs", "airways"), ("lungs", "lungs"),
                       ("heart", "heart"), ("kidneys", "kidneys"), ("pancreas", "pancreas")}


def test_model_only_organs_say_why_they_have_no_hu_fallback():
    for organ in MODEL_ONLY:
        p = load_profile(organ)
        assert p.refuse_without_backend and "HU thresholds cannot separate" in p.refuse_without_backend
        assert p.model_settings().roi_subset == [t.structures[0] for t in p.tissues]


def test_lungs_have_the_airways_as_their_own_segment():
    p = load_profile("lungs")
    assert [t.name for t in p.result_tissues] == ["airways", "lungs"]
    lungs = p.result_tissues[1]
    assert lungs.hu_range("non_contrast") == (-1024, -400)  # half-way between lung and soft tissue
    assert "airways" in lungs.exclude and lungs.expect is not None and lungs.expect.paired
    assert not any(t.hu_range("non_contrast") == (-500, -100) for t in p.tissues)  # the 13 M triangle "tissue" is gone


def test_kidneys_are_a_pair_found_beside_the_spine_after_the_liver():
    p = load_profile("kidneys")
    assert [t.name for t in p.result_tissues] == ["kidneys"]
    liver, kidneys = p.tissues
    assert not liver.output  # a landmark
    assert kidneys.expect is not None and kidneys.expect.paired and kidneys.expect.volume_ml == (80, 300)
    select = next(s for s in kidneys.morphology if s.op == "select")
    assert select.side == "both" and select.lateral_mm is not None


def test_every_step_of_every_shipped_profile_is_explained_in_a_comment():
    """The people who tune the profiles read what each step is for, beside it or just above it."""
    for f in sorted((REPO / "profiles").glob("*.yaml")):
        lines = f.read_text().splitlines()
        for n, line in enumerate(lines):
            if line.strip().startswith("- {op:"):
                above = lines[n - 1].strip()
                assert "#" in line or above.startswith("#"), f"{f.name}:{n + 1}: step without a comment: {line.strip()}"


def test_liver_has_a_contrast_range_chosen_from_the_header():
    p = load_profile("liver")
    liver = p.tissues[0]
    assert liver.hu_range("contrast") != liver.hu_range("non_contrast")
    assert p.resolve_phase(contrast_applied=True) == "contrast"
    assert p.resolve_phase(contrast_applied=False) == "non_contrast"
    assert p.resolve_phase(contrast_applied=True, override="non_contrast") == "non_contrast"


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(data), encoding="utf-8")
    return f


def _base(name: str = "custom") -> dict:
    return yaml.safe_load((REPO / "profiles" / "liver.yaml").read_text()) | {"name": name}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.update(model_type="deeplearn"),
         "model_type: 'deeplearn' is not allowed; allowed: 'hu_based', 'totalsegmentator', 'monai' or 'nnunet'"),
        (lambda d: d["tissues"][0]["morphology"].insert(0, {"op": "clsoing", "radius_mm": 2}),
         "tissues[0].morphology[0].op: 'clsoing' is not allowed (did you mean 'closing'?); allowed: closing"),
        (lambda d: d["tissues"][0].update(color=[300, 0, 0]), "tissues[0].color: Value error, each RGB"),
        (lambda d: d["tissues"][0].update(hu=[100, 40]), "tissues[0].hu: Value error, HU range [100.0, 40.0]"),
        (lambda d: d["tissues"][0].update(colour=[1, 2, 3]), "tissues[0].colour: unknown field"),
        (lambda d: d["tissues"][0]["morphology"].append({"op": "opening"}),
         "tissues[0].morphology[7].radius_mm: required field missing"),
        (lambda d: d["tissues"][1]["inside"].update(tissue="nonexistent"),
         "refers to 'nonexistent', which is not an earlier tissue"),
    ],
)
def test_schema_errors_name_file_field_and_allowed(tmp_path, mutate, expected):
    data = _base()
    mutate(data)
    f = _write(tmp_path, "custom", data)
    with pytest.raises(ProfileError) as exc:
        load_profile_file(f)
    msg = str(exc.value)
    assert str(f) in msg
    assert expected.replace("Value error, ", "") in msg, msg


def test_name_must_match_file(tmp_path):
    f = _write(tmp_path, "other", _base("custom"))
    with pytest.raises(ProfileError, match="must match the file name 'other'"):
        load_profile_file(f)


def test_unknown_profile_suggests_close_name():
    with pytest.raises(ProfileError, match="unknown profile 'livr' \\(did you mean 'liver'\\?\\)"):
        load_profile("livr")


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: broken\ntissues: [\n  - a: b\n")
    with pytest.raises(ProfileError, match=r"broken.yaml: line \d+: invalid YAML"):
        load_profile_file(f)


def test_cli_list_show_validate(tmp_path):
    out = subprocess.run(CLI + ["profiles", "list"], capture_output=True, text=True, check=True).stdout
    for organ in ORGANS:
        assert organ in out
    shown = subprocess.run(CLI + ["profiles", "show", "bones", "--yaml"], capture_output=True, text=True,
                           check=True).stdout
    assert yaml.safe_load(shown)["tissues"][0]["name"] == "cortical"
    ok = subprocess.run(CLI + ["profiles", "validate"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # a TotalSegmentator-only profile is valid where the model is missing: its jobs are refused
    assert "pancreas.yaml (totalsegmentator" in ok.stdout
    bad = _base()
    bad["tissues"][0]["morphology"][0]["op"] = "blur"
    f = _write(tmp_path, "custom", bad)
    res = subprocess.run(CLI + ["profiles", "validate", str(f)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "tissues[0].morphology[0].op: 'blur' is not allowed" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr


def test_cli_show_says_what_each_step_does_in_mm_and_hu():
    out = subprocess.run(CLI + ["profiles", "show", "kidneys"], capture_output=True, text=True, check=True).stdout
    assert "liver: Liver (landmark)  [landmark for later tissues: not in the SEG, meshes or report]" in out
    assert "HU: without contrast -30..80 HU, with contrast -30..400 HU" in out
    assert "1. subtract: remove liver before the next steps" in out
    assert ("cut at necks narrower than 12 mm; keep the 1 largest part(s) on each side; "
            "centre 35-90 mm from the midline; -25 to 60 mm in front of the spine's centre") in out
    assert "checked in every result: 80-300 mL each side, left/right within 1.5x" in out
    lungs = subprocess.run(CLI + ["profiles", "show", "lungs"], capture_output=True, text=True, check=True).stdout
    assert "drop_gas: drop the parts that are gas: 50% or more of their voxels 3 mm inside are below -950 HU" in lungs
    pancreas = subprocess.run(CLI + ["profiles", "show", "pancreas"], capture_output=True, text=True,
                              check=True).stdout
    assert "without totalsegmentator: refused (HU thresholds cannot separate the pancreas" in pancreas
    # every step of every shipped profile is told in words, none falls back to its bare op name
    from node.profile_text import explain_step

    for name in list_profiles():
        for t in load_profile(name).tissues:
            for step in t.morphology:
                text = explain_step(step)
                assert text != step.op and len(text) > 25, step
                for v in [getattr(step, f) for f in ("radius_mm", "min_ml", "split_mm", "max_mm") if hasattr(step, f)]:
                    assert v is None or v == 0 or f"{v:g}" in text or f"{2 * v:g}" in text, (step, text)
