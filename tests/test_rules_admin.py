"""Rule administration (node/rules_admin.py, node/rules_dryrun.py, `dicom-node rules ...`):
node-aware validation with every problem at its line, apply/history/diff/rollback with the
versions in the store, enable/disable/reorder in place, and dry runs against series received
by the real receiver (DCMTK storescu) from the real and synthetic series in ../shared/data."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml

from node.completion import sweep
from node.config import load_config
from node.router import Router
from node.routing.facts import facts_from_paths
from node.routing.rules import RuleSetHolder, parse_rules, rules_version
from node.rules_admin import (
    FOUND_BY,
    RulesAdmin,
    RulesConflict,
    RulesInvalid,
    format_issue,
    move_text,
    reorder_text,
    set_enabled_text,
    validate_text,
)
from node.rules_dryrun import dry_run, explain, facts_for_folder, facts_for_recent, facts_for_series
from node.store import Store

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DICOM_NODE_DATA", REPO.parent / "shared" / "data"))
J2K = DATA / "ct-abdomen-siemens-j2k" / "dicom"
HEAD = DATA / "ct-head-1mm" / "ct.nii.gz"
MR = DATA / "mr-small" / "mr.nii.gz"
CLI = Path(sys.executable).with_name("dicom-node")
SHIPPED = (REPO / "routing_rules.yaml").read_text()

needs_data = pytest.mark.skipif(not (J2K.is_dir() and HEAD.is_file() and MR.is_file()),
                                reason="../shared/data not present")
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed")

# five typos and one good rule: each problem must come back at its own line
TYPOS = """\
rules:
  - name: ct-liver
    match:
      Modality: CT
      SeriesDescripton: {regex: "(?i)liver"}
    profile: livr
    destinations: [archive]

  - name: ct-bones
    match:
      Modality: {equal: CT}
    profile: bonez
    destinations: [archive, pacs]
    enabeld: false

  - name: ct-any
    match: {}
    profile: bones
"""


def node_yaml(tmp: Path, **extra: object) -> Path:
    """A node with one destination ``archive`` (no ``pacs``) and the shipped profiles."""
    data = {"storage": str(tmp / "var"), "rules": str(tmp / "rules.yaml"), "profiles": str(REPO / "profiles"),
            "destinations": {"archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 11113}},
            **extra}
    p = tmp / "node.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def cli(*args: object, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The installed ``dicom-node`` script, running this checkout's code."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


def cli_here(capsys: pytest.CaptureFixture[str], *args: object) -> subprocess.CompletedProcess:
    """The same command in this process (parser and command functions as ``main`` runs them; a
    second interpreter per command costs seconds on a busy machine)."""
    from node.cli import build_parser
    from node.errors import NodeError

    capsys.readouterr()
    parsed = build_parser().parse_args([str(a) for a in args])
    try:
        rc = int(parsed.func(parsed) or 0)
    except NodeError as exc:
        print(f"dicom-node: error: {exc}", file=sys.stderr)
        rc = 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(map(str, args)), rc, out.out, out.err)


# ------------------------------------------------------------------------------ validation


def test_every_typo_reported_at_its_line_and_column_against_the_nodes_names(tmp_path):
    cfg = load_config(node_yaml(tmp_path))
    v = validate_text(TYPOS, cfg, path="draft.yaml", check_backends=False)
    assert not v.ok and v.ruleset is None
    got = [(i.line, i.column, i.message.split(";")[0]) for i in v.issues]
    assert got == [
        (5, 7, "unknown DICOM keyword or fact 'SeriesDescripton' (did you mean 'SeriesDescription' or "
               "'StrainDescription' or 'SourceDescription'?)"),
        (6, 14, "unknown profile 'livr' (did you mean 'liver'?)"),
        (11, 18, "Modality: unknown operator 'equal' (did you mean 'equals'?)"),
        (12, 14, "unknown profile 'bonez' (did you mean 'bones'?)"),
        (13, 29, "unknown destination 'pacs'"),  # this node has no pacs: node.yaml decides
        (14, 5, "unknown key 'enabeld' (did you mean 'enabled'?)"),
    ]
    assert [i.rule for i in v.issues] == ["ct-liver", "ct-liver", "ct-bones", "ct-bones", "ct-bones", "ct-bones"]
    assert format_issue(v.issues[1]).startswith("draft.yaml:6:14: rule 'ct-liver': unknown profile 'livr'")
    assert "known: origin, archive" not in v.issues[4].message and "known: archive, origin" in v.issues[4].message
    # the embedded defaults know pacs but not archive: the same file, other problems
    v2 = validate_text(TYPOS, None, check_backends=False)
    assert [i.line for i in v2.issues if "unknown destination" in i.message] == [7, 13]


def test_node_aware_checks_warn_but_do_not_block(tmp_path):
    cfg = load_config(node_yaml(tmp_path))
    text = """\
rules:
  - name: everything
    match: {}
    profile: bones
    destinations: [origin]
  - name: later
    match: {Modality: CT}
    profile: liver
    backend: nnunet
"""
    v = validate_text(text, cfg, path="r.yaml")
    assert v.ok and v.errors == []
    msgs = {(i.line, i.rule): i.message for i in v.warnings}
    assert "no known_aes" in msgs[(5, "everything")]
    assert msgs[(6, "later")].startswith("never reached: rule 'everything' (line 2) matches every series")
    assert any(r == "later" and "backend 'nnunet' for profile 'liver' is not usable on this node" in m
               for (_, r), m in msgs.items())
    # a profile file that exists but does not load is an error (its jobs could only fail)
    prof_dir = tmp_path / "profiles"
    shutil.copytree(REPO / "profiles", prof_dir)
    (prof_dir / "liver.yaml").write_text("name: liver\ndescription: x\ntissues: []\n")
    cfg2 = load_config(node_yaml(tmp_path, profiles=str(prof_dir)))
    v2 = validate_text(text, cfg2, path="r.yaml", check_backends=False)
    assert not v2.ok and [(i.line, i.column) for i in v2.errors] == [(8, 14)]
    assert "profile 'liver' cannot be loaded" in v2.errors[0].message


def test_cli_validate_reads_the_node_by_default(tmp_path):
    cfgfile = node_yaml(tmp_path)
    draft = tmp_path / "draft.yaml"
    draft.write_text(TYPOS)
    r = cli("rules", "validate", draft, "--config", cfgfile, "--no-backends")
    assert r.returncode == 1
    err = r.stderr.splitlines()
    assert err[0].startswith(f"ERROR {draft}:5:7: rule 'ct-liver': unknown DICOM keyword or fact 'SeriesDescripton'")
    assert err[4].startswith(f"ERROR {draft}:13:29: rule 'ct-bones': unknown destination 'pacs'")
    assert err[6] == f"6 error(s), 0 warning(s) in {draft}"
    assert err[7].startswith(f"checked against {cfgfile}: profiles bones, brain")
    # the shipped file sends to pacs, which this node lacks; without --config the defaults have it
    shutil.copy(REPO / "routing_rules.yaml", tmp_path / "rules.yaml")
    r = cli("rules", "validate", "--config", cfgfile, "--no-backends")
    assert r.returncode == 1 and r.stderr.count("unknown destination 'pacs' (did you mean") == 0
    assert r.stderr.count("unknown destination 'pacs'") == 8
    r = cli("rules", "validate", "--no-backends")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: routing_rules.yaml: 8 rule(s) (8 enabled), version ")


# ------------------------------------------------------------------- apply / history / rollback


def _admin(tmp_path: Path) -> RulesAdmin:
    cfg = load_config(node_yaml(tmp_path))
    return RulesAdmin(cfg, Store(cfg.database_path), check_backends=False)


FIRST = """\
# the node's rules
rules:
  - name: body-bones
    match: {Modality: CT, SeriesDescription: {regex: "(?i)body"}}
    profile: bones
    destinations: [archive]
"""


def test_apply_validates_writes_atomically_records_and_hot_reloads(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(FIRST)
    os.chmod(rules, 0o644)
    reloaded: list[str] = []
    admin = _admin(tmp_path)
    holder = RuleSetHolder(rules)  # what the running node holds (node/service.py)
    admin.on_applied = lambda: reloaded.append(str(holder.reload_if_changed()))
    live = admin.live()
    assert live.version == rules_version(rules) and live.recorded is None and live.validation.ok

    # invalid: nothing written, nothing recorded, every error reported
    with pytest.raises(RulesInvalid) as exc:
        admin.apply(FIRST.replace("profile: bones", "profile: bonez").replace("[archive]", "[archiv]"), user="alice")
    assert [(i.line, i.column) for i in exc.value.validation.errors] == [(5, 14), (6, 20)]
    assert rules.read_text() == FIRST and admin.store.rule_versions() == []

    second = FIRST.replace("(?i)body", "(?i)body|bone")
    out = admin.apply(second, user="alice", comment="bone too", expected_version=live.version)
    assert out.changed and rules.read_text() == second
    assert stat.S_IMODE(rules.stat().st_mode) == 0o644  # the file keeps its mode
    assert reloaded == ["(True, None)"] and holder.ruleset.version == rules_version(second.encode())
    assert "-    match: {Modality: CT, SeriesDescription: {regex: \"(?i)body\"}}" in out.diff
    assert "+    match: {Modality: CT, SeriesDescription: {regex: \"(?i)body|bone\"}}" in out.diff
    found, applied = reversed(admin.store.rule_versions())
    assert (found.action, found.applied_by, found.text) == ("found", FOUND_BY, FIRST)
    assert (applied.action, applied.applied_by, applied.comment, applied.version) == (
        "apply", "alice", "bone too", rules_version(second.encode()))
    assert not list(tmp_path.glob(".rules.yaml.*"))  # no temporary file left

    # a stale editor is refused; the same text again changes nothing
    with pytest.raises(RulesConflict):
        admin.apply(FIRST, user="bob", expected_version=live.version)
    assert not admin.apply(second, user="bob").changed and len(admin.store.rule_versions()) == 2

    # edited by hand, then changed through the admin: the hand edit is recorded first
    third = second.replace("[archive]", "[archive, origin]")
    rules.write_text(third)
    admin.set_enabled("body-bones", False, user="carol")
    rows = admin.store.rule_versions()
    assert [r.action for r in rows] == ["disable", "found", "apply", "found"]
    assert rows[1].text == third

    hist = admin.history()
    assert hist[0].live and not hist[1].live
    assert (hist[0].added, hist[0].removed) == (1, 0) and "+    enabled: false" in hist[0].diff
    assert hist[-1].previous is None and hist[-1].added == FIRST.count("\n")

    # rollback = apply the recorded text (by id or hash prefix), recorded as a rollback
    back = admin.rollback(applied.version[:8], user="dave", comment="too wide")
    assert back.changed and rules.read_text() == second
    last = admin.store.rule_versions(1)[0]
    assert last.action == "rollback" and last.comment == f"rollback to #{applied.id} ({applied.version[:12]}): too wide"
    assert admin.diff(f"#{applied.id}") == ""  # live == that version
    assert "+    enabled: false" in admin.diff(f"#{applied.id}", f"#{rows[0].id}")
    admin.store.close()


def test_cli_apply_history_diff_rollback_enable_move(tmp_path, capsys):
    cfgfile = node_yaml(tmp_path)
    rules = tmp_path / "rules.yaml"
    shipped = SHIPPED.replace("[pacs]", "[archive]")
    rules.write_text(shipped)
    bad = tmp_path / "bad.yaml"
    bad.write_text(TYPOS)
    r = cli_here(capsys, "rules", "apply", bad, "-c", cfgfile, "--no-backends")
    assert r.returncode == 1 and "not applied: the live rule file is unchanged" in r.stderr
    assert "ERROR rules.yaml:12:14: rule 'ct-bones': unknown profile 'bonez'" in r.stderr
    assert rules.read_text() == shipped
    r = cli_here(capsys, "rules", "disable", "ct-liver", "-c", cfgfile, "-m", "radiology asked", "--no-backends")
    assert r.returncode == 0, r.stderr
    assert "+    enabled: false" in r.stdout and "(#2, disable by shell:" in r.stdout
    r = cli_here(capsys, "rules", "move", "ct-body-bones", "1", "-c", cfgfile, "--no-backends")
    assert r.returncode == 0, r.stderr
    rs = parse_rules(rules.read_bytes())
    assert [x.name for x in rs.rules][:2] == ["ct-body-bones", "ct-pancreas"]
    assert not next(x for x in rs.rules if x.name == "ct-liver").enabled
    r = cli_here(capsys, "rules", "history", "-c", cfgfile)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    action, counts = lines[1].split()[5:7]
    added, removed = counts.lstrip("+").split("/-")
    assert action == "reorder" and added == removed != "0" and lines[1].endswith("(live)")
    assert "radiology asked" in lines[2] and f"{FOUND_BY}    found" in lines[3]
    r = cli_here(capsys, "rules", "rollback", "1", "-c", cfgfile, "--no-backends")
    assert r.returncode == 0, r.stderr
    assert rules.read_text() == shipped
    r = cli_here(capsys, "rules", "diff", "#2", "-c", cfgfile)
    assert r.returncode == 0 and r.stdout.count("\n-    enabled: false") == 1
    r = cli_here(capsys, "rules", "enable", "ct-livr", "-c", cfgfile, "--no-backends")
    assert r.returncode == 1 and "no rule named 'ct-livr' (did you mean 'ct-liver'?)" in r.stderr


# ---------------------------------------------------------------------------- text changes


def test_enable_disable_and_reorder_keep_the_rest_of_the_file():
    off = set_enabled_text(SHIPPED, "ct-heart", False)
    assert off.count("\n") == SHIPPED.count("\n") + 1
    on = set_enabled_text(off, "ct-heart", True)
    assert on == off.replace("    enabled: false\n", "    enabled: true\n")
    assert set_enabled_text(on, "ct-heart", False) == off
    rs = parse_rules(off)
    assert [r.name for r in rs.rules if not r.enabled] == ["ct-heart"]
    # flow style rules and values followed by comments
    flow = "rules:\n  - {name: a, match: {}, profile: bones}\n  - name: b\n    enabled: yes  # on\n" \
           "    match: {Modality: CT}\n    profile: liver\n"
    f2 = set_enabled_text(set_enabled_text(flow, "a", False), "b", False)
    assert "- {name: a, enabled: false, match: {}" in f2.replace("{enabled: false, name: a", "{name: a, enabled: false")
    assert "    enabled: false  # on\n" in f2
    assert [r.enabled for r in parse_rules(f2).rules] == [False, False]

    names = [r.name for r in parse_rules(SHIPPED).rules]
    moved = move_text(SHIPPED, "ct-body-bones", 1)
    assert [r.name for r in parse_rules(moved).rules] == ["ct-body-bones", *[n for n in names if n != "ct-body-bones"]]
    comments = sorted(ln for ln in SHIPPED.splitlines() if ln.strip().startswith("#"))
    assert sorted(ln for ln in moved.splitlines() if ln.strip().startswith("#")) == comments
    assert reorder_text(moved, names) == SHIPPED  # and back, byte for byte
    with pytest.raises(Exception, match="must name every rule once"):
        reorder_text(SHIPPED, names[:-1])
    with pytest.raises(Exception, match="flow style"):
        reorder_text("rules: [{name: a, match: {}, profile: bones}, {name: b, match: {}, profile: bones}]\n",
                     ["b", "a"])


def test_disabled_rule_is_not_routed_on_the_real_series():
    if not J2K.is_dir():
        pytest.skip("../shared/data not present")
    (facts,) = facts_from_paths(J2K)
    assert parse_rules(SHIPPED).route(facts).matched[0].name == "ct-body-bones"
    off = parse_rules(set_enabled_text(SHIPPED, "ct-body-bones", False))
    decision = off.route(facts)
    ev = {e.rule.name: e for e in decision.evaluations}
    assert ev["ct-body-bones"].status == "disabled" and ev["ct-body-bones"].would_match
    assert decision.unrouted


# --------------------------------------------------------------------------------- dry runs


@pytest.fixture(scope="module")
def received(tmp_path_factory):
    """A node store holding three series received over DICOM: the real J2K abdomen (calling AE
    CT1), a synthetic head series and a synthetic MR series; routed with the shipped rules."""
    from node.tools.synth_series import write_series
    from receiver_helpers import make_receiver

    if not (J2K.is_dir() and HEAD.is_file() and MR.is_file()):
        pytest.skip("../shared/data not present")
    if shutil.which("storescu") is None:
        pytest.skip("DCMTK storescu not installed")
    tmp = tmp_path_factory.mktemp("received")
    head = write_series(HEAD, tmp / "head", series_description="Head 5.0", size=(48, 48, 8))
    mr = write_series(MR, tmp / "mr", modality="MR", series_description="T2 brain", size=(32, 32, 5))
    rx, store = make_receiver(tmp, known_aes={"CT1": {"host": "127.0.0.1", "port": 11199}})
    try:
        for files, aet in ((sorted(J2K.glob("*.dcm")), "CT1"), (head, "CT2"), (mr, "MR1")):
            r = subprocess.run(["storescu", "-xv", "-aec", "DICOMNODE", "-aet", aet, "127.0.0.1", str(rx.port),
                                *map(str, files)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            time.sleep(0.05)  # distinct last_received_at, newest last
    finally:
        rx.stop()
    uids = {name: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            for name, files in (("ct", sorted(J2K.glob("*.dcm"))), ("head", head), ("mr", mr))}
    cfgfile = node_yaml(tmp, known_aes={"CT1": {"host": "127.0.0.1", "port": 11199}})
    (tmp / "rules.yaml").write_text(SHIPPED.replace("[pacs]", "[archive]"))
    cfg = load_config(cfgfile)
    assert sweep(store, 0)
    Router(cfg, store, RuleSetHolder(cfg.rules)).route_series(uids["ct"])  # the others stay complete
    yield {"tmp": tmp, "cfg": cfg, "cfgfile": cfgfile, "store": store, "uids": uids, "head": head}
    store.close()


BODY = '{regex: "(?i)bone|skelet|spine|ortho|body|knochen|wirbel"}'
DRAFT = SHIPPED.replace("[pacs]", "[archive]").replace(BODY, '{regex: "(?i)bone|skelet|spine"}')


def _snapshot(db: Path) -> list[tuple]:
    c = sqlite3.connect(db)
    try:
        return [tuple(r) for t in ("series", "jobs", "instances", "dispatches", "rule_versions")
                for r in c.execute(f"SELECT * FROM {t} ORDER BY 1")]
    finally:
        c.close()


@needs_data
@needs_dcmtk
def test_dry_run_on_stored_recent_and_folder_series_touches_nothing(received):
    cfg, store, uids = received["cfg"], received["store"], received["uids"]
    assert SHIPPED.count(BODY) == 1
    before = _snapshot(cfg.database_path)
    rules_before = Path(cfg.rules).read_bytes()
    draft = parse_rules(DRAFT)
    live = parse_rules(rules_before)

    targets, errors = facts_for_series(store, [uids["ct"], "1.2.3.404"])
    assert errors == ["1.2.3.404: not in the node's store"]
    result = dry_run(draft, targets, cfg, live=live, errors=errors)
    (ct,) = result.series
    assert ct.series_uid == uids["ct"] and "already has job(s) of rule(s) ct-body-bones" in ct.note
    rules = {r.rule: r for r in ct.rules}
    body = rules["ct-body-bones"]
    assert body.status == "not_matched"
    rows = [(c.field, c.condition, c.actual, c.matched) for c in body.conditions]
    # every condition with the series' value, each at its line
    assert [c.line for c in body.conditions] == [(draft.rules[-1].line or 0) + k for k in (2, 3)]
    assert rows[0] == ("Modality", "equals 'CT'", "'CT'", True)
    assert rows[1] == ("SeriesDescription", "regex '(?i)bone|skelet|spine'", "'CT Body 3.0'", False)
    assert len(rows) == 2 and "SeriesDescription regex" in body.reason
    assert ct.jobs == () and ct.unrouted
    assert [j.rule for j in ct.live_jobs or ()] == ["ct-body-bones"] and ct.differs
    live_job = (ct.live_jobs or ())[0]
    assert (live_job.profile, live_job.backend, live_job.destinations) == ("bones", "hu_based", ("archive",))
    assert live_job.targets == ("archive: ARCHIVE@127.0.0.1:11113",)

    # the last 2 received: the MR (unrouted by both) and the head (brain by both)
    targets, errors = facts_for_recent(store, 2)
    assert errors == [] and [f.series_instance_uid for f, _ in targets] == [uids["mr"], uids["head"]]
    res = dry_run(draft, targets, cfg, live=live)
    mr, head = res.series
    assert mr.unrouted and not mr.differs
    brain = next(r for r in mr.rules if r.rule == "ct-brain")
    # every condition is evaluated, also after the first failed (the rule's own reason stops there)
    assert [(c.field, c.actual, c.matched) for c in brain.conditions] == [
        ("Modality", "'MR'", False), ("SeriesDescription", "'T2 brain'", True)]
    assert "SeriesDescription" not in brain.reason
    assert [(j.rule, j.profile) for j in head.jobs] == [("ct-brain", "brain")] and not head.differs
    assert head.facts["calling_ae"] == "CT2" and head.note == "stored series, complete"

    # a folder (headers only), calling AE given: origin resolved through known_aes
    draft2 = parse_rules(DRAFT.replace("    profile: bones\n    destinations: [archive]",
                                       "    profile: bones\n    destinations: [archive, origin]"))
    (f,) = facts_for_folder(J2K, "CT1")
    res = dry_run(draft2, [f], cfg, live=live)
    assert res.series[0].note == "files"
    text = "\n".join(explain(res))
    assert "SeriesDescription regex '(?i)bone|skelet|spine'  actual 'CT Body 3.0'" in text
    (f,) = facts_for_folder(J2K, "CT1")
    wide = parse_rules(SHIPPED.replace("[pacs]", "[archive, origin]"))
    (s,) = dry_run(wide, [f], cfg).series
    assert s.jobs[0].targets == ("archive: ARCHIVE@127.0.0.1:11113", "origin: CT1@127.0.0.1:11199")
    (g,) = facts_for_folder(J2K, "CT9")
    (s,) = dry_run(wide, [g], cfg).series
    assert s.jobs[0].targets[1] == "origin: calling AE CT9 has no known_aes entry: nothing is sent"

    assert _snapshot(cfg.database_path) == before and Path(cfg.rules).read_bytes() == rules_before


@needs_data
@needs_dcmtk
def test_cli_dry_run(received, capsys):
    tmp, cfgfile, uids = received["tmp"], received["cfgfile"], received["uids"]
    draft = tmp / "draft.yaml"
    draft.write_text(DRAFT)
    r = cli_here(capsys, "rules", "dry-run", draft, "--series", uids["ct"], "-c", cfgfile, "--no-backends")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "[NOT MATCHED] ct-body-bones" in out and "NO  SeriesDescription regex '(?i)bone|skelet|spine'  actual " \
        "'CT Body 3.0'" in out
    assert "jobs: none (UNROUTED)" in out and "live rules: jobs ct-body-bones->bones" in out
    r = cli_here(capsys, "rules", "dry-run", "--last", "3", "-c", cfgfile, "--no-backends")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\nseries ") == 3 and "job: rule ct-brain -> profile brain, backend hu_based" in r.stdout
    r = cli_here(capsys, "rules", "dry-run", draft, "--folder", received["head"][0].parent, "-c", cfgfile, "--no-backends")
    assert r.returncode == 0 and "(files)" in r.stdout
    bad = tmp / "bad.yaml"
    bad.write_text(TYPOS)
    r = cli_here(capsys, "rules", "dry-run", bad, "--last", "1", "-c", cfgfile, "--no-backends")
    assert r.returncode == 1 and "no dry run: the draft has errors" in r.stderr and "bad.yaml:6:14" in r.stderr
