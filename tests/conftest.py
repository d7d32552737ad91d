"""Shared fixtures."""

from __future__ import annotations

import pytest
from console_helpers import browser, console_node  # noqa: F401 - fixtures of the console tests
from pg_helpers import pg_cluster, pg_url  # noqa: F401 - the throwaway PostgreSQL fixtures, for every module


@pytest.fixture
def orthanc(tmp_path):
    """A running Orthanc (tests/orthanc.py) in tmp_path/orthanc, stopped afterwards.

    Knows the node as modality ``NODE`` = (DICOMNODE, 127.0.0.1, 11112).
    """
    from orthanc import Orthanc, orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    pacs = Orthanc(tmp_path / "orthanc", modalities={"NODE": ("DICOMNODE", "127.0.0.1", 11112)})
    try:
        yield pacs
    finally:
        pacs.stop()
