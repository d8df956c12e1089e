"""The data-aware merges (RegMean, core-restricted RegMean) against their dense float64 definitions
(tests/reference.py), their identities, and the statistics file they read. WUDI runs with the spectral methods
(test_spectral.py: it commutes with changes of frame) plus its own optimality check here."""

import numpy as np
import pytest
import reference as ref
import torch
from test_merge_math import factors, pool, rel
from test_spectral import fresh_seeds

from knots_serve.basis import build_basis
from knots_serve.compose import MergeError, MergeSpec, adapter_factors, merge_factors, merge_lora
from knots_serve.stats import Gram, StatsDir, StatsError, TaskStats, sketch

W = {"t0": 1.0, "t1": 0.5, "t2": 2.0}  # positive: H = Σ w_t·G̃_t must stay PSD


def random_gram(I: int, g: torch.Generator, tokens: int | None = None) -> torch.Tensor:
    """A mean Gram of `tokens` random inputs with uneven feature scales (as hidden states have)."""
    X = torch.randn(tokens or 3 * I, I, generator=g, dtype=torch.float64) * torch.linspace(
        0.2, 3.0, I, dtype=torch.float64
    )
    return X.T @ X / X.shape[0]


def random_stats(adapters, seed: int, low_rank: dict[str, int] | None = None) -> dict[str, TaskStats]:
    """Per task, a random PSD Gram per module (dense, or low-rank + diagonal for the tasks in `low_rank`)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for a in adapters:
        grams = {}
        for m, lora in a.modules.items():
            G = random_gram(lora.A.shape[1], g)
            s = (low_rank or {}).get(a.name)
            grams[m] = sketch(G, s) if s else Gram(dense=G)
        out[a.name] = TaskStats(a.name, 100, 4, a.digest, "data", grams)
    return out


def dense_grams(stats: dict[str, TaskStats], names, module) -> list:
    """The Grams a merge sees, as float64 numpy (None for a task without the module)."""

    def dense(g: Gram):
        return (g.dense if g.dense is not None else g.low @ g.low.T + torch.diag(g.diag_rest)).double().numpy()

    return [dense(stats[t].grams[module]) if module in stats[t].grams else None for t in names]


def reference(method, adapters, stats, w, **params):
    names = [a.name for a in adapters]
    out = {}
    for m, per_task in factors(adapters).items():
        updates = [None if f is None else f[2] * f[0] @ f[1] for f in per_task]
        grams = dense_grams(stats, names, m)
        if method == "core-regmean":
            rows = [f[1] for f in per_task if f is not None]
            out[m] = ref.core_regmean(updates, grams, w, rows, **params)
        else:
            out[m] = ref.regmean(updates, grams, w, **params)
    return out


def every_path(adapters, spec, stats, dtype=torch.float64):
    """The merge's dense ΔW from the adapters' factors and from a KnOTS and a Core basis."""
    names = spec.tasks
    got = {"factors": merge_factors(adapter_factors({a.name: a for a in adapters}, names), spec, dtype, stats)}
    for space in ("knots", "core"):
        basis = build_basis(adapters, space, store=dtype)
        got[space] = merge_lora(basis, spec, None, dtype=dtype, stats=stats)
    return {p: {m: B.double() @ A.double() for m, (B, A) in lora.items()} for p, lora in got.items()}


@pytest.mark.parametrize("method", ["regmean", "knots-regmean", "core-regmean"])
@pytest.mark.parametrize("reduce", [0.95, 0.3, 1.0])
def test_regmean_matches_the_dense_float64_definition(method, reduce):
    """Mixed ranks, rsLoRA, a task without a module, weights, a low-rank+diagonal Gram beside dense ones."""
    for seed in fresh_seeds():
        adapters = pool(seed, drop=1)
        stats = random_stats(adapters, seed, low_rank={"t2": 6})
        spec = MergeSpec(tuple(a.name for a in adapters), method, {"alpha": 0.8, "reduce": reduce}, W)
        want = reference(method, adapters, stats, np.array(list(W.values())), alpha=0.8, reduce=reduce)
        for path, got in every_path(adapters, spec, stats).items():
            assert set(got) == set(want)
            for m in want:
                assert rel(got[m], want[m]) < 1e-6, (method, reduce, path, m, seed)


@pytest.mark.parametrize("method", ["regmean", "core-regmean"])
def test_float32_serving_path_is_within_1e_4(method):
    for seed in fresh_seeds():
        adapters = pool(seed, drop=1)
        stats = random_stats(adapters, seed)
        spec = MergeSpec(tuple(a.name for a in adapters), method, {"alpha": 1.2}, W)
        want = reference(method, adapters, stats, np.array(list(W.values())), alpha=1.2)
        lora = merge_factors(adapter_factors({a.name: a for a in adapters}, spec.tasks), spec, torch.float32, stats)
        for m in want:
            B, A = lora[m]
            assert B.dtype == torch.float32
            assert rel(B.double() @ A.double(), want[m]) < 1e-4, (method, m, seed)


def ridge_bound(g: Gram, reduce: float = 0.95) -> float:
    """How far the ridge ε·mean(diag G)·I can move an exact identity: relative error ≤ ε·mean(diag G)/λ_min(G)."""
    vals = torch.linalg.eigvalsh(g.reduced(reduce, torch.float64))
    return 2 * ref.RIDGE * float(vals.mean() / vals[0]) + 1e-12


@pytest.mark.parametrize("method", ["regmean", "core-regmean"])
def test_one_task_is_that_task(method):
    (a,) = pool(fresh_seeds(1)[0], n=1)
    stats = random_stats([a], 7)
    lora = merge_factors(adapter_factors({a.name: a}, ("t0",)), MergeSpec(("t0",), method), torch.float64, stats)
    for m, module in a.modules.items():
        assert rel(lora[m][0] @ lora[m][1], module.delta()) < ridge_bound(stats["t0"].grams[m]), m


def test_identical_grams_with_reduce_1_give_the_weighted_mean():
    adapters = pool(fresh_seeds(1)[0])
    shared = random_stats(adapters[:1], 3)["t0"]
    stats = {a.name: TaskStats(a.name, 10, 1, a.digest, "d", shared.grams) for a in adapters}
    spec = MergeSpec(("t0", "t1", "t2"), "regmean", {"reduce": 1.0}, W)
    lora = merge_factors(adapter_factors({a.name: a for a in adapters}, spec.tasks), spec, torch.float64, stats)
    total = sum(W.values())
    for m in lora:
        mean = sum(W[a.name] * a.modules[m].delta() for a in adapters) / total
        assert rel(lora[m][0] @ lora[m][1], mean) < ridge_bound(shared.grams[m], 1.0), m


def test_wudi_gradient_vanishes_at_its_result():
    for seed in fresh_seeds():
        adapters = pool(seed, drop=1)
        spec = MergeSpec(tuple(a.name for a in adapters), "wudi")
        lora = merge_factors(adapter_factors({a.name: a for a in adapters}, spec.tasks), spec, torch.float64)
        for m, per_task in factors(adapters).items():
            updates = [None if f is None else f[2] * f[0] @ f[1] for f in per_task]
            merged = (lora[m][0] @ lora[m][1]).numpy()
            scale = np.linalg.norm(ref.wudi_loss_grad(np.zeros_like(merged), updates))
            assert np.linalg.norm(ref.wudi_loss_grad(merged, updates)) < 1e-7 * scale, (m, seed)


def test_a_missing_statistic_is_an_error_naming_the_task():
    adapters = pool(1)
    stats = random_stats(adapters[:2], 1)
    fs = adapter_factors({a.name: a for a in adapters}, ("t0", "t1", "t2"))
    with pytest.raises(MergeError, match=r"t2.*knots-serve stats"):
        merge_factors(fs, MergeSpec(("t0", "t1", "t2"), "regmean"), stats=stats)
    with pytest.raises(MergeError, match="t0"):
        merge_factors(fs, MergeSpec(("t0", "t1"), "core-regmean"))  # no statistics at all: never a fallback
    m = next(iter(stats["t1"].grams))
    del stats["t1"].grams[m]
    with pytest.raises(MergeError, match=rf"t1.*{m}"):
        merge_factors(fs, MergeSpec(("t0", "t1"), "regmean"), stats=stats)


def test_statistics_file_round_trip_shares_one_gram_per_input(tmp_path):
    g = torch.Generator().manual_seed(0)
    G, G2 = random_gram(12, g), random_gram(12, g)
    shared = Gram(dense=G.float())
    grams = {"l.0.q_proj": shared, "l.0.k_proj": shared, "l.0.o_proj": sketch(G2.float(), 4)}
    stats = TaskStats("t", 321, 5, "a" * 64, "d" * 64, grams)
    where = StatsDir(tmp_path)
    path = where.put(stats)
    back = TaskStats.load(path)
    assert (back.task, back.tokens, back.examples, back.adapter, back.data) == ("t", 321, 5, "a" * 64, "d" * 64)
    assert back.grams["l.0.q_proj"] is back.grams["l.0.k_proj"]  # stored once, shared on load
    assert torch.equal(back.grams["l.0.q_proj"].dense, G.float())
    assert torch.allclose(back.grams["l.0.o_proj"].diagonal(), G2.float().diagonal(), rtol=1e-5)  # diagonal exact
    assert back.nbytes() == 12 * 12 * 4 + 12 * 4 * 4 + 12 * 4
    # keyed by the adapter's digest: another version of the adapter finds nothing
    assert where.find("t", "a" * 64) == path
    assert where.find("t", "b" * 64) is None


def test_low_rank_gram_products_match_its_dense_form():
    g = torch.Generator().manual_seed(1)
    G = random_gram(20, g)
    low = sketch(G, 5)
    dense = Gram(dense=low.low @ low.low.T + torch.diag(low.diag_rest))
    X = torch.randn(20, 3, generator=g, dtype=torch.float64).float()
    for reduce in (1.0, 0.6, 0.0):
        assert torch.allclose(low.reduced_times(X, reduce), dense.reduced(reduce, torch.float32) @ X, atol=1e-4)
        assert torch.allclose(low.reduced(reduce, torch.float32), dense.reduced(reduce, torch.float32), atol=1e-4)
    assert sketch(G, 20).dense is G  # full rank: kept dense


def test_sketched_statistics_keep_shared_inputs_shared_and_say_their_rank():
    g = torch.Generator().manual_seed(2)
    shared = Gram(dense=random_gram(10, g).float())
    stats = TaskStats("t", 9, 2, "a" * 64, "d", {"q": shared, "k": shared, "o": Gram(dense=random_gram(3, g).float())})
    small = stats.sketched(4)
    assert small.grams["q"] is small.grams["k"] and small.grams["q"].low.shape == (10, 4)
    assert small.grams["o"].dense is stats.grams["o"].dense  # narrower than the rank: dense as it was
    assert small.meta["sketch_rank"] == 4 and small.nbytes() < stats.nbytes()


def test_projected_grams_give_core_regmean_exactly():
    """Gram.project on a frame V spanning every A_t: the solve in V's coordinates is core-regmean itself."""
    from knots_serve.basis import column_range
    from knots_serve.compose import regression_merge

    for seed in fresh_seeds():
        adapters = pool(seed, drop=1)
        stats = random_stats(adapters, seed, low_rank={"t2": 6})
        fs = adapter_factors({a.name: a for a in adapters}, ("t0", "t1", "t2"))
        spec = MergeSpec(("t0", "t2"), "core-regmean", {"reduce": 0.7}, {"t0": 1.0, "t2": 2.0})
        want = regression_merge(fs, {t: s.grams for t, s in stats.items()}, spec, torch.float64)
        frames = {m: column_range(torch.cat([A for _, A in per.values()]).T.double(), 1e-12) for m, per in fs.items()}
        projected = {t: {m: g.project(frames[m]) for m, g in s.grams.items()} for t, s in stats.items()}
        got = regression_merge(fs, projected, spec, torch.float64, frames)
        for m in want:
            assert rel(got[m][0] @ got[m][1], want[m][0] @ want[m][1]) < 1e-6, (m, seed)


@pytest.mark.parametrize(
    "tensors,meta,problem",
    [
        ({"m.gram": torch.ones(3, 4)}, {"tokens": "5"}, "square"),
        ({"m.gram_lowrank": torch.ones(3, 2)}, {"tokens": "5"}, "gram_diag"),
        ({"m.weight": torch.ones(3, 3)}, {"tokens": "5"}, "unexpected tensor"),
        ({"m.gram": torch.eye(3)}, {}, "tokens"),
        ({"m.gram": torch.eye(3)}, {"tokens": "5", "same_input": '{"k": "x"}'}, "same_input"),
    ],
)
def test_a_bad_statistics_file_is_an_error_naming_it(tmp_path, tensors, meta, problem):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(StatsError, match=problem):
        TaskStats.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(StatsError, match="junk.safetensors"):
        TaskStats.load(tmp_path / "junk.safetensors")


def test_the_server_s_store_finds_statistics_by_adapter_and_refuses_wide_regmean(tmp_path):
    """BasisStore reads StatsDir files written by another process at any time, only those measured with the
    adapter it holds; unrestricted RegMean past REGMEAN_MAX_INPUT features is refused before any work; its
    core-regmean (Grams projected on the whole pool's A-span) equals the one from the full Grams."""
    from tiny import random_adapter

    from knots_serve.serving.merges.basis_store import REGMEAN_MAX_INPUT, BasisStore
    from knots_serve.serving.merges.names import parse_model

    wide = REGMEAN_MAX_INPUT + 8
    shapes = {"model.layers.0.mlp.down_proj": (8, wide), "model.layers.0.self_attn.q_proj": (8, 16)}
    adapters = {n: random_adapter(n, shapes, 2, seed=i) for i, n in enumerate(("a", "b", "c"))}  # c: not merged
    store = BasisStore(adapters, "cpu", stats_dir=tmp_path / "stats")
    core = parse_model("tasks:a+b@core-regmean", "knots-ties")
    with pytest.raises(MergeError, match="a, b.*knots-serve stats"):
        store.plan(core)
    g = torch.Generator().manual_seed(5)

    def measured(name, digest):
        grams = {
            m: sketch(random_gram(16, g), 4)
            if I == 16
            else Gram(low=torch.randn(I, 3, generator=g), diag_rest=torch.rand(I, generator=g))
            for m, (_, I) in shapes.items()
        }
        return TaskStats(name, 50, 2, digest, "data", grams)

    stats_dir = StatsDir(tmp_path / "stats")
    stats_dir.put(measured("a", adapters["a"].digest))
    stats_dir.put(measured("b", "0" * 64))  # another version of b's adapter: never used
    with pytest.raises(MergeError, match="task\\(s\\) b "):
        store.plan(core)
    stats_dir.put(measured("b", adapters["b"].digest))  # measured while the server runs
    assert store.plan(core)[0] == 4
    with pytest.raises(MergeError, match="core-regmean"):
        store.plan(parse_model("tasks:a+b@regmean", "knots-ties"))
    got = store.merge(core)
    loaded = {t: TaskStats.load(store.stats_file(t)) for t in ("a", "b")}
    want = merge_factors(adapter_factors(adapters, ("a", "b")), core.spec, stats=loaded)
    for m, (B, A) in want.items():
        assert rel(got[m][0].double() @ got[m][1].double(), (B @ A).double()) < 1e-5, m


def test_the_options_of_every_method_apply_to_regmean():
    """--isotropize 1 flattens the merged spectrum; --lines scales deeper blocks more (both in compose.finish)."""
    adapters = pool(fresh_seeds(1)[0])
    stats = random_stats(adapters, 4)
    fs = adapter_factors({a.name: a for a in adapters}, ("t0", "t1"))
    iso = merge_factors(fs, MergeSpec(("t0", "t1"), "core-regmean", {"isotropize": 1}), torch.float64, stats)
    for m, (B, A) in iso.items():
        s = torch.linalg.svdvals(B @ A)
        s = s[s > 1e-9 * s[0]]
        assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-6), m
    plain = merge_factors(fs, MergeSpec(("t0", "t1"), "regmean"), torch.float64, stats)
    lines = merge_factors(fs, MergeSpec(("t0", "t1"), "regmean", {"lines": 1.0}), torch.float64, stats)
    assert any(rel(lines[m][0] @ lines[m][1], plain[m][0] @ plain[m][1]) > 1e-3 for m in plain)
