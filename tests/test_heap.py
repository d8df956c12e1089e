"""The API server's heap (engine/heap.py): with glibc's tunables and the reserve, memory a compose thread
allocates comes from pages the process already has, not from page faults; the real server starts with both."""

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from knots_serve.serving.engine import heap

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# 32 MiB of tensors made and freed by a thread, as a compose does, after the reserve: its minor page faults
FAULTS = textwrap.dedent("""
    import resource, threading, torch
    from knots_serve.serving.engine import heap
    print(heap.reserve(64 << 20))
    def compose():
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(4):
            torch.ones(2 << 20)  # 8 MiB
        print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    t = threading.Thread(target=compose)
    t.start()
    t.join()
""")


def run(env_tunables: str | None) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k != heap.ENV}
    if env_tunables is not None:
        env[heap.ENV] = env_tunables
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    reserved, faults = map(int, out.stdout.split())
    return reserved, faults


def test_a_thread_s_tensors_take_no_fresh_pages_after_the_reserve():
    reserved, faults = run(heap.tunables())
    assert reserved == 64 << 20 and faults < 200  # 32 MiB from fresh pages would be 8 192 faults
    reserved, faults = run(None)  # glibc's defaults: nothing reserved (it would be handed back), every page new
    assert reserved == 0 and faults > 4000


def test_tunables_keep_what_the_operator_set():
    assert heap.tunables() == (
        "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1099511627776"
    )
    mine = heap.tunables("glibc.malloc.arena_max=4:glibc.cpu.hwcaps=-AVX512F")
    assert mine.startswith("glibc.malloc.arena_max=4:glibc.cpu.hwcaps=-AVX512F:") and mine.count("arena_max") == 1
    assert heap.reserve(0) == 0


def test_the_api_server_runs_with_the_tunables_and_a_touched_heap(server):
    """`knots-serve serve` execs vLLM with the tunables (/proc shows their first item only: glibc 2.36 ends each
    value it parses with a NUL in the original string, and the process reads a copy); the API server, that same
    process, reserved compose_heap_bytes (default 256 MiB) of heap at start, which stays resident."""
    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{server.pid}/environ").read_text().split("\0") if kv)
    assert heap.tunables().startswith(environ[heap.ENV])
    assert "256 MiB of heap touched for composes" in server.log.read_text()
    smaps = Path(f"/proc/{server.pid}/smaps").read_text().split("\n")
    at = next(i for i, line in enumerate(smaps) if line.endswith("[heap]"))
    rss_kb = next(int(line.split()[1]) for line in smaps[at:] if line.startswith("Rss:"))
    assert rss_kb >= 256 << 10
