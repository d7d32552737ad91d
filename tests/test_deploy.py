"""The shipped deployment example and default rules load with the real loaders."""

from __future__ import annotations

from pathlib import Path

import yaml

from node.config import Destination, load_config
from node.profiles import list_profiles
from node.routing import load_rules

REPO = Path(__file__).resolve().parents[1]


def test_example_node_yaml_is_valid(tmp_path):
    cfg = load_config(REPO / "deploy" / "node.example.yaml")
    pacs = cfg.destinations["pacs"]
    assert isinstance(pacs, Destination)
    assert cfg.ae_title == "DICOMNODE" and pacs.port == 104
    assert cfg.allowed_calling_aes[0].host == "10.1.2.30"


def test_systemd_unit_runs_serve_with_the_config():
    unit = (REPO / "deploy" / "dicom-node.service").read_text()
    assert "ExecStart=/opt/dicom-node/.venv/bin/dicom-node serve --config /etc/dicom-node/node.yaml" in unit
    assert "[Install]" in unit and "Restart=on-failure" in unit


def test_default_rules_name_existing_profiles():
    rules = load_rules(REPO / "routing_rules.yaml", known_profiles=set(list_profiles()), known_destinations={"pacs"})
    assert {r.profile for r in rules.rules} <= set(list_profiles())
    assert yaml.safe_load((REPO / "routing_rules.yaml").read_text())["rules"]


def test_embedded_defaults_accept_the_shipped_rules(tmp_path, monkeypatch):
    """`dicom-node serve` with no config must start: every destination the default rules use exists."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    load_rules(cfg.rules, known_profiles=set(list_profiles(cfg.profiles)), known_destinations=set(cfg.destinations))
