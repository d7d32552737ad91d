"""node.durable: atomic writes leave either the old file or the new one, never a partial one."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from node.durable import atomic_copy, atomic_open, atomic_write


def test_atomic_write_creates_folders_and_mode(tmp_path):
    target = tmp_path / "a" / "b" / "f.bin"
    atomic_write(target, b"hello")
    assert target.read_bytes() == b"hello"
    # patient data: 0640 files and 0750 folders by default, whatever the umask (issue 17 item 11)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(target.parent.parent.stat().st_mode) == 0o750
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_configured_modes(tmp_path):
    from node.durable import dir_mode, file_mode, set_modes

    before = (file_mode(), dir_mode())
    old_umask = os.umask(0)  # a permissive umask changes nothing
    try:
        set_modes(0o600, 0o700)
        atomic_write(tmp_path / "d" / "f", b"x")
        atomic_copy(tmp_path / "d" / "f", tmp_path / "e" / "g")
        for f in (tmp_path / "d" / "f", tmp_path / "e" / "g"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
            assert stat.S_IMODE(f.parent.stat().st_mode) == 0o700
    finally:
        os.umask(old_umask)
        set_modes(*before)


def test_failure_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("disk pulled")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_copy_returns_size_and_digest(tmp_path):
    src = tmp_path / "src"
    data = bytes(range(256)) * 10000
    src.write_bytes(data)
    size, digest = atomic_copy(src, tmp_path / "out" / "dst")
    assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out" / "dst").read_bytes() == data


def test_folder_fsync_shared_by_concurrent_renames_never_before_each_rename(tmp_path):
    """Every caller returns only after a folder fsync that began after its rename has ended; renames
    waiting while an fsync runs share the next one; another folder does not wait for this one."""
    import itertools
    import threading

    from node.durable import FolderSync, fsync_dir

    log: list[tuple[str, str, int]] = []
    lock = threading.Lock()
    first_may_end = threading.Event()
    numbers = itertools.count()

    def fsync(path: str) -> None:
        with lock:
            n = next(numbers)
            log.append(("begin", path, n))
        if n == 0:
            first_may_end.wait(10)  # a slow disk: the renames behind it queue
        fsync_dir(path)
        with lock:
            log.append(("end", path, n))

    sync = FolderSync(fsync)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()

    def write(folder, k: int) -> None:
        tmp = folder / f".{k}.tmp"
        tmp.write_bytes(b"x")
        os.replace(tmp, folder / f"{k}.dcm")
        with lock:
            log.append(("rename", str(folder), k))
        sync.after_rename(folder)
        with lock:
            log.append(("return", str(folder), k))

    first = threading.Thread(target=write, args=(a, 0))
    first.start()
    while not log or log[-1][0] != "begin":
        threading.Event().wait(0.001)
    others = [threading.Thread(target=write, args=(a, k)) for k in range(1, 12)]
    for t in others:
        t.start()
    while sync.renames < 12:
        threading.Event().wait(0.001)
    write(b, 99)  # another folder: its own fsync at once, not behind a's
    first_may_end.set()
    for t in [first, *others]:
        t.join(10)
    assert sorted(k for e, f, k in log if e == "return" and f == str(a)) == list(range(12))
    for i, (event, folder, k) in enumerate(log):
        if event != "rename":
            continue
        back = next(j for j, e in enumerate(log) if e == ("return", folder, k))
        began_after = {n for e, f, n in log[i:back] if e == "begin" and f == folder}
        assert any(("end", folder, n) in log[i:back] for n in began_after), (folder, k)
    assert sync.fsyncs == 3  # a: the first rename alone, then one for the 11 that queued; b: one
    assert not sync._folders  # nothing kept once nobody waits


def test_a_forked_child_does_not_inherit_a_held_folder_sync(tmp_path):
    """A child forked while a thread of its parent is inside the folder fsync writes durably on its own."""
    import threading

    from node import durable

    held = durable.FOLDER_SYNC._lock
    held.acquire()  # as if another thread were inside after_rename when the fork happens
    try:
        pid = os.fork()
        if pid == 0:  # the child: its durable write must not wait for the parent's lock
            code = 1
            try:
                t = threading.Thread(target=atomic_write, args=(tmp_path / "child" / "f", b"x"), daemon=True)
                t.start()
                t.join(5)
                code = 0 if not t.is_alive() and (tmp_path / "child" / "f").read_bytes() == b"x" else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        held.release()
    assert os.waitstatus_to_exitcode(status) == 0
