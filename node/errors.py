"""Exception types shared by every stage; their class decides fail-now vs retry.

``InputError`` and its subclasses (bad input) and ``BackendUnavailable`` (a backend's package
or model is missing) fail a job at once; anything else is treated as transient and retried
(docs/architecture.md, Retries and errors).  Every message says what is wrong and where (file,
tag, field) in one line, so the CLI, the log and the job store can show it verbatim.
"""

from __future__ import annotations

from pathlib import Path


class NodeError(Exception):
    """Base class for all errors raised by the node."""


class InputError(NodeError):
    """The input (a DICOM file, a series, a profile, a rule file) is unusable.

    Args:
        message: one-line description of the problem.
        path: the file the problem was found in, if any.
        tag: the DICOM keyword or configuration field at fault, if any.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, tag: str | None = None) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.tag = tag
        parts = []
        if self.path:
            parts.append(self.path)
        if tag:
            parts.append(tag)
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class SeriesError(InputError):
    """A DICOM series cannot be turned into a volume (geometry, decoding, identity)."""


class ProfileError(InputError):
    """An organ profile file is invalid or cannot be found."""


class BackendUnavailable(NodeError):
    """A segmentation backend's package or model is not installed.

    The message carries the exact command (or folder) needed to fix it.
    """
