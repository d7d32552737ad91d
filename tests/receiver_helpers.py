"""A running receiver on a free loopback port with its own store, for the receiver tests
(not a test file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node.config import NodeConfig
from node.scp.receiver import Receiver
from node.store import Store


def make_receiver(tmp_path: Path, **cfg: Any) -> tuple[Receiver, Store]:
    """Start a receiver whose node.yaml is ``cfg`` (storage under ``tmp_path``); the caller stops it."""
    config = NodeConfig(port=0, bind_address="127.0.0.1", storage=tmp_path / "var", **cfg)
    store = Store(config.database_path)
    rx = Receiver(config, store)
    rx.start()
    return rx, store
