"""DICOM TLS with real peers (issue 17 item 13): DCMTK ``storescu +tls`` sending to the node with
good, expired, untrusted and missing client certificates, the node sending to ``storescp +tls``,
the plain port beside the TLS port or not, and the certificate expiry warning."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from node.config import NodeConfig, TLSConfig
from node.scp.receiver import Receiver
from node.scp.sender import send_datasets
from node.scp.tls import client_context, expiry_warning
from node.store import Store

needs_tools = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("storescu") is None,
                                 reason="openssl and DCMTK needed")
REPO = Path(__file__).resolve().parent.parent

_CA_CNF = """
[ ca ]
default_ca = CA_default
[ CA_default ]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/new
serial = {dir}/serial
default_md = sha256
policy = policy_any
copy_extensions = copy
unique_subject = no
[ policy_any ]
commonName = supplied
"""


def _ssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
         "-days", "30", "-subj", f"/CN={name}", cwd=d)


def _signed(d: Path, ca: str, name: str, *, days: int = 30, start: str | None = None, end: str | None = None,
            san: str = "DNS:localhost,IP:127.0.0.1") -> None:
    _ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}", cwd=d)
    if start is None:
        _ssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", str(days), "-copy_extensions", "copy", cwd=d)
        return
    ca_dir = d / f"{ca}-db"
    (ca_dir / "new").mkdir(parents=True, exist_ok=True)
    (ca_dir / "index.txt").touch()
    (ca_dir / "serial").write_text("1000\n")
    (ca_dir / "ca.cnf").write_text(_CA_CNF.format(dir=ca_dir))
    _ssl("ca", "-batch", "-config", str(ca_dir / "ca.cnf"), "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key",
         "-in", f"{name}.csr", "-out", f"{name}.pem", "-startdate", start, "-enddate", str(end), "-notext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "otherca")
    _signed(d, "ca", "node")
    _signed(d, "ca", "client")
    _signed(d, "ca", "expired", start="20200101000000Z", end="20200201000000Z")
    _signed(d, "otherca", "stranger")
    _signed(d, "ca", "peer")  # storescp's
    _signed(d, "ca", "soon", days=5)
    return d


def tls_cfg(pki: Path, **kw: Any) -> dict[str, Any]:
    return {"certificate": pki / "node.pem", "key": pki / "node.key", "ca_certificates": pki / "ca.pem",
            "port": _free_port(), **kw}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls_node(tmp_path: Path, pki: Path):
    config = NodeConfig(port=0, bind_address="127.0.0.1", storage=tmp_path / "var",
                        timeouts={"acse_s": 5, "dimse_s": 10, "network_s": 10}, tls=tls_cfg(pki))
    store = Store(config.database_path)
    rx = Receiver(config, store)
    rx.start()
    yield rx, store
    rx.stop()
    store.close()


def ct_file(tmp_path: Path) -> Path:
    from test_hostile_peers import EXPLICIT, ct_dataset, encode, part10

    uid = "1.2.826.0.1.3680043.8.498.17.13." + str(int(time.time() * 1000) % 10**9)
    return part10(tmp_path / "ct.dcm", uid, EXPLICIT, encode(ct_dataset(uid)))


def storescu(port: int, f: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-aec", "DICOMNODE", *tls, "127.0.0.1", str(port), str(f)],
                          capture_output=True, text=True, timeout=30)


@needs_tools
def test_storescu_tls_with_good_expired_untrusted_and_missing_client_certificates(tls_node, pki, tmp_path, caplog):
    rx, store = tls_node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    f = ct_file(tmp_path)
    port = rx.tls_port
    assert port is not None
    # a peer that opens the TLS port and never says hello stalls neither the accept loop nor others
    import socket

    silent = socket.create_connection(("127.0.0.1", port))
    ok = storescu(port, f, "+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem"))
    assert ok.returncode == 0, ok.stderr
    assert store.count_instances() == 1
    for name, args in {
        "expired": ("+tls", str(pki / "expired.key"), str(pki / "expired.pem"), "+cf", str(pki / "ca.pem")),
        "untrusted": ("+tls", str(pki / "stranger.key"), str(pki / "stranger.pem"), "+cf", str(pki / "ca.pem")),
        "missing": ("+tla", "+cf", str(pki / "ca.pem")),
        "plain to the TLS port": (),
    }.items():
        caplog.clear()
        bad = storescu(port, f, *args)
        assert bad.returncode != 0, name
        deadline = time.monotonic() + 5
        while "TLS handshake with 127.0.0.1 failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "TLS handshake with 127.0.0.1 failed" in caplog.text, (name, caplog.text)
    # the plain port beside it still works
    plain = storescu(rx.port, f)
    assert plain.returncode == 0, plain.stderr
    silent.settimeout(8)
    assert silent.recv(10) == b""  # closed at the ACSE deadline (5 s)
    silent.close()


@needs_tools
def test_expired_and_untrusted_reasons_are_logged(tls_node, pki, tmp_path, caplog):
    rx, _ = tls_node
    caplog.set_level(logging.WARNING, logger="node.scp.guard")
    f = ct_file(tmp_path)
    storescu(rx.tls_port or 0, f, "+tls", str(pki / "expired.key"), str(pki / "expired.pem"), "+cf",
             str(pki / "ca.pem"))
    time.sleep(0.5)
    assert "certificate verify failed: certificate has expired" in caplog.text, caplog.text
    caplog.clear()
    storescu(rx.tls_port or 0, f, "+tls", str(pki / "stranger.key"), str(pki / "stranger.pem"), "+cf",
             str(pki / "ca.pem"))
    time.sleep(0.5)
    assert "certificate verify failed: unable to get local issuer certificate" in caplog.text, caplog.text


@needs_tools
def test_optional_client_certificate_and_tls_only(tmp_path, pki):
    config = NodeConfig(port=_free_port(), bind_address="127.0.0.1", storage=tmp_path / "var",
                        tls=tls_cfg(pki, require_client_certificate=False, plain_port=False, min_version="1.2"))
    store = Store(config.database_path)
    rx = Receiver(config, store)
    rx.start()
    try:
        f = ct_file(tmp_path)
        anon = storescu(rx.tls_port or 0, f, "+tla", "+cf", str(pki / "ca.pem"))
        assert anon.returncode == 0, anon.stderr
        plain = storescu(config.port, f)  # no plain port
        assert plain.returncode != 0
    finally:
        rx.stop()
        store.close()


@needs_tools
def test_node_sends_to_storescp_over_tls(tmp_path, pki):
    out = tmp_path / "received"
    out.mkdir()
    port = _free_port()
    scp = subprocess.Popen(["storescp", "-aet", "PEER", "+tls", str(pki / "peer.key"), str(pki / "peer.pem"),
                            "+cf", str(pki / "ca.pem"), "-od", str(out), str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        tls = TLSConfig(certificate=pki / "client.pem", key=pki / "client.key", ca_certificates=pki / "ca.pem")
        f = ct_file(tmp_path)
        dest = NodeConfig(destinations={"peer": {"ae_title": "PEER", "host": "127.0.0.1", "port": port,
                                                 "tls": True, "server_name": "localhost"}}).destination("peer")
        res = send_datasets([f], dest, calling_ae="DICOMNODE", timeouts=10, tls=client_context(tls))
        assert res.ok, res.summary()
        assert len(list(out.iterdir())) == 1
        # a peer whose certificate we do not trust is refused (the sender checks it)
        other = TLSConfig(certificate=pki / "client.pem", key=pki / "client.key", ca_certificates=pki / "otherca.pem")
        from node.scp.sender import DestinationUnavailable

        with pytest.raises(DestinationUnavailable):
            send_datasets([f], dest, calling_ae="DICOMNODE", timeouts=10, tls=client_context(other))
    finally:
        scp.terminate()
        scp.wait(10)


def test_certificate_expiry_warning(pki):
    soon = TLSConfig(certificate=pki / "soon.pem", key=pki / "soon.key", ca_certificates=pki / "ca.pem")
    w = expiry_warning(soon)
    assert w is not None and "expires in" in w and "renew" in w
    assert expiry_warning(soon.model_copy(update={"expiry_warning_days": 3})) is None
    old = TLSConfig(certificate=pki / "expired.pem", key=pki / "expired.key", ca_certificates=pki / "ca.pem")
    assert "EXPIRED" in (expiry_warning(old) or "")


def test_tls_config_is_validated_at_the_door(tmp_path, pki):
    from node.config import ConfigError, load_config

    y = tmp_path / "node.yaml"
    y.write_text(f"tls:\n  certificate: {pki / 'node.pem'}\n  key: {tmp_path / 'nokey.pem'}\n"
                 f"  ca_certificates: {pki / 'ca.pem'}\n")
    with pytest.raises(ConfigError, match="tls.key: no such file"):
        load_config(y)
    y.write_text(f"tls:\n  certificate: {pki / 'node.pem'}\n  key: {pki / 'node.key'}\n")
    with pytest.raises(ConfigError, match="needs ca_certificates"):
        load_config(y)
