"""node.durable: atomic writes leave either the old file or the new one, never a partial one."""

from __future__ import annotations

import hashlib
import stat

import pytest

from node.durable import atomic_copy, atomic_open, atomic_write


def test_atomic_write_creates_folders_and_mode(tmp_path):
    target = tmp_path / "a" / "b" / "f.bin"
    atomic_write(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


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
