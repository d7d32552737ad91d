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

SEED = {
    "brain": {"shell": (120, 3000), "brain": (0, 150)},
    "liver": {"tissue": (40, 100), "vessels": (100, 200)},
    "lungs": {"tissue": (-500, -100), "airways": (-1000, -600)},
    "heart": {"myocardium": (40, 120), "chambers": (100, 200)},
    "kidneys": {"cortex": (40, 80), "medulla": (30, 50)},
    "bones": {"cortical": (300, 1500), "trabecular": (100, 400)},
    "pancreas": {"tissue": (35, 90), "ducts": (-10, 30)},
}


def test_seed_organs_have_the_seed_ranges():
    assert set(SEED) <= set(list_profiles())
    for organ, tissues in SEED.items():
        p = load_profile(organ)
        assert p.model_type == "hu_based"
        got = {t.name: t for t in p.tissues}
        for name, rng in tissues.items():
            assert name in got, f"{organ} lacks tissue {name}"
            # the non-contrast range is the seed's; a contrast range may differ
            assert got[name].hu_range("non_contrast") == rng, (organ, name)
            t = got[name]
            assert t.category.scheme == "SCT" and t.type.scheme == "SCT"
            assert len(t.color) == 3 and t.description


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
         "tissues[0].morphology[5].radius_mm: required field missing"),
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
    for organ in SEED:
        assert organ in out
    shown = subprocess.run(CLI + ["profiles", "show", "bones"], capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(shown)["tissues"][0]["name"] == "cortical"
    ok = subprocess.run(CLI + ["profiles", "validate"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _base()
    bad["tissues"][0]["morphology"][0]["op"] = "blur"
    f = _write(tmp_path, "custom", bad)
    res = subprocess.run(CLI + ["profiles", "validate", str(f)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "tissues[0].morphology[0].op: 'blur' is not allowed" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr
