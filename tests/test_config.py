"""node.yaml loading and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import REPO_ROOT, ConfigError, Destination, NodeConfig, load_config

EXAMPLE = """\
ae_title: DICOMNODE
port: 11112
storage: ./var            # spool, database, quarantine live under here
quiet_period_s: 10
workers: 1
rules: routing_rules.yaml
share: {root: ./var/share}
destinations:
  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.yaml"
    p.write_text(text)
    return p


def test_issue_example_loads(tmp_path):
    cfg = load_config(write(tmp_path, EXAMPLE))
    assert cfg.ae_title == "DICOMNODE" and cfg.port == 11112 and cfg.workers == 1
    assert cfg.quiet_period_s == 10
    assert cfg.storage == tmp_path / "var"
    assert cfg.spool_dir == tmp_path / "var" / "spool"
    assert cfg.quarantine_dir == tmp_path / "var" / "quarantine"
    assert cfg.database_path.parent == tmp_path / "var"
    assert cfg.rules == tmp_path / "routing_rules.yaml"  # relative to the config file's folder
    assert cfg.share.root == tmp_path / "var" / "share"
    assert "{organ}" in cfg.share.path_template
    pacs = cfg.destinations["pacs"]
    assert isinstance(pacs, Destination)
    assert (pacs.ae_title, pacs.host, pacs.port) == ("ORTHANC", "127.0.0.1", 4242)
    assert cfg.destination("pacs") is pacs


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert cfg.ae_title == "DICOMNODE" and cfg.port == 11112 and cfg.bind_address == "0.0.0.0"
    assert cfg.storage == tmp_path / "var"
    assert cfg.max_associations == 10 and cfg.workers >= 1
    assert cfg.allowed_calling_aes == []
    # the shipped rules send to `pacs`: the embedded defaults define it (Orthanc's defaults)
    pacs = cfg.destinations["pacs"]
    assert isinstance(pacs, Destination) and pacs.as_tuple() == ("ORTHANC", "127.0.0.1", 4242)
    # no routing_rules.yaml in the CWD: falls back to the repository root
    assert cfg.rules == REPO_ROOT / "routing_rules.yaml" or cfg.rules == tmp_path / "routing_rules.yaml"
    (tmp_path / "routing_rules.yaml").write_text("rules: []\n")
    assert load_config(None).rules == tmp_path / "routing_rules.yaml"


def test_bad_port_names_field(tmp_path):
    p = write(tmp_path, EXAMPLE.replace("port: 4242", "port: 70000"))
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == f"{p}: destinations.pacs.port: must be 1..65535 (got 70000)"


def test_unknown_key_named(tmp_path):
    with pytest.raises(ConfigError, match=r"node.yaml: quiet_period: unknown key"):
        load_config(write(tmp_path, EXAMPLE + "quiet_period: 3\n"))
    with pytest.raises(ConfigError, match=r"destinations.pacs.aet: unknown key"):
        load_config(write(tmp_path, EXAMPLE.replace("{ae_title: ORTHANC,", "{aet: X, ae_title: ORTHANC,")))


def test_bad_values(tmp_path):
    with pytest.raises(ConfigError, match=r"ae_title: must be an AE title"):
        load_config(write(tmp_path, "ae_title: THIS_IS_FAR_TOO_LONG_AE\n"))
    with pytest.raises(ConfigError, match=r"workers:"):
        load_config(write(tmp_path, "workers: 0\n"))
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(write(tmp_path, "port: [1,\n"))
    with pytest.raises(ConfigError, match=r"must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"unknown destination 'nope'"):
        load_config(write(tmp_path, EXAMPLE)).destination("nope")


def test_full_keys(tmp_path):
    text = EXAMPLE + """\
bind_address: 127.0.0.1
job_timeout_s: 600
job_retry: {max_attempts: 2, backoff_base_s: 5, backoff_max_s: 60}
dispatch_retry: {max_attempts: 5, backoff_base_s: 10, backoff_max_s: 100}
profiles: ./myprofiles
allowed_calling_aes:
  - {ae_title: CT01}
  - {ae_title: MODALITY, host: 10.0.0.5}
known_aes:
  CT01: {host: 10.0.0.4, port: 104}
max_associations: 4
timeouts: {acse_s: 5, dimse_s: 20, network_s: 30}
spool_retention_days: 3
log_level: debug
"""
    cfg = load_config(write(tmp_path, text))
    assert cfg.profiles == tmp_path / "myprofiles"
    assert cfg.allowed_calling_aes[1].host == "10.0.0.5"
    assert (origin := cfg.origin_destination("CT01")) is not None and origin.as_tuple() == ("CT01", "10.0.0.4", 104)
    assert cfg.origin_destination("OTHER") is None
    assert cfg.log_level == "DEBUG" and cfg.timeouts.dimse_s == 20
    assert [cfg.dispatch_retry.delay(n) for n in (1, 2, 3, 5)] == [10, 20, 40, 100]


def test_model_defaults_are_independent():
    a, b = NodeConfig(), NodeConfig()
    a.destinations["x"] = Destination(ae_title="X", host="h", port=1)
    assert b.destinations == {}


def test_models_section(tmp_path):
    p = tmp_path / "node.yaml"
    p.write_text("models: {root: models, device: cpu, threads: 2, totalseg_weights: /opt/ts}\n")
    cfg = load_config(p)
    assert cfg.models.root == tmp_path / "models" and cfg.models.device == "cpu" and cfg.models.threads == 2
    assert str(cfg.models.totalseg_weights) == "/opt/ts" and cfg.models.totalseg_home is None
    p.write_text("models: {device: tpu}\n")
    with pytest.raises(ConfigError, match=r"models.device"):
        load_config(p)
    assert load_config(None).models.root is None  # AI code falls back to $DICOM_NODE_MODELS / <repo>/models


def test_job_process_applies_models_section(monkeypatch, tmp_path):
    from node.pipeline.ai import common as ai_common
    from node.config import ModelsConfig
    from node.job_process import _configure_models

    import os

    for key in ("models_root", "device", "threads"):  # restored after the test
        monkeypatch.setitem(ai_common._settings, key, ai_common._settings.get(key))
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", "before")
    _configure_models(ModelsConfig(root=tmp_path, device="cpu", threads=1, totalseg_weights=tmp_path / "w"))
    assert ai_common.models_root() == tmp_path
    assert os.environ["TOTALSEG_WEIGHTS_PATH"] == str(tmp_path / "w")
