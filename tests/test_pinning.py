"""Pinned merges: the tensor-parallel shard math (simulated), and on the real server: pinned outputs equal
vLLM on the merged full model, unpin restores the base, A -> B -> A, and a swap under load."""

import subprocess
import threading

import openai
import pytest
import torch
from conftest import ADMIN_KEY
from server_process import CLI, start_server
from test_serving import PROMPTS, complete, http

from knots_serve.serving.engine.pinning import placement


def vllm_shard(W, kind, tp, rank, heads=None):
    """What a worker holds, written independently of `placement`: torch.chunk along the split dim;
    k/v with fewer heads than tp are replicated (worker r holds head block r // (tp // heads))."""
    if kind == "row":
        return W.chunk(tp, dim=1)[rank]
    if heads is not None and heads < tp:
        return W.chunk(heads, dim=0)[rank // (tp // heads)]
    return W.chunk(tp, dim=0)[rank]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_shard_math_writes_each_workers_slice(tp, kv_heads):
    g = torch.Generator().manual_seed(tp * 10 + kv_heads)
    hd, heads, hidden, inter = 4, 8, 32, 48
    full = {
        "q": (heads * hd, hidden),
        "k": (kv_heads * hd, hidden),
        "v": (kv_heads * hd, hidden),
        "o": (hidden, heads * hd),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }
    W = {n: torch.randn(s, generator=g) for n, s in full.items()}
    D = {n: torch.randn(s, generator=g) for n, s in full.items()}
    names = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    reps = max(1, tp // kv_heads)
    for rank in range(tp):
        local = {  # the packed local parameters as vLLM lays them out
            "model.layers.0.self_attn.qkv_proj.weight": torch.cat(
                [
                    vllm_shard(W["q"], "col", tp, rank),
                    vllm_shard(W["k"], "col", tp, rank, kv_heads),
                    vllm_shard(W["v"], "col", tp, rank, kv_heads),
                ]
            ),
            "model.layers.0.mlp.gate_up_proj.weight": torch.cat(
                [vllm_shard(W["gate"], "col", tp, rank), vllm_shard(W["up"], "col", tp, rank)]
            ),
            "model.layers.0.self_attn.o_proj.weight": vllm_shard(W["o"], "row", tp, rank).clone(),
            "model.layers.0.mlp.down_proj.weight": vllm_shard(W["down"], "row", tp, rank).clone(),
        }
        kv_local = max(1, kv_heads // tp)  # vLLM's output_sizes: local heights × tp
        packed = {n: ([heads * hd, kv_local * hd * tp, kv_local * hd * tp], [1, reps, reps]) for n in "qkv"}
        packed |= {n: ([inter, inter], None) for n in ("gate", "up")}
        for n, module in names.items():
            p = placement(f"model.layers.0.{module}", full[n], *packed.get(n, (None, None)), tp, rank)
            local[p.param][p.rows] += D[n][p.src_rows, p.src_cols]
        want_qkv = torch.cat(
            [vllm_shard(W[n] + D[n], "col", tp, rank, None if n == "q" else kv_heads) for n in ("q", "k", "v")]
        )
        assert torch.equal(local["model.layers.0.self_attn.qkv_proj.weight"], want_qkv)
        want_gu = torch.cat([vllm_shard(W[n] + D[n], "col", tp, rank) for n in ("gate", "up")])
        assert torch.equal(local["model.layers.0.mlp.gate_up_proj.weight"], want_gu)
        for n, param in (("o", "self_attn.o_proj"), ("down", "mlp.down_proj")):
            assert torch.equal(local[f"model.layers.0.{param}.weight"], vllm_shard(W[n] + D[n], "row", tp, rank))


MERGE = "tasks:alpha+beta@knots-ties?basis=subset"
OTHER = "tasks:beta+gamma@core-ta"


def pin(server, model):
    status, body = http(server, "POST", "/admin/pin", {"model": model}, key=ADMIN_KEY)
    assert status == 200, body
    return body["pinned"]


def unpin(server):
    status, body = http(server, "DELETE", "/admin/pin", key=ADMIN_KEY)
    assert status == 200, body


@pytest.fixture(scope="module")
def full_model_outputs(server, tiny_base, tiny_adapters, tmp_path_factory):
    """Greedy outputs of vLLM started on the merged full model written by `knots-serve merge --format full`."""
    root = tmp_path_factory.mktemp("full")
    r = subprocess.run(
        [
            CLI,
            "merge",
            f"--adapter=alpha={tiny_adapters['alpha']}",
            f"--adapter=beta={tiny_adapters['beta']}",
            "--method",
            "knots-ties",
            "--format",
            "full",
            "--base",
            str(tiny_base),
            "--out",
            str(root / "model"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    config = {k: v for k, v in server.config.items() if k not in ("tasks", "merges", "experiments", "port")}
    config |= {
        "model": str(root / "model"),
        "cache_dir": f"{server.config['cache_dir']}-full",
        "state_dir": str(root / "state"),
    }
    with start_server(root, config, {}) as full:
        return {p: complete(full.client(), "tiny", p) for p in PROMPTS}


def test_pinned_merge_equals_vllm_on_the_merged_full_model_and_unpin_restores(server, full_model_outputs):
    c = server.client()
    base = {p: complete(c, "tiny", p) for p in PROMPTS}
    try:
        info = pin(server, MERGE)
        assert info["model"] == MERGE and info["workers"][0]["modules"] > 0
        assert {p: complete(c, MERGE, p) for p in PROMPTS} == full_model_outputs
        assert {p: complete(c, "tiny", p) for p in PROMPTS} == full_model_outputs  # the base weights are merged
        r = c.completions.create(model=MERGE, prompt=PROMPTS[0], max_tokens=2)
        assert r.model == "tiny"  # served without a LoRA
        assert complete(c, "alpha", PROMPTS[0])  # LoRA requests keep working on top of the pinned base
        assert http(server, "GET", "/admin/pin", key=ADMIN_KEY)[1]["pinned"]["model"] == MERGE
    finally:
        unpin(server)
    assert {p: complete(c, "tiny", p) for p in PROMPTS} == base
    assert http(server, "DELETE", "/admin/pin", key=ADMIN_KEY)[0] == 404


def test_swap_a_b_a_gives_a_again(server, full_model_outputs):
    c = server.client()
    try:
        pin(server, MERGE)
        pin(server, OTHER)
        other = {p: complete(c, "tiny", p) for p in PROMPTS}
        assert other != full_model_outputs
        pin(server, MERGE)
        assert {p: complete(c, "tiny", p) for p in PROMPTS} == full_model_outputs
    finally:
        unpin(server)


def test_a_dense_space_pin_equals_the_same_merge_pinned_as_factors(server):
    """Magnitude pruning that keeps every entry is TA: pinned from the dense space (ΔW added as it is) and
    TA from the KnOTS space (exact factors through the fused kernel), the weights, and so the answers, agree."""
    c = server.client()
    base = {p: complete(c, "tiny", p) for p in PROMPTS}
    try:
        pin(server, "tasks:alpha+beta+gamma@magnitude?top_k=1.0")
        dense = {p: complete(c, "tiny", p) for p in PROMPTS}
        pin(server, "tasks:alpha+beta+gamma@knots-ta")
        assert {p: complete(c, "tiny", p) for p in PROMPTS} == dense != base
    finally:
        unpin(server)


def test_spectral_merges_and_doge_pin_though_doge_is_not_served_per_request(server):
    """A spectral merge is one merge whichever space computes it; DOGE, refused per request, pins."""
    c = server.client()
    base = {p: complete(c, "tiny", p) for p in PROMPTS}
    try:
        pin(server, "tasks:alpha+beta+gamma@iso-cts?alpha=1.5")
        iso = {p: complete(c, "tiny", p) for p in PROMPTS}
        pin(server, "tasks:alpha+beta+gamma@knots-iso-cts?alpha=1.5")
        assert {p: complete(c, "tiny", p) for p in PROMPTS} == iso != base
        info = pin(server, "tasks:alpha+beta@core-doge?steps=50&alpha=3")
        assert info["model"] == "tasks:alpha+beta@core-doge?alpha=3.0&steps=50"
        with pytest.raises(openai.BadRequestError, match="not composed per request"):
            c.completions.create(model="tasks:alpha+beta@knots-doge", prompt=PROMPTS[0], max_tokens=2)
    finally:
        unpin(server)


def test_requests_across_swaps_all_succeed_on_one_weight_set(server, full_model_outputs):
    c = server.client()
    base = {p: complete(c, "tiny", p) for p in PROMPTS}
    results, errors, stop = [], [], threading.Event()

    def load(i):
        while not stop.is_set():
            p = PROMPTS[i % len(PROMPTS)]
            try:
                results.append((p, complete(c, "tiny", p)))
            except Exception as e:  # any failure is the finding
                errors.append(e)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for _ in range(2):
            pin(server, MERGE)
            unpin(server)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and len(results) > 6
    assert all(out in (base[p], full_model_outputs[p]) for p, out in results)


@pytest.mark.parametrize(
    "model, status, message",
    [
        ("tiny", 400, "is not a merge"),
        ("alpha", 400, "is not a merge"),
        ("tasks:alpha+zeta", 404, "unknown task(s): zeta"),
        ("tasks:alpha+beta@nope", 400, "unknown merge method"),
    ],
)
def test_bad_pins_are_refused(server, model, status, message):
    got, body = http(server, "POST", "/admin/pin", {"model": model}, key=ADMIN_KEY)
    assert got == status and message in body["error"]["message"]
    assert http(server, "GET", "/admin/pin", key=ADMIN_KEY)[1]["pinned"] is None
    assert http(server, "POST", "/admin/pin", {"model": MERGE})[0] == 401


def test_a_merge_pinned_in_the_config_is_in_the_weights_from_the_start(server, full_model_outputs, tmp_path):
    config = {k: v for k, v in server.config.items() if k not in ("experiments", "port")}
    config |= {"pin": MERGE, "cache_dir": f"{server.config['cache_dir']}-pinned", "state_dir": str(tmp_path / "s")}
    with start_server(tmp_path, config, {"KNOTS_TEST_ADMIN_KEY": ADMIN_KEY}) as pinned:
        assert {p: complete(pinned.client(), "tiny", p) for p in PROMPTS} == full_model_outputs
        assert http(pinned, "GET", "/admin/pin", key=ADMIN_KEY)[1]["pinned"]["model"] == MERGE
