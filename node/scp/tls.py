"""DICOM TLS: the SSL contexts of the receiver and the sender, and certificate expiry.

From ``node.yaml``'s ``tls:`` section (:class:`node.config.TLSConfig`): our certificate and key,
the CAs whose certificates we trust (peers', and a destination's), whether a peer must present a
certificate, and the TLS versions.  pynetdicom takes the contexts as they are (``ssl_context`` of
its server, ``tls_args`` of ``associate``); the handshake itself runs in the connection's thread
under the ACSE deadline (node/scp/guard.py).
"""

from __future__ import annotations

import importlib
import logging
import ssl
import time
from pathlib import Path

from node.config import TLSConfig

__all__ = ["server_context", "client_context", "certificate_expiry", "expiry_warning"]

log = logging.getLogger("node.scp.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _versions(ctx: ssl.SSLContext, tls: TLSConfig) -> None:
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.max_version:
        ctx.maximum_version = _VERSIONS[tls.max_version]


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The receiver's context: our certificate; peers' certificates checked against
    ``ca_certificates`` (required, or checked only when presented)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _versions(ctx, tls)
    ctx.load_cert_chain(str(tls.certificate), str(tls.key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: TLSConfig | None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """The sender's context: the destination's certificate checked against ``ca_certificates``
    (else the system's CAs); ours presented when configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return ctx
    _versions(ctx, tls)
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.load_cert_chain(str(tls.certificate), str(tls.key))
    return ctx


def certificate_expiry(path: Path) -> float | None:
    """The ``notAfter`` of the (first) certificate in a PEM file, as a POSIX time; None if unreadable.

    The standard library decodes a certificate only in ``_ssl._test_decode_cert`` (used by its own
    tests, present since Python 2.7); the node has no other X.509 parser to depend on.
    """
    try:
        decode = importlib.import_module("_ssl")._test_decode_cert
        info = decode(str(path))
        return float(ssl.cert_time_to_seconds(info["notAfter"]))
    except Exception:  # noqa: BLE001 - best effort: an unreadable date is reported as unknown
        return None


def expiry_warning(tls: TLSConfig, now: float | None = None) -> str | None:
    """A warning when our certificate expires within ``expiry_warning_days`` (or has expired)."""
    expires = certificate_expiry(tls.certificate)
    if expires is None:
        return f"TLS certificate {tls.certificate}: cannot read its expiry date"
    left = (expires - (now if now is not None else time.time())) / 86400.0
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))
    if left < 0:
        return f"TLS certificate {tls.certificate} EXPIRED on {when}: peers will refuse the node"
    if left < tls.expiry_warning_days:
        return f"TLS certificate {tls.certificate} expires in {left:.0f} day(s), on {when}: renew it"
    return None
