"""Routing rules: operators, combinators, facts, semantics, validation, hot reload, CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from node.routing import RuleSetHolder, RulesError, SeriesFacts, facts_from_paths, load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NODE_TEST_DATA", ROOT.parent / "shared" / "data"))
REAL = DATA / "ct-abdomen-siemens-j2k" / "dicom"
CLI = Path(sys.executable).with_name("dicom-node")
PROFILES = {"brain", "liver", "lungs", "heart", "kidneys", "bones", "pancreas"}

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"test data not found at {REAL}")


def facts(calling_ae=None, called_ae=None, **tags):
    base = {"Modality": "CT", "SeriesDescription": "CT Body 3.0", "SOPInstanceUID": "1.2.3.1"}
    base.update({k: v for k, v in tags.items() if v is not None})
    for k, v in tags.items():
        if v is None:
            base.pop(k, None)
    return SeriesFacts.from_tag_dicts([base], calling_ae, called_ae)


def rules(text, **kw):
    return parse_rules(textwrap.dedent(text), "r.yaml", **kw)


def one(cond_yaml, f):
    """Route facts through a single rule whose match is ``cond_yaml``; return (matched, reason)."""
    rs = rules(f"rules:\n  - name: r\n    match: {cond_yaml}\n    profile: bones\n")
    ev = rs.route(f).evaluations[0]
    return ev.status == "matched", ev.reason


def errors(text, **kw):
    with pytest.raises(RulesError) as ei:
        rules(text, **kw)
    return ei.value.issues


# ------------------------------------------------------------------- operators


def test_minimal_rule_loads():
    rs = rules("""
        rules:
          - name: body-ct-bones
            match:
              Modality: CT
              SeriesDescription: {regex: "(?i)body|bone"}
            profile: bones
            destinations: [pacs]
        """)
    (r,) = rs.rules
    assert (r.name, r.profile, r.destinations, r.backend) == ("body-ct-bones", "bones", ("pacs",), None)
    assert (r.share, r.stop, r.enabled, r.supersede) == (True, True, True, True)
    assert r.line == 3 and len(rs.version) == 16
    assert rs.keywords() == {"Modality", "SeriesDescription"}


def test_equals_scalar():
    assert one("{Modality: CT}", facts(Modality=" CT ")) == (True, "Modality equals 'CT' matched ' CT '")
    m, why = one("{Modality: CT}", facts(Modality="ct"))
    assert not m and why == "Modality equals 'CT' did not match 'ct'"  # case-sensitive
    assert one("{Modality: {equals: ct, ignore_case: true}}", facts())[0]
    # numbers compare numerically
    assert one("{SeriesNumber: 3}", facts(SeriesNumber="3.0"))[0]
    assert not one("{SeriesNumber: 3}", facts(SeriesNumber=4))[0]
    m, why = one("{SeriesNumber: 3}", facts(SeriesNumber=None))
    assert not m and why == "SeriesNumber is missing (equals 3 needs a value)"


def test_one_of_list_and_operator():
    assert one("{Modality: [MR, CT]}", facts())[0]
    m, why = one("{Modality: {one_of: [MR, PT]}}", facts())
    assert not m and why == "Modality one_of ['MR', 'PT'] did not match 'CT'"
    assert one("{Modality: {one_of: [mr, ct], ignore_case: true}}", facts())[0]


def test_regex():
    m, why = one('{SeriesDescription: {regex: "(?i)body|bone"}}', facts(SeriesDescription="Head 5.0"))
    assert not m and why == "SeriesDescription regex '(?i)body|bone' did not match 'Head 5.0'"
    m, why = one('{SeriesDescription: {regex: "BODY", ignore_case: true}}', facts())
    assert m and why == "SeriesDescription regex 'BODY' (ignore case) matched 'CT Body 3.0'"
    # multi-valued: backslash-joined string form
    assert one('{ImageType: {regex: "\\\\\\\\AXIAL$"}}', facts(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]))[0]


def test_glob():
    assert one('{SeriesDescription: {glob: "CT*"}}', facts())[0]
    m, why = one('{SeriesDescription: {glob: "ct*"}}', facts())
    assert not m and why == "SeriesDescription glob 'ct*' did not match 'CT Body 3.0'"
    assert one('{SeriesDescription: {glob: "ct*3.0", ignore_case: true}}', facts())[0]
    assert one('{ImageType: {glob: "ORIGINAL*"}}', facts(ImageType=["ORIGINAL", "PRIMARY"]))[0]


def test_range_and_min_max():
    assert one("{SliceThickness: {range: [1, 3]}}", facts(SliceThickness="3.0"))[0]
    m, why = one("{SliceThickness: {range: [0.5, 2.5]}}", facts(SliceThickness=3.0))
    assert not m and why == "SliceThickness range [0.5, 2.5] did not match 3"
    assert one("{SliceThickness: {min: 2}}", facts(SliceThickness=3))[0]
    m, why = one("{SliceThickness: {max: 2}}", facts(SliceThickness=3))
    assert not m and why == "SliceThickness range [-inf, 2] did not match 3"
    assert one("{SliceThickness: {range: [null, 5]}}", facts(SliceThickness=3))[0]
    # multi-valued: the first value
    assert one("{PixelSpacing: {range: [0.9, 1.0]}}", facts(PixelSpacing=[0.977, 5.0]))[0]
    assert not one("{SliceThickness: {min: 1}}", facts(SliceThickness="abc"))[0]


def test_exists_and_not_empty():
    m, why = one("{ContrastBolusAgent: {exists: true}}", facts(ContrastBolusAgent=""))
    assert m and why.startswith("ContrastBolusAgent exists: yes (present")
    m, why = one("{ContrastBolusAgent: {exists: true}}", facts())
    assert not m and why == "ContrastBolusAgent exists: no (absent)"
    assert one("{ContrastBolusAgent: {exists: false}}", facts())[0]
    m, why = one("{ContrastBolusAgent: {not_empty: true}}", facts(ContrastBolusAgent="  "))
    assert not m and why == "ContrastBolusAgent is not empty: no (present, value '  ')"
    assert one("{ContrastBolusAgent: {not_empty: true}}", facts(ContrastBolusAgent="APPLIED"))[0]
    assert one("{ContrastBolusAgent: {not_empty: false}}", facts())[0]


def test_combinators():
    f = facts(SeriesDescription="Thorax 1.0")
    m, why = one('{any: [{SeriesDescription: {regex: Abdomen}}, {SeriesDescription: {regex: Thorax}}]}', f)
    assert m and why == "SeriesDescription regex 'Thorax' matched 'Thorax 1.0'"
    m, why = one('{any: [{Modality: MR}, {SeriesDescription: {regex: Head}}]}', f)
    assert not m and why == ("none of any[] matched: Modality equals 'MR' did not match 'CT'; "
                             "SeriesDescription regex 'Head' did not match 'Thorax 1.0'")
    m, why = one("{not: {Modality: MR}}", f)
    assert m and why == "not: Modality equals 'MR' did not match 'CT'"
    assert not one("{not: {Modality: CT}}", f)[0]
    m, why = one("{all: [{Modality: CT}, {SeriesDescription: {regex: Head}}]}", f)
    assert not m and why == "SeriesDescription regex 'Head' did not match 'Thorax 1.0'"
    # implicit all: the first failing condition decides
    m, why = one("{Modality: MR, SeriesDescription: {regex: Head}}", f)
    assert why == "Modality equals 'MR' did not match 'CT'"
    # nested
    assert one("{all: [{Modality: CT}, {not: {any: [{SeriesDescription: {regex: Head}}]}}]}", f)[0]


def test_association_conditions():
    f = facts(calling_ae="CT_SCANNER1", called_ae="SEGNODE")
    assert one("{calling_ae: CT_SCANNER1}", f)[0]
    assert one('{calling_ae: {glob: "CT_*"}, called_ae: [SEGNODE, OTHER]}', f)[0]
    m, why = one('{calling_ae: {regex: "^PACS"}}', f)
    assert not m and why == "calling_ae regex '^PACS' did not match 'CT_SCANNER1'"
    m, why = one("{called_ae: SEGNODE}", facts())
    assert not m and why == "called_ae is missing (equals 'SEGNODE' needs a value)"


# ----------------------------------------------------------------------- facts


@needs_real
def test_real_series_facts():
    (f,) = facts_from_paths(REAL)
    assert f.instance_count == 20
    assert f.slice_thickness == 3.0
    assert f.slice_spacing == pytest.approx(2.0, abs=1e-3)
    assert f.orientation == "axial"
    assert f.gantry_tilt is False
    assert f.modality == "CT"
    assert f.tags["SeriesDescription"] == "CT Body 3.0"
    assert f.tags["ProtocolName"] == "FDG_TK_KM"
    # representative = first by position along the normal (lowest z here)
    assert f.tags["ImagePositionPatient"][2] == min(
        -804.5, f.tags["ImagePositionPatient"][2])
    rs = rules("""
        rules:
          - name: thin
            match: {slice_spacing: {max: 2.5}, slice_thickness: {min: 2.5}, instance_count: {range: [10, 30]},
                    orientation: axial, gantry_tilt: false, modality: CT}
            profile: bones
        """)
    assert rs.route(f).matched[0].name == "thin"


def _tilted(n=10, tilt_deg=15.0, gdt=None, spacing=2.5):
    t = math.radians(tilt_deg)
    # slices tilted about the patient x axis; table moves along z
    iop = [1, 0, 0, 0, math.cos(t), math.sin(t)]
    out = []
    for k in reversed(range(n)):  # deliberately unsorted input
        d = {"SOPInstanceUID": f"1.2.9.{k}", "SeriesInstanceUID": "1.2.9", "Modality": "CT",
             "InstanceNumber": str(k + 1), "ImageOrientationPatient": [str(v) for v in iop],
             "ImagePositionPatient": [0.0, 0.0, k * spacing], "SliceThickness": "2.5"}
        if gdt is not None:
            d["GantryDetectorTilt"] = gdt
        out.append(d)
    return out


def test_tilted_synthetic_series():
    f = SeriesFacts.from_tag_dicts(_tilted(), "CT1", "NODE")
    assert f.gantry_tilt is True
    assert f.gantry_tilt_deg == pytest.approx(15.0, abs=0.01)
    assert f.orientation == "axial"
    # spacing along the normal, not the table step
    assert f.slice_spacing == pytest.approx(2.5 * math.cos(math.radians(15)), abs=1e-3)
    assert f.instance_count == 10
    assert f.tags["InstanceNumber"] == "1"
    assert (f.calling_ae, f.called_ae) == ("CT1", "NODE")
    assert one("{gantry_tilt: true}", f)[0]
    m, why = one("{gantry_tilt: false}", f)
    assert not m and why == "gantry_tilt equals false did not match true"


def test_tilt_from_header_and_orientations():
    f = SeriesFacts.from_tag_dicts(_tilted(tilt_deg=0.0, gdt="12.0"))
    assert f.gantry_tilt is True and f.gantry_tilt_deg == 12.0
    f = SeriesFacts.from_tag_dicts(_tilted(tilt_deg=0.0, gdt=0))
    assert f.gantry_tilt is False and f.slice_spacing == 2.5
    # duplicates counted once; coronal, sagittal, oblique
    items = _tilted(tilt_deg=0.0) + _tilted(tilt_deg=0.0)[:3]
    assert SeriesFacts.from_tag_dicts(items).instance_count == 10
    for iop, name in (([1, 0, 0, 0, 0, -1], "coronal"), ([0, 1, 0, 0, 0, -1], "sagittal"),
                      ([1, 0, 0, 0, 0.6, 0.8], "oblique")):
        f = SeriesFacts.from_tag_dicts([{"ImageOrientationPatient": iop, "Modality": "MR"}])
        assert f.orientation == name
        assert f.slice_spacing is None and f.gantry_tilt is None


# -------------------------------------------------------------------- semantics

SEMANTICS = """
rules:
  - name: heart-off
    enabled: false
    match: {Modality: CT}
    profile: heart
  - name: liver-too
    stop: false
    match: {SeriesDescription: {regex: Body}}
    profile: liver
    backend: totalsegmentator
    destinations: [origin]
  - name: bones
    match: {Modality: CT}
    profile: bones
    share: false
    supersede: false
  - name: never-reached
    match: {Modality: CT}
    profile: lungs
"""


def test_stop_enabled_and_decision():
    d = rules(SEMANTICS).route(facts())
    assert [e.status for e in d.evaluations] == ["disabled", "matched", "matched", "skipped"]
    assert [r.name for r in d.matched] == ["liver-too", "bones"]
    assert not d.unrouted
    assert d.evaluations[0].reason.startswith("enabled: false (would have matched")
    assert d.evaluations[3].reason.startswith("rule 'bones' matched with stop: true (would have matched)")
    liver, bones = d.matched
    assert (liver.backend, liver.destinations) == ("totalsegmentator", ("origin",))
    assert (bones.share, bones.supersede, bones.backend) == (False, False, None)
    text = "\n".join(d.explain())
    assert "decision: rule 'bones' -> profile=bones backend=default" in text


def test_unrouted():
    d = rules(SEMANTICS).route(facts(Modality="MR", SeriesDescription="T1"))
    assert d.unrouted and d.matched == []
    assert d.explain()[-1] == "  decision: UNROUTED (no rule matched)"
    assert rules("rules: []").route(facts()).unrouted


# ------------------------------------------------------------------- validation


def _one_issue(text, **kw):
    (issue,) = errors(text, **kw)
    return issue


def test_typo_keyword_suggests():
    i = _one_issue("""\
        rules:
          - name: r1
            match:
              Modality: CT
              SeriesDescripton: {regex: body}
            profile: bones
        """)
    assert (i.rule, i.line) == ("r1", 5)
    assert "'SeriesDescripton'" in i.message and "did you mean 'SeriesDescription'" in i.message
    assert str(i).startswith("r.yaml:5: rule 'r1': unknown DICOM keyword")


def test_unknown_operator_and_bad_regex():
    i = _one_issue("""\
        rules:
          - name: r1
            match:
              SeriesDescription: {regexp: body}
            profile: bones
        """)
    assert (i.rule, i.line) == ("r1", 4)
    assert "unknown operator 'regexp'" in i.message and "did you mean 'regex'" in i.message
    i = _one_issue("""\
        rules:
          - name: ok
            match: {Modality: CT}
            profile: bones
          - name: broken
            match:
              SeriesDescription: {regex: "(body"}
            profile: bones
        """)
    assert (i.rule, i.line) == ("broken", 7)
    assert "bad regex '(body'" in i.message


def test_unknown_profile_and_destination():
    text = """\
        rules:
          - name: r1
            match: {Modality: CT}
            profile: bone
            destinations:
              - pacs
              - pasc
        """
    issues = errors(text, known_profiles=PROFILES, known_destinations={"pacs"})
    assert [(i.rule, i.line) for i in issues] == [("r1", 4), ("r1", 7)]
    assert "unknown profile 'bone'" in issues[0].message and "did you mean 'bones'" in issues[0].message
    assert "unknown destination 'pasc'" in issues[1].message
    # origin is always allowed; unchecked without known sets
    rules(text.replace("pasc", "origin"), known_profiles=PROFILES | {"bone"}, known_destinations={"pacs"})
    rules(text)


def test_missing_profile_unknown_key_duplicates():
    issues = errors("""\
        rules:
          - name: a
            match: {Modality: CT}
            profile: bones
          - name: b
            match: {Modality: CT}
            destination: [pacs]
          - name: a
            match: {Modality: CT}
            profile: bones
        """)
    msgs = [(i.rule, i.line, i.message) for i in issues]
    assert msgs[0][:2] == ("b", 7) and "unknown key 'destination'" in msgs[0][2]
    assert "did you mean 'destinations'" in msgs[0][2] and "allowed keys: name, match" in msgs[0][2]
    assert msgs[1] == ("b", 5, "missing required field 'profile'")
    assert msgs[2] == ("a", 8, "duplicate rule name 'a' (first defined at line 2)")
    # a rule without a name is labelled by position
    (i,) = errors("rules:\n  - match: {Modality: CT}\n    profile: bones\n")
    assert (i.rule, i.line, i.message) == ("#1", 2, "missing required field 'name'")
    assert str(i) == "r.yaml:2: rule #1: missing required field 'name'"
    (i,) = errors("rules:\n  - name: off\n    match: {}\n    profile: bones\n")
    assert i.line == 2 and "quote it" in i.message


def test_yaml_syntax_error_has_parser_line():
    i = _one_issue("""\
        rules:
          - name: a
            match: {Modality: CT
            profile: bones
        """)
    assert i.message.startswith("YAML syntax error") and i.line == 4
    i = _one_issue("rules:\n  - name: a\n    name: b\n    match: {}\n    profile: x\n")
    assert i.line == 3 and "duplicate key 'name'" in i.message


def test_other_validation():
    bad = {
        "{Modality: }": "no value given",
        "{SliceThickness: {range: [3, 1]}}": "minimum 3 is above maximum 1",
        "{SliceThickness: {regex: a, glob: b}}": "give exactly one operator",
        "{orientation: axail}": "not one of axial",
        "{ReferencedImageSequence: {exists: true}}": "sequence or binary",
        "{Modality: {exists: true, ignore_case: true}}": "ignore_case only applies",
        "{any: []}": "non-empty list",
    }
    for cond, msg in bad.items():
        (i,) = errors(f"rules:\n  - name: r\n    match: {cond}\n    profile: bones\n")
        assert msg in i.message and i.line == 3, (cond, i)
    (i,) = errors("rules:\n  - name: r\n    match: {}\n    profile: bones\n    stop: maybe\n")
    assert i.line == 5 and "'stop' must be true or false" in i.message
    (i,) = errors("rules:\n  - name: r\n    match: {}\n    profile: bones\n    backend: totalseg\n")
    assert "unknown backend 'totalseg'" in i.message and "totalsegmentator" in i.message
    (i,) = errors("")
    assert "empty" in i.message


# ------------------------------------------------------------------- hot reload

GOOD = "rules:\n  - name: a\n    match: {Modality: CT}\n    profile: bones\n"


def test_hot_reload(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text(GOOD)
    seen: list[object] = []
    h = RuleSetHolder(p, known_profiles=lambda: PROFILES, on_change=seen.append)
    v1 = h.ruleset.version
    assert h.reload_if_changed() == (False, None)

    p.write_text(GOOD.replace("Modality", "Modalty"))
    changed, err = h.reload_if_changed()
    assert not changed and err is not None and "Modalty" in err and "keeping version" in err and ":3:" in err
    assert h.ruleset.version == v1 and h.route(facts()).matched[0].name == "a"
    assert h.reload_if_changed()[1] == err  # still reported, previous rules still active

    p.write_text(GOOD.replace("profile: bones", "profile: spleen"))  # unknown profile
    assert h.reload_if_changed()[0] is False and h.ruleset.version == v1

    p.unlink()
    changed, err = h.reload_if_changed()
    assert not changed and err is not None and "cannot read" in err and h.ruleset.version == v1

    p.write_text(GOOD.replace("name: a", "name: b") + "    stop: false\n")
    assert h.reload_if_changed() == (True, None)
    assert h.ruleset.rules[0].name == "b" and h.ruleset.version != v1
    assert seen == [h.ruleset] and h.last_error is None
    assert h.reload_if_changed() == (False, None)


def test_rules_version_is_the_one_version_of_a_rule_file(tmp_path):
    """Jobs, logs and RuleSet.version all carry rules_version: 16 hex digits of the file's SHA-256."""
    from node.routing import rules_version

    f = tmp_path / "r.yaml"
    f.write_text("a: 1\n")
    v1 = rules_version(f)
    f.write_text("a: 2\n")
    assert rules_version(f) != v1 and rules_version(b"a: 1\n") == v1 and len(v1) == 16
    f.write_text(GOOD)
    assert load_rules(f).version == rules_version(f) == parse_rules(GOOD).version
    h = RuleSetHolder(f)
    f.write_text(GOOD.replace("name: a", "name: b"))
    assert h.reload_if_changed() == (True, None) and h.ruleset.version == rules_version(f)


# ------------------------------------------------------------------ default file


def test_default_rules_file():
    rs = load_rules(ROOT / "routing_rules.yaml", known_profiles=PROFILES, known_destinations={"pacs"})
    assert {r.profile for r in rs.rules} == PROFILES
    assert all(r.destinations == ("pacs",) and r.share for r in rs.rules)
    expect = {
        "CT Head 5.0": "brain", "Neuro Routine": "brain", "Leber arteriell": "liver",
        "Abdomen 3.0": "liver", "Thorax 1.0 Lunge": "lungs", "Chest CTA": "heart",
        "Cardiac 0.75": "heart", "Niere nativ": "kidneys", "CT Urogram": "kidneys",
        "Pancreas protocol": "pancreas", "Spine 2.0": "bones", "Liver Abdomen": "liver",
    }
    for desc, profile in expect.items():
        d = rs.route(facts(SeriesDescription=desc))
        assert [r.profile for r in d.matched] == [profile], desc
    assert rs.route(facts(Modality="MR", SeriesDescription="Head T1")).unrouted
    assert rs.route(facts(SeriesDescription="Localizer")).unrouted


@needs_real
def test_default_rules_route_real_series_to_bones():
    rs = load_rules(ROOT / "routing_rules.yaml", known_profiles=PROFILES, known_destinations={"pacs"})
    (f,) = facts_from_paths(REAL)
    d = rs.route(f)
    assert [r.profile for r in d.matched] == ["bones"] and d.matched[0].destinations == ("pacs",)


# ------------------------------------------------------------------------- CLI


def run_cli(*args, cwd=ROOT):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_cli_validate(tmp_path):
    r = run_cli("rules", "validate")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: routing_rules.yaml: 8 rule(s)")
    r = run_cli("rules", "validate", "--profiles", ",".join(PROFILES), "--destinations", "pacs")
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n    match: {SeriesDescripton: a, Modality: {regexp: b}}\n"
                   "    profile: livr\n")
    r = run_cli("rules", "validate", bad, "--profiles", ",".join(PROFILES))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith(f"ERROR {bad}:3:13: rule 'x': unknown DICOM keyword or fact 'SeriesDescripton'")
    assert lines[1].startswith(f"ERROR {bad}:3:45: rule 'x': Modality: unknown operator 'regexp'")
    assert lines[2].startswith(f"ERROR {bad}:4:14: rule 'x': unknown profile 'livr'")
    assert lines[3] == f"3 error(s), 0 warning(s) in {bad}"


def _write_series(folder: Path, uid: str, modality: str, desc: str, n: int = 3) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
        meta.MediaStorageSOPInstanceUID = UID(f"{uid}.{k + 1}")
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = uid
        ds.Modality = modality
        ds.SeriesDescription = desc
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 5.0 * k]
        ds.SliceThickness = 5
        ds.save_as(folder / f"{uid}-{k}.dcm", enforce_file_format=True)


def test_cli_test_folder_with_two_series(tmp_path):
    _write_series(tmp_path / "in" / "a", "1.2.777.1", "CT", "Head 5.0")
    _write_series(tmp_path / "in" / "b", "1.2.777.2", "MR", "T2 Brain")
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    r = run_cli("rules", "test", tmp_path / "in", "--calling-ae", "CT1", "--called-ae", "NODE")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "series 1.2.777.1" in out and "series 1.2.777.2" in out
    ct, mr = out.split("series 1.2.777.2")
    assert "instances=3 slice_thickness=5 slice_spacing=5 orientation=axial" in ct
    assert "calling_ae=CT1 called_ae=NODE" in ct
    assert "[MATCHED] ct-brain" in ct and "decision: rule 'ct-brain' -> profile=brain" in ct
    assert "[skipped] ct-abdomen" in ct
    assert "[not matched] ct-pancreas (line 49): SeriesDescription regex" in ct
    assert "Modality equals 'CT' did not match 'MR'" in mr and "decision: UNROUTED" in mr


@needs_real
def test_cli_test_real_series_and_custom_rules(tmp_path):
    r = run_cli("rules", "test", REAL)
    assert r.returncode == 0, r.stderr
    assert "[MATCHED] ct-body-bones" in r.stdout
    assert "decision: rule 'ct-body-bones' -> profile=bones backend=default destinations=[pacs]" in r.stdout
    assert "slice_thickness=3 slice_spacing=2 orientation=axial gantry_tilt=False" in r.stdout
    custom = tmp_path / "r.yaml"
    custom.write_text(SEMANTICS)
    r = run_cli("rules", "test", REAL, "--rules", custom)
    assert r.returncode == 0, r.stderr
    assert "[disabled] heart-off" in r.stdout and "[skipped] never-reached" in r.stdout


def test_cli_test_unknown_series_uid(tmp_path):
    r = run_cli("rules", "test", "1.2.3.4.5", "--db", tmp_path / "missing.db")
    assert r.returncode == 1
    assert "cannot look up series 1.2.3.4.5" in r.stderr and "Traceback" not in r.stderr
    from node.store import Store

    Store(tmp_path / "node.db").close()
    r = run_cli("rules", "test", "1.2.3.4.5", "--db", tmp_path / "node.db")
    assert r.returncode == 1 and "series 1.2.3.4.5 is not in the node's store" in r.stderr
