"""The serving compose path: float32 on the basis's device against the float64 reference, TA straight
from the factors, the fused CPU kernels against torch, the basis store's auto rule, the compose bound."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from knots_serve.kernels import cpu
from knots_serve.kernels.ties import ties_merge_torch
from test_merge_math import factors, pool, rel

from knots_serve.adapters import load_adapter
from knots_serve.basis import build_basis
from knots_serve.compose import MergeSpec, adapter_factors, linear_merge, merge_dense, merge_lora, to_host
from knots_serve.methods import method_ids, resolve
from knots_serve.serving.errors import status_of
from knots_serve.serving.merges.adapter_cache import AdapterCache, ComposeBusy
from knots_serve.serving.merges.basis_store import BasisStore
from knots_serve.serving.merges.names import parse_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROOT = Path(__file__).resolve().parents[1]


def lora_dense(lora):
    return {m: (B.double() @ A.double()).cpu() for m, (B, A) in lora.items()}


@pytest.mark.parametrize("device", DEVICES)
# the data-aware methods need statistics: their float32 path is checked in test_regression.py
@pytest.mark.parametrize("method_id", [m for m in method_ids() if not resolve(m)[1].data])
@pytest.mark.parametrize("scope", ["global", "module"])
def test_float32_compose_is_within_1e_4_of_the_float64_reference(method_id, scope, device):
    """The factors the server writes (float32, on the compose device), fresh seeds, rank mismatches,
    rsLoRA, a task without a module. DARE against our float64 merge with the same mask: its mask is
    checked against the numpy reference in test_merge_math."""
    space, method = resolve(method_id)
    for seed in np.random.SeedSequence().generate_state(2):
        adapters = pool(int(seed) % 10_000, drop=1)
        spec = MergeSpec(
            tuple(a.name for a in adapters),
            method_id,
            {"alpha": 0.8} | ({"top_k": 0.3} if "top_k" in method.params else {}),
            weights={"t0": 1.0, "t1": 0.5, "t2": -0.7},
            trim_scope=scope,
            seed=int(seed) % 1000,
        )
        basis = build_basis(adapters, space).to(device)
        got = lora_dense(to_host(merge_lora(basis, spec, max_rank=None)))
        if method.random or method.name == "doge":  # no independent reference: our own float64 merge
            want = merge_dense(build_basis(adapters, space), spec, dtype=torch.float64) if device == "cpu" else None
            if want is None:  # CUDA draws another mask: the merge is checked on the CPU
                continue
        else:
            want = ref.merge(
                space, method.name, factors(adapters), np.array([1.0, 0.5, -0.7]), scope=scope, **spec.resolved_params()
            )
        for m in want:
            assert rel(got[m], want[m]) < 1e-4, (method_id, scope, m, int(seed))


@pytest.mark.parametrize("method_id", ["knots-ties", "core-ties", "ties", "magnitude", "knots-ta"])
def test_float32_compose_of_the_demo_adapters_is_within_1e_4_of_the_reference(method_id):
    names = ("add", "sentiment", "to_digits")
    keep = ("model.layers.0.", "model.layers.17.")  # 8 modules: the dense reference SVD is slow on all 120
    adapters = []
    for n in names:
        a = load_adapter(ROOT / "adapters" / n, n)
        adapters.append(type(a)(a.name, {m: l for m, l in a.modules.items() if m.startswith(keep)}, a.base_model))
    space, method = resolve(method_id)
    spec = MergeSpec(names, method_id)
    got = lora_dense(merge_lora(build_basis(adapters, space), spec, max_rank=None))
    want = ref.merge(space, method.name, factors(adapters), np.ones(3), **spec.resolved_params())
    assert set(got) == set(want)
    for m in want:
        assert rel(got[m], want[m]) < 1e-4, (method_id, m)


def test_ta_from_the_factors_needs_no_basis_and_equals_the_reference():
    adapters = pool(71)
    w = {"t0": 0.3, "t1": -1.0, "t2": 2.0}
    spec = MergeSpec(("t0", "t1", "t2"), "knots-ta", {"alpha": 0.7}, w)
    got = lora_dense(linear_merge(adapter_factors({a.name: a for a in adapters}, spec.tasks), spec))
    want = ref.merge("full", "ta", factors(adapters), np.array([0.3, -1.0, 2.0]), alpha=0.7)
    assert all(rel(got[m], want[m]) < 1e-5 for m in want)
    # the merge_lora path in a KnOTS or Core basis takes the same route, through the basis's factors
    for space in ("knots", "core"):
        via = lora_dense(
            merge_lora(build_basis(adapters, space), MergeSpec(spec.tasks, f"{space}-ta", {"alpha": 0.7}, w))
        )
        assert all(rel(via[m], want[m]) < 1e-5 for m in want)


def test_ta_from_the_factors_of_one_task_is_the_adapter_at_its_own_rank():
    (a,) = pool(72, n=1, rslora=(True,))
    lora = linear_merge(adapter_factors({"t0": a}, ("t0",)), MergeSpec(("t0",), "ta"))
    for m, l in a.modules.items():
        B, A = lora[m]
        assert B.shape[1] == l.rank and rel(B.double() @ A.double(), l.delta()) < 1e-6


def test_ta_from_the_factors_costs_the_same_whatever_the_pool():
    """Only the subset's factors are touched: a pool of 3 or of 30 gives the same merge from the same work
    (the store hands linear_merge the subset's factors alone)."""
    small = {a.name: a for a in pool(73)}
    large = small | {f"x{i}": a for i, a in enumerate(pool(74, n=27))}
    spec = MergeSpec(("t0", "t2"), "ta")
    a = linear_merge(adapter_factors(small, spec.tasks), spec)
    b = linear_merge(adapter_factors(large, spec.tasks), spec)
    assert all(torch.equal(a[m][0], b[m][0]) and torch.equal(a[m][1], b[m][1]) for m in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernels_equal_torch_exactly(dtype):
    if not cpu.HAVE_NUMBA:
        pytest.skip("numba is not installed: the torch paths serve")
    g = torch.Generator().manual_seed(81)
    Y = torch.randn(3, 50_000, generator=g, dtype=dtype)
    Y[0, ::3] = 0  # zeros, as after DARE
    Y[1] = Y[1].round(decimals=1)  # many repeated |x|
    Y[2, ::5] = -Y[1, ::5]  # columns that cancel: the majority sign decides
    for k in (1, 2, 17_000, 40_000, 50_000):
        want = Y.abs().kthvalue(k, dim=1).values
        assert torch.equal(cpu.kth_abs_smallest(Y, k), want), k
        assert torch.equal(cpu.ties_merge_numba(Y, want), ties_merge_torch(Y, want)), k


def test_row_norms_and_column_shares_agree_on_every_path():
    """The numba kernels (float32/float64 on a CPU) and the torch path (any other dtype or device) of the
    certificate's inputs: float64 sums, an empty row 0 and skipped, a tiny row not lost to float32 underflow."""
    from knots_serve.kernels import column_shares, row_sq_norms

    g = torch.Generator().manual_seed(82)
    X = torch.randn(5, 300, generator=g).to(torch.float16).float()  # values float16 holds exactly
    X[1] = 0
    tiny = X.clone()
    tiny[2] *= 1e-30  # squares underflow in float32, not in float64
    for Y in (X, tiny):
        want = Y.double().square().sum(-1)
        for got in (row_sq_norms(Y), row_sq_norms(Y.double()), row_sq_norms(Y.half()) if Y is X else want):
            assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=0) and got[1] == 0
        assert want[2] > 0
        shares = column_shares(Y, row_sq_norms(Y))
        assert shares.dtype == torch.float64 and torch.isfinite(shares).all()
        assert torch.allclose(shares.sum(), torch.tensor(4.0, dtype=torch.float64))  # each nonempty row adds 1
    assert torch.allclose(column_shares(X.half(), row_sq_norms(X.half())), column_shares(X, row_sq_norms(X)))
    batch = torch.stack([X, tiny, X.flip(0)])  # a batch of modules at once: what each alone gives
    for Y in (batch, batch.half()):
        norms = row_sq_norms(Y)
        assert norms.shape == (3, 5) and all(torch.equal(norms[j], row_sq_norms(Y[j])) for j in range(3))
        shares = column_shares(Y, norms)
        assert shares.shape == (3, 300)
        assert all(torch.allclose(shares[j], column_shares(Y[j], norms[j]), rtol=1e-12, atol=0) for j in range(3))


def store_pool(n=8):
    from test_composer import SHAPES
    from tiny import random_adapter

    return {f"t{i}": random_adapter(f"t{i}", SHAPES, 4, seed=i) for i in range(n)}


def test_auto_basis_is_the_subset_for_small_subsets_and_the_shared_basis_for_large_ones():
    store = BasisStore(store_pool(8))
    assert store.choose("auto", ("t0", "t1")) == "subset"
    assert store.choose("auto", ("t0", "t1", "t2", "t3")) == "subset"  # exactly half of the pool's rank
    assert store.choose("auto", ("t0", "t1", "t2", "t3", "t4")) == "shared"
    assert (
        store.choose("shared", ("t0", "t1")) == "shared" and store.choose("subset", tuple(store.adapters)) == "subset"
    )
    # what auto serves is the merge in the chosen basis
    for s, mode in (("tasks:t0+t1@knots-ties", "subset"), ("tasks:t0+t1+t2+t3+t4@knots-ties", "shared")):
        sel = parse_model(s, "knots-ties")
        chosen = parse_model(f"{s}?basis={mode}", "knots-ties")
        a, b = store.merge(sel), store.merge(chosen)
        assert all(torch.equal(a[m][0], b[m][0]) and torch.equal(a[m][1], b[m][1]) for m in a)


def test_every_ta_id_is_served_from_the_factors_alike():
    """ta, knots-ta and core-ta are one merge: the store composes each from the factors, never a basis
    (plain `ta` would otherwise build the pool's dense basis and factor a dense sum)."""
    store = BasisStore(store_pool(4))
    got = [
        store.merge(parse_model(f"tasks:t0+t2@{m}?alpha=0.7&w.t2=-1.5", "knots-ties"))
        for m in ("ta", "knots-ta", "core-ta")
    ]
    for other in got[1:]:
        assert all(torch.equal(got[0][m][0], other[m][0]) and torch.equal(got[0][m][1], other[m][1]) for m in got[0])
    assert "full" not in store._bases and not store._subset  # no basis was built for them


def test_the_shared_basis_stays_on_the_compose_device_and_merges_come_back_to_the_host():
    for device in DEVICES:
        store = BasisStore(store_pool(4), device)
        basis = store.basis("knots", "shared", ("t0", "t1"))
        assert basis.device.type == torch.device(device).type
        lora = store.merge(parse_model("tasks:t0+t1@knots-ties?basis=shared", "knots-ties"))
        assert all(B.device.type == "cpu" and A.device.type == "cpu" for B, A in lora.values())
        assert store.nbytes() > 0


class GatedStore(BasisStore):
    """A real store whose composes wait for a signal, so a test can hold them in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.go = threading.Event()

    def merge(self, sel):
        self.go.wait(30)
        return super().merge(sel)


def test_new_merges_past_the_bound_are_refused_at_once_not_queued(tmp_path):
    store = GatedStore(store_pool(4))
    cache = AdapterCache(store, tmp_path / "cache", 1 << 20, 64, workers=1, max_pending=2)
    first, second, third = (parse_model(s, "knots-ties") for s in ("tasks:t0+t1", "tasks:t2+t3", "tasks:t0+t2"))
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(cache.get(s))) for s in (first, second, first)]
    for t in threads:
        t.start()
    while len(cache._inflight) < 2:  # both distinct merges are in flight (one composing, one waiting)
        threading.Event().wait(0.01)
    with pytest.raises(ComposeBusy, match="bound is 2") as refused:
        cache.get(third)
    assert status_of(refused.value) == 503 and refused.value.retry_after >= 1
    store.go.set()
    for t in threads:
        t.join(30)
    firsts = [c for c in results if c.name == first.canonical]
    assert len(results) == 3 and len(firsts) == 2 and firsts[0] is firsts[1]  # the third joined the first compose
    assert cache.get(third).path.exists()  # with room again, the refused merge composes


def test_compose_settings_are_checked_when_the_config_loads(tmp_path):
    from knots_serve.compose import MergeError
    from knots_serve.serving.server.config import load_config

    def load(**fields):
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({"model": str(tmp_path)} | fields))
        return load_config(path)

    assert load().compose_device == "auto" and load(compose_device="cpu").compose_device == "cpu"
    with pytest.raises(MergeError, match="compose_device must be auto, cpu, cuda or cuda:N"):
        load(compose_device="tpu")
    with pytest.raises(MergeError, match=r"compose_device 'cuda:99': torch sees \d+ CUDA device"):
        load(compose_device="cuda:99")
    with pytest.raises(MergeError, match="compose_pending"):
        load(compose_pending=0)


def test_the_middleware_answers_a_merge_past_the_bound_with_503_and_retry_after(tiny_adapters, tmp_path):
    """The real KnotsServer and middleware over ASGI (asgi_edge.py), compose_pending 1, the first new merge
    held in flight: a second new merge gets 503 at once, with Retry-After and an OpenAI-style error naming
    the bound."""
    import asyncio

    from asgi_edge import Engine, call, make_server

    from knots_serve.serving.http.middleware import KnotsMiddleware

    async def run():
        server = make_server(tmp_path, tiny_adapters, compose_workers=1, compose_pending=1)
        gated = GatedStore(server.bases.adapters, "cpu")
        server.cache.store = gated
        mw = KnotsMiddleware(Engine())
        try:
            first = asyncio.ensure_future(call(mw, "tasks:alpha+beta"))
            while not server.cache._inflight:
                await asyncio.sleep(0.01)
            status, headers, body = await asyncio.wait_for(call(mw, "tasks:alpha+gamma"), 10)
            assert status == 503 and headers[b"retry-after"] == b"1"
            assert "bound is 1" in body["error"]["message"] and body["error"]["type"] == "ServiceUnavailableError"
            gated.go.set()
            assert (await asyncio.wait_for(first, 30))[0] == 200
            assert (await asyncio.wait_for(call(mw, "tasks:alpha+gamma"), 30))[0] == 200  # room again
        finally:
            gated.go.set()
            KnotsMiddleware.server = None

    asyncio.run(run())
