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
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

__all__ = ["safe", "phi", "set_log_phi", "log_phi_enabled", "log_context", "SafeFormatter", "install", "MAX_FIELD",
           "RecentErrors", "RECENT_ERRORS_KEPT"]

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


#: longest message of a library's log record (pydicom quotes whole values)
MAX_LIBRARY = 500
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_context = threading.local()


@contextmanager
def log_context(where: str) -> Iterator[None]:
    """Name what this thread works on (a file, an instance) in the library log lines it causes:
    pydicom's validation warnings, for one, name no file."""
    previous = getattr(_context, "where", None)
    _context.where = where
    try:
        yield
    finally:
        _context.where = previous


class SafeFormatter(logging.Formatter):
    """A formatter whose output is one line: control characters in the message are escaped, a
    traceback's lines are joined with `` | ``; a message is cut at :data:`MAX_RECORD` characters,
    a library's (any logger outside ``node``) at :data:`MAX_LIBRARY`, with what this thread works
    on (:func:`log_context`) added, and values it quotes hidden unless ``log_phi``."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if not record.name.startswith("node"):
            if not _log_phi:
                msg = _QUOTED.sub("'<value>'", msg)
            where = getattr(_context, "where", None)
            msg = safe(msg, MAX_LIBRARY) + (f" [{safe(where)}]" if where else "")
        else:
            msg = safe(msg, MAX_RECORD)
        record.message = msg
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        for extra in (self.formatException(record.exc_info) if record.exc_info else "",
                      self.formatStack(record.stack_info) if record.stack_info else ""):
            if extra:
                text += " | " + " | ".join(safe(line, 1000) for line in extra.splitlines())
        return safe(text, 3 * MAX_RECORD) if len(text) > 3 * MAX_RECORD else text


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    # Python warnings of libraries go to the log like everything else (a logger outside "node":
    # capped, quoted values hidden, the thread's context added), not to stderr
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


def install(handlers: Iterable[logging.Handler] | None = None, *, log_phi: bool | None = None,
            fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Give ``handlers`` (default: the root logger's) a :class:`SafeFormatter`, route Python
    warnings to logging (pydicom's are dropped there: it logs each one itself), set ``log_phi``."""
    formatter = SafeFormatter(fmt)
    for h in handlers if handlers is not None else logging.getLogger().handlers:
        h.setFormatter(formatter)
    warnings.showwarning = _showwarning
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    if log_phi is not None:
        set_log_phi(log_phi)


#: ERROR records :class:`RecentErrors` keeps
RECENT_ERRORS_KEPT = 20


class RecentErrors(logging.Handler):
    """Keeps this process's last ERROR log records (``at``, ``logger``, ``message``) in ``into``, for
    the console's health page (the node's, and the console process's own)."""

    def __init__(self, into: list[dict[str, Any]]) -> None:
        super().__init__(level=logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not break logging
            message = str(record.msg)
        self.into.append({"at": record.created, "logger": record.name, "message": message[:500]})
        del self.into[:-RECENT_ERRORS_KEPT]
