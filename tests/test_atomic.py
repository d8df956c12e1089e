"""atomic.py: concurrent writers never collide, a failed write changes nothing, modes without os.umask."""

import json
import os
import stat
import threading
from unittest import mock

import pytest

from knots_serve.atomic import atomic_write_dir, atomic_write_file, atomic_write_json


def test_threads_writing_one_path_never_fail_and_leave_one_complete_document(tmp_path):
    path, errors = tmp_path / "state.json", []

    def write(i):
        try:
            for j in range(30):
                atomic_write_json(path, {"writer": i, "n": j, "pad": "x" * 10_000})
        except Exception as e:  # any failure fails the test below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    doc = json.loads(path.read_text())
    assert doc["n"] == 29 and doc["pad"] == "x" * 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporaries left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "b.bin"
    atomic_write_file(path, lambda tmp: tmp.write_bytes(b"old"))

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_file(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["b.bin"]
    with pytest.raises(OSError):
        atomic_write_dir(tmp_path / "d", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["b.bin"]


def test_modes_are_set_on_the_results_and_the_umask_is_never_touched(tmp_path):
    before = os.umask(0o077)  # a strict umask: results still get their ordinary modes
    try:
        with mock.patch("os.umask", side_effect=AssertionError("os.umask is process-wide")):
            f = atomic_write_json(tmp_path / "a.json", {"a": 1})
            d = atomic_write_dir(tmp_path / "dir", lambda tmp: (tmp / "x").write_text("1"))
            d = atomic_write_dir(d, lambda tmp: (tmp / "y").write_text("2"))  # replaces the old one
    finally:
        assert os.umask(before) == 0o077
    assert stat.S_IMODE(f.stat().st_mode) == 0o644 and stat.S_IMODE(d.stat().st_mode) == 0o755
    assert [p.name for p in d.iterdir()] == ["y"] and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "dir"]
