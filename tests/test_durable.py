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
