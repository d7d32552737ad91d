"""What the node writes to its log: one line per record, no forged lines, no PHI unless asked.

Values from the network or from files (AE titles, tag values, exception texts) can hold CR/LF,
escape sequences or megabytes: :func:`safe` escapes control characters and caps the length.
:class:`SafeFormatter` does the same to every formatted record (library warnings and tracebacks
included), so a log line is always one line; :func:`phi` hides patient identifiers unless
``log_phi: true``.  :func:`install` wires both and routes Python warnings through logging.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

__all__ = ["safe", "phi", "set_log_phi", "log_phi_enabled", "SafeFormatter", "install", "MAX_FIELD"]

#: longest value logged whole (longer ones are cut, with the length said)
MAX_FIELD = 200
#: longest log record (a traceback included) before it is cut
MAX_RECORD = 8000

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_log_phi = False


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")


def safe(value: Any, limit: int = MAX_FIELD) -> str:
    """``value`` as one printable line of at most ``limit`` characters (control characters escaped)."""
    text = _CONTROL.sub(_escape, str(value))
    if len(text) > limit:
        return f"{text[:limit]}...({len(text)} chars)"
    return text


def set_log_phi(enabled: bool) -> None:
    """Whether :func:`phi` shows values (``log_phi`` in node.yaml; default off)."""
    global _log_phi
    _log_phi = bool(enabled)


def log_phi_enabled() -> bool:
    return _log_phi


def phi(value: Any) -> str:
    """A patient identifier (name, ID, birth date, study date, a share path made of them) for a log
    line: ``<phi>`` unless ``log_phi`` is on, then the :func:`safe` value."""
    return safe(value) if _log_phi else "<phi>"


class SafeFormatter(logging.Formatter):
    """A formatter whose output is one line: newlines of messages and tracebacks become `` | ``,
    other control characters are escaped, and the record is capped at :data:`MAX_RECORD`."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        text = text.replace("\r\n", "\n").replace("\n", " | ")
        return safe(text, MAX_RECORD)


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    # library warnings (pydicom's validation, ...) quote data values: log them like everything else,
    # cut to MAX_FIELD, under the module that warned
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, safe(message), filename, lineno)


def install(handler: logging.Handler, *, log_phi: bool = False) -> None:
    """Give ``handler`` a :class:`SafeFormatter`, route Python warnings to logging, set ``log_phi``."""
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    warnings.showwarning = _showwarning
    set_log_phi(log_phi)
