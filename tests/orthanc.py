"""Test helper: a real Orthanc (the Debian package) as the PACS, in a temp folder.

    with Orthanc(tmp_path / "orthanc", modalities={"NODE": ("DICOMNODE", "127.0.0.1", 11112)}) as pacs:
        pacs.dicom_port, pacs.http_port, pacs.aet
        pacs.stop(); pacs.start()          # PACS down / back, same ports and storage
        pacs.series(); pacs.seg_series(); pacs.instance_tags(iid); pacs.download(iid, path)

The generated ``orthanc.json`` listens on free loopback ports, stores under the
temp folder, loads no plugins, allows no remote HTTP access and needs no
authentication, accepts C-STORE from any AE (``DicomAlwaysAllowStore``), does
not check the called AE, and lists the given modalities (so Orthanc could send
back to the node).  Not a test file: imported by the tests and the benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Orthanc", "ORTHANC_BIN", "orthanc_available", "free_port"]

ORTHANC_BIN = os.environ.get("ORTHANC_BIN") or shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def orthanc_available() -> bool:
    return Path(ORTHANC_BIN).is_file() and os.access(ORTHANC_BIN, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Orthanc:
    """A throw-away Orthanc server.

    Args:
        workdir: folder for the config, storage, index and log (created).
        aet: Orthanc's AE title.
        modalities: name -> (AE title, host, port) of peers Orthanc knows.
        config: extra/overriding ``orthanc.json`` keys.
        start: start at once (default True).
        auth: (user, password): HTTP basic authentication required (this helper's own requests use it).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        config: Mapping[str, Any] | None = None,
        start: bool = True,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        cfg: dict[str, Any] = {
            "Name": f"test-{aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": False,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "DicomModalitiesInDatabase": False,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "StableAge": 60,
            "DicomAssociationCloseDelay": 0,
            "OverwriteInstances": True,
        }
        self.auth = auth
        if auth is not None:
            cfg.update({"AuthenticationEnabled": True, "RegisteredUsers": {auth[0]: auth[1]}})
        cfg.update(config or {})
        self.config = cfg
        self.config_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: Any = None
        if start:
            self.start()

    # -- life cycle -------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def address(self) -> tuple[str, str, int]:
        """(AE title, host, port) to C-STORE to."""
        return (self.aet, "127.0.0.1", self.dicom_port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start Orthanc and wait until its REST API answers (same ports, same storage as before)."""
        if self.running:
            return
        deadline = time.monotonic() + timeout_s
        # after a stop the kernel may hold the ports a moment
        while not (_port_free(self.dicom_port) and _port_free(self.http_port)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc ports {self.dicom_port}/{self.http_port} stay busy")
            time.sleep(0.1)
        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [ORTHANC_BIN, str(self.config_path)],
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            cwd=str(self.workdir),
            start_new_session=True,
        )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system")
                if self._dicom_listening():
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer within {timeout_s} s; log:\n{self.log_tail()}")
            time.sleep(0.1)

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL); storage and ports are kept for :meth:`start`."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> "Orthanc":
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- REST -------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.auth is not None:
            import base64

            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # loopback only
            return resp.read()

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        out = self._request("POST", path, data)
        return json.loads(out) if out.strip() else None

    def delete(self, path: str) -> None:
        self._request("DELETE", path)

    def statistics(self) -> dict[str, Any]:
        return self.get("/statistics")

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def series(self) -> list[dict[str, Any]]:
        """Every series, expanded (``MainDicomTags``, ``Instances``, ``ParentStudy`` ...)."""
        return list(self.get("/series?expand"))

    def find_series(self, **tags: str) -> list[dict[str, Any]]:
        """Series whose main DICOM tags equal ``tags`` (e.g. ``Modality="SEG"``)."""
        return [
            s for s in self.series() if all(s.get("MainDicomTags", {}).get(k) == v for k, v in tags.items())
        ]

    def seg_series(self) -> list[dict[str, Any]]:
        return self.find_series(Modality="SEG")

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/series/{series_id}/instances"))

    def instance_tags(self, instance_id: str, *, simplified: bool = True) -> dict[str, Any]:
        """Tags of an instance: keyword -> value (``simplified``) or the full ``/tags`` JSON."""
        return self.get(f"/instances/{instance_id}/simplified-tags" if simplified else f"/instances/{instance_id}/tags")

    def download(self, instance_id: str, dest: str | Path) -> Path:
        """The instance's DICOM file as Orthanc stored it."""
        dest = Path(dest)
        dest.write_bytes(self.get_bytes(f"/instances/{instance_id}/file"))
        return dest

    def wait_for(self, predicate: Any, timeout_s: float = 30.0, interval_s: float = 0.25) -> Any:
        """Poll ``predicate()`` until it returns something truthy (returned) or time runs out (None)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = predicate()
            except (urllib.error.URLError, ConnectionError, OSError):
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                return None
            time.sleep(interval_s)
