"""Faults, in process: the registry file under SIGKILL, a full or unwritable merge cache, a merge evicted or
dropped while requests still use it. (Faults on the running server: test_faults_server.py.)"""

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
from test_composer import new_cache, pool, repool, sel

from knots_serve import atomic
from knots_serve.atomic import atomic_write_json
from knots_serve.serving.merges.adapter_cache import CacheUnavailable
from knots_serve.serving.state.registry import Overlay
from knots_serve.serving.state.store import FileStore, StoreUnavailable


def writer(path):
    """Fork a process that rewrites the state file forever; return its pid once one version is on disk."""
    ready, ping = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing but writes, until it is killed
        for i in range(10**9):
            atomic_write_json(path, {"added": {f"t{j}": f"/adapters/v{i}" for j in range(5000)}, "removed": []})
            if i == 0:
                os.write(ping, b"1")
    os.read(ready, 1)
    os.close(ready), os.close(ping)
    return pid


def test_a_registry_write_killed_at_any_point_leaves_the_old_or_the_new_state(tmp_path):
    """SIGKILL a process that rewrites the state file in a loop, at 30 random moments: the file always
    parses and is exactly one of the versions written, never a mix or a torn write."""
    path = tmp_path / "tasks.json"
    seen = set()
    for attempt in range(30):
        pid = writer(path)
        time.sleep(0.015 * (attempt % 8))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # what the server reads back at start (temporaries are ignored)
        tasks = Overlay({}, FileStore(tmp_path), "tasks").items()
        version = tasks["t0"]
        assert tasks == {f"t{j}": version for j in range(5000)}
        seen.add(version)
    assert len(seen) > 3  # killed at many different points


def test_a_failed_registry_write_changes_nothing(tmp_path, monkeypatch):
    state = tmp_path / "state"
    table = Overlay({"a": "1"}, FileStore(state), "tasks")
    table.put("b", "2")
    # the disk fills up when the temporary is flushed (fsync reports ENOSPC)
    monkeypatch.setattr(atomic, "_sync", mock.Mock(side_effect=OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(StoreUnavailable, match="No space left on device"):
        table.put("c", "3")
    with pytest.raises(StoreUnavailable, match="No space left on device"):
        table.delete("a")
    monkeypatch.undo()
    assert table.items() == {"a": "1", "b": "2"} == Overlay({"a": "1"}, FileStore(state), "tasks").items()
    assert [p.name for p in state.iterdir()] == ["tasks.json"]  # no temporary left


def test_a_state_file_this_server_wrote_and_an_operator_removed_before_the_next_poll_is_read_again(edge):
    """The files store's versions are file stamps: no file, a file, no file again between two polls would look
    unchanged, and the server would keep serving what it wrote (a flaky test fixture found it)."""
    from knots_serve.serving.state.experiments import Experiment

    async def test(server, mw, engine):
        arms = {"arms": {"a": {"model": "alpha", "weight": 1}, "b": {"model": "beta", "weight": 1}}}
        await server.put_experiment("ab", Experiment.model_validate(arms))
        server.store.path("experiments").unlink()  # removed by hand before the server polled
        await server.store_sync.apply()
        assert "ab" not in server.experiments

    edge(test)


def test_a_held_merge_is_never_evicted_and_a_dropped_one_is_deleted_by_its_last_release(tmp_path):
    composer = new_cache(pool(), tmp_path / "cache", cache_bytes=1, max_lora_rank=64)
    a = composer.get(sel("tasks:t0+t1"), hold=True)
    b = composer.get(sel("tasks:t2+t3"), hold=True)
    assert a.path.exists() and b.path.exists() and len(composer.cached()) == 2  # both in use: over the bound
    composer.release(a)
    c = composer.get(sel("tasks:t0+t2"))
    assert not a.path.exists() and b.path.exists() and [m.name for m in composer.cached()] == [b.name, c.name]
    composer.get(sel("tasks:t2+t3"), hold=True)  # b is held twice now
    repool(composer, pool(5))  # drops every merge; b is in use, so its files stay
    assert composer.cached() == [] and b.path.exists() and not c.path.exists()
    composer.release(b)
    assert b.path.exists()
    composer.release(b)
    assert not b.path.exists()


@contextlib.contextmanager
def read_only(path):
    """Make a directory unwritable, also for root (chattr +i), or skip where neither way is available."""
    if os.geteuid() != 0:
        path.chmod(0o500)
        try:
            yield
        finally:
            path.chmod(0o700)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory read-only for root here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_unwritable_cache_refuses_new_merges_and_keeps_serving_cached_ones(tmp_path):
    composer = new_cache(pool(), tmp_path / "cache", cache_bytes=1 << 20, max_lora_rank=64)
    cached = composer.get(sel("tasks:t0+t1"))
    with read_only(composer.cache_dir):
        with pytest.raises(CacheUnavailable, match=r"cannot write the merge 'tasks:t2\+t3@knots-ties' to the cache"):
            composer.get(sel("tasks:t2+t3"))
        assert composer.get(sel("tasks:t0+t1")) is cached and cached.path.exists()
    assert composer.get(sel("tasks:t2+t3")).path.exists()  # writable again: composes


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "shm"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_cache_evicts_idle_merges_to_make_room_or_refuses_clearly(tiny_tmpfs):
    composer = new_cache(pool(), tiny_tmpfs, cache_bytes=1 << 30, max_lora_rank=64)
    held = composer.get(sel("tasks:t0+t1"), hold=True)
    idle = composer.get(sel("tasks:t0+t2"))
    junk = tiny_tmpfs / "junk"
    junk.write_bytes(b"\0" * (free_bytes(tiny_tmpfs) - idle.nbytes // 2))  # room for less than one more merge
    made = composer.get(sel("tasks:t1+t2"), hold=True)  # full: the idle merge goes, the held one stays
    assert not idle.path.exists() and held.path.exists() and made.path.exists()
    (tiny_tmpfs / "junk2").write_bytes(b"\0" * max(0, free_bytes(tiny_tmpfs) - 1024))
    composer.release(held)
    composer.get(sel("tasks:t0+t1"), hold=True)
    with pytest.raises(CacheUnavailable, match="no space left on device"):
        composer.get(sel("tasks:t2+t3"))  # nothing idle is left to drop
    assert composer.get(sel("tasks:t0+t1")).path.exists()  # cached merges still there
    assert not [p for p in composer.cache_dir.iterdir() if p.name.startswith(".")]  # no half-written temporaries
    junk.unlink()
    (tiny_tmpfs / "junk2").unlink()
    assert composer.get(sel("tasks:t2+t3")).path.exists()


def test_an_adapter_file_truncated_after_loading_does_not_crash_the_process(tiny_adapters, tmp_path):
    """safetensors maps the file: tensors that still shared the map read past its end once the file was
    truncated in place, and the process died of SIGBUS (seen: the whole API server gone)."""
    shutil.copytree(tiny_adapters["gamma"], tmp_path / "gamma")
    code = (
        f"from knots_serve.adapters import load_adapter\n"
        f"a = load_adapter({str(tmp_path / 'gamma')!r})\n"
        f"open({str(tmp_path / 'gamma' / 'adapter_model.safetensors')!r}, 'r+b').truncate(100)\n"
        f"print(sum(float(m.delta().abs().sum()) for m in a.modules.values()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert float(r.stdout) > 0
