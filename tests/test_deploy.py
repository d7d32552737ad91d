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


def _unit(name: str) -> dict[str, dict[str, str]]:
    """A systemd unit's sections and keys (the last value of a key wins, as systemd's for ExecStart=)."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in (REPO / "deploy" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        else:
            assert current is not None and "=" in line, line
            key, value = line.split("=", 1)
            current[key] = value
    return sections


def test_dask_scheduler_unit_runs_a_dask_scheduler_with_options_it_knows():
    import shlex
    import subprocess
    import sys
    from pathlib import Path as P

    from node.cli import build_parser
    from node.cli.worker import scheduler_command

    unit = _unit("dicom-node-scheduler.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0] == "/opt/dicom-node/.venv/bin/dicom-node" and argv[1] == "scheduler" and "--port" in argv
    assert unit["Service"]["Restart"] == "always" and unit["Install"]["WantedBy"] == "multi-user.target"
    args = build_parser().parse_args(argv[1:])
    cmd, env = scheduler_command(host=args.host, port=args.port, dashboard_address=args.dashboard_address)
    assert cmd[-6:] == ["--host", "0.0.0.0", "--port", "8786", "--dashboard-address", ":8787"]
    dask = P(sys.executable).with_name("dask")
    if dask.exists():  # every option it runs `dask scheduler` with is one `dask scheduler` accepts
        helptext = subprocess.run([str(dask), "scheduler", "--help"], capture_output=True, text=True, timeout=60).stdout
        for opt in (a for a in cmd if a.startswith("--")):
            assert opt in helptext, opt


def test_dask_worker_unit_runs_dicom_node_worker_with_valid_arguments():
    import shlex

    from node.cli import build_parser

    unit = _unit("dicom-node-worker.service")
    svc = unit["Service"]
    env = {"DICOM_NODE_SCHEDULER": "tcp://10.1.2.40:8786", "DICOM_NODE_WORKER_GPUS": "1"}  # as the unit's comment writes them
    assert svc["EnvironmentFile"] == "/etc/dicom-node/worker.env" and svc["Restart"] == "always"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "/opt/dicom-node/.venv/bin/dicom-node" and argv[1] == "worker"
    for k, v in env.items():
        argv = [a.replace("${" + k + "}", v) for a in argv]
    args = build_parser().parse_args(argv[1:])
    assert (args.scheduler, args.gpus, args.once) == ("tcp://10.1.2.40:8786", 1, True)
    assert svc["KillMode"] == "mixed"  # the tries are child processes of the worker
    assert "/var/lib/dicom-node" in svc["ReadWritePaths"]


def test_example_node_yaml_with_the_dask_executor_is_valid(tmp_path):
    """The commented executor block of the example, uncommented (and gpus removed), loads."""
    text = (REPO / "deploy" / "node.example.yaml").read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("gpus:"):
            continue
        for key in ("# executor:", "#   kind: dask", "#   scheduler:"):
            if line.startswith(key):
                line = line.replace("# ", "", 1)
        lines.append(line)
    (tmp_path / "node.yaml").write_text("\n".join(lines) + "\n")
    cfg = load_config(tmp_path / "node.yaml")
    assert cfg.executor.kind == "dask" and cfg.executor.scheduler == "tcp://10.1.2.40:8786"
