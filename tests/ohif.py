"""Test helper: the OHIF viewer's published build served locally, reading Orthanc's DICOMweb.

    with OhifServer(dist, orthanc_url) as viewer:
        viewer.url                      # http://127.0.0.1:<port>/  (viewer?StudyInstanceUIDs=...)

The npm package ``@ohif/app`` ships a built ``dist/``; :func:`ohif_dist` unpacks it once under
``tests/.cache/ohif`` (``npm pack``, never committed).  One local HTTP server serves that folder
(``index.html`` for the app's routes), a generated ``app-config.js`` whose only data source is
DICOMweb at ``/dicom-web``, and forwards ``/dicom-web/...`` and ``/wado`` to Orthanc: the page
and its data come from one origin (no CORS), and no request leaves the machine.  Not a test
file: imported by the viewer test.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

__all__ = ["OHIF_VERSION", "OhifServer", "chromium_path", "ohif_dist"]

OHIF_VERSION = "3.13.2"
CACHE = Path(__file__).resolve().parent / ".cache" / "ohif"

APP_CONFIG = """window.config = {
  name: 'dicom-node test',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def ohif_dist(version: str = OHIF_VERSION) -> Path | None:
    """``dist/`` of ``@ohif/app@version`` (fetched with ``npm pack`` once); None without npm."""
    dist = CACHE / version / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        return None
    folder = CACHE / version
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([npm, "pack", f"@ohif/app@{version}", "--silent"], cwd=folder, capture_output=True,
                         text=True, timeout=600, check=False)
    tgz = folder / f"ohif-app-{version}.tgz"
    if res.returncode != 0 or not tgz.is_file():
        return None
    with tarfile.open(tgz) as tf:
        tf.extractall(folder, filter="data")
    tgz.unlink()
    return dist if (dist / "index.html").is_file() else None


def chromium_path() -> str | None:
    """Debian's Chromium (Playwright cannot download its own browser here)."""
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # the base class's parameter name
        pass

    def _proxy(self) -> None:
        body = None
        if self.command in ("POST", "PUT"):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        req = urllib.request.Request(self.server.upstream + self.path, data=body, method=self.command)
        for k in ("Accept", "Content-Type", "Range"):
            if self.headers.get(k):
                req.add_header(k, self.headers[k])
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:  # loopback only
                data, status, headers = resp.read(), resp.status, resp.headers
        except urllib.error.HTTPError as exc:
            data, status, headers = exc.read(), exc.code, exc.headers
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "content-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.requests.append((self.command, self.path, status))

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith(("/dicom-web/", "/wado")):
            self._proxy()
            return
        if path == "/app-config.js":
            data = self.server.app_config.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        target = Path(self.server.root) / path.lstrip("/")
        if path == "/" or not target.is_file():
            self.path = "/index.html"  # the app's own routes (/viewer, /segmentation, ...)
        super().do_GET()

    def do_POST(self) -> None:
        self._proxy()


class _Server(http.server.ThreadingHTTPServer):
    """The local web server with what its handlers read: the dist folder, Orthanc's DICOMweb
    root, the app config, and the log of forwarded requests."""

    root: str
    upstream: str
    app_config: str
    requests: list[tuple[str, str, int]]


class OhifServer:
    """OHIF's ``dist/`` and a DICOMweb forwarder on one local port (see the module docstring)."""

    def __init__(self, dist: Path, upstream: str, *, app_config: str = APP_CONFIG) -> None:
        def handler(*a: Any, **kw: Any) -> _Handler:
            return _Handler(*a, directory=str(dist), **kw)

        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.root = str(dist)
        self.httpd.upstream = upstream.rstrip("/")
        self.httpd.app_config = app_config
        self.httpd.requests = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request forwarded to Orthanc."""
        return list(self.httpd.requests)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
