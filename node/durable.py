"""Durable, atomic file writes shared by every stage that persists data.

A reader (a PACS pulling the share, the node after a crash) must never see a
half-written file: everything is written to a temporary name in the target's
folder, fsynced, renamed over the target, and the folder fsynced so the rename
itself survives a power cut (threads that renamed into the same folder share that fsync:
:class:`FolderSync`).  Files get the node's file mode and the folders it creates its folder
mode (:func:`set_modes`; 0640 / 0750 unless ``node.yaml`` says otherwise): they hold patient data.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


_modes = {"file": 0o640, "dir": 0o750}


def set_modes(file_mode: int, dir_mode: int) -> None:
    """The modes of every file written and folder created from here on (in this process)."""
    _modes["file"], _modes["dir"] = int(file_mode), int(dir_mode)


def file_mode() -> int:
    return _modes["file"]


def dir_mode() -> int:
    return _modes["dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames/creations inside it are durable (best effort)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Folder:
    __slots__ = ("renames", "synced", "running", "users", "cond")

    def __init__(self, lock: threading.Lock) -> None:
        self.renames = 0  # renames announced so far (each finished before it was announced)
        self.synced = 0  # every rename numbered up to this is covered by a finished fsync
        self.running = False
        self.users = 0
        self.cond = threading.Condition(lock)


class FolderSync:
    """The fsync of a folder after a rename into it, shared by the threads of this process.

    An fsync of a folder makes durable every change to it made before the fsync *began*.  So a
    thread whose rename is finished needs a folder fsync that began after that: if none is
    running, it runs one itself (and notes how many renames were announced when it began: all of
    them are covered when it returns); if one is running, it may have begun before the rename, so
    the thread waits for it and looks again; one fsync begun after several renames covers them all.
    No thread returns before a folder fsync that began after its rename has returned, so
    "durable before acknowledged" holds exactly as with one fsync per rename; fewer fsyncs run
    only when several threads rename into the same folder at the same time.  Other processes
    (other node hosts on a shared spool) run their own.
    """

    def __init__(self, fsync: Callable[[str], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._folders: dict[str, _Folder] = {}
        self._fsync = fsync or fsync_dir
        #: folder fsyncs run and renames covered (for tests and benchmarks)
        self.fsyncs = 0
        self.renames = 0

    def after_rename(self, folder: str | os.PathLike[str]) -> None:
        """Return once a fsync of ``folder`` that began after this call did (the caller's rename
        into it is finished before the call)."""
        key = os.fspath(folder)
        with self._lock:
            f = self._folders.get(key)
            if f is None:
                f = self._folders[key] = _Folder(self._lock)
            f.users += 1
            f.renames += 1
            self.renames += 1
            mine = f.renames
            try:
                while f.synced < mine:
                    if f.running:  # it may have begun before this rename: wait, then look again
                        f.cond.wait()
                        continue
                    f.running, began = True, f.renames
                    self._lock.release()
                    ok = False
                    try:
                        self._fsync(key)
                        ok = True
                    finally:
                        self._lock.acquire()
                        f.running = False
                        if ok:
                            f.synced = max(f.synced, began)
                            self.fsyncs += 1
                        f.cond.notify_all()
            finally:
                f.users -= 1
                if f.users == 0:
                    del self._folders[key]


#: the process's folder syncs, used by :func:`atomic_open`
FOLDER_SYNC = FolderSync()


def _fresh_after_fork() -> None:
    # a child forked while another thread held the lock or ran an fsync would wait forever
    global FOLDER_SYNC
    FOLDER_SYNC = FolderSync()


os.register_at_fork(after_in_child=_fresh_after_fork)


def makedirs_durable(path: str | os.PathLike[str]) -> None:
    """``mkdir -p`` that fsyncs the parent of every folder it creates (made with :func:`dir_mode`)."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        os.chmod(d, _modes["dir"])  # exactly, whatever the umask
        fsync_dir(d.parent)


@contextmanager
def atomic_open(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for binary writing; on success it is
    fsynced and renamed onto ``path`` (and the folder fsynced); on error it is removed."""
    target = Path(path)
    makedirs_durable(target.parent)
    # the writer's host and pid in the name: on storage several hosts share, a start-up cleanup
    # removes only temp files whose writer is gone (see tmp_writer_gone)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _modes["file"] if mode is None else mode)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    FOLDER_SYNC.after_rename(target.parent)  # fsync_dir, shared with concurrent renames into the folder


_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"
#: a temp file of another host older than this is a leftover of a write that never completed
STALE_TMP_S = 3600.0


def tmp_writer_gone(path: str | os.PathLike[str], *, now: float | None = None) -> bool:
    """Whether the temp file ``path`` (from :func:`atomic_open`) is a leftover of a write that can no
    longer complete: written on this host by a process that no longer exists, written on another
    host more than :data:`STALE_TMP_S` ago (that host may still be writing it), or named as
    versions before shared storage named them (one host: no writer left after a restart)."""
    p = Path(path)
    parts = p.name.rsplit(".", 3)  # ".<name>.<host>-<pid>.<random>.tmp" -> [..., "<host>-<pid>", random, "tmp"]
    host, _, pid = parts[1].rpartition("-") if len(parts) == 4 else ("", "", "")
    if not (host and pid.isdigit()):
        return True
    if host == _HOST:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's live process
            return False
        return False  # its writer is alive: a write in flight
    try:
        age = (now if now is not None else time.time()) - p.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_TMP_S


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` atomically; returns ``(size, sha256 hex)`` of what was written."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fi, atomic_open(dst) as fo:
        while chunk := fi.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
            fo.write(chunk)
    return size, h.hexdigest()
