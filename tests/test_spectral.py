"""The spectral methods (Iso-C, Iso-CTS, TSV-M, CART), the options every method takes (isotropize, LiNeS) and
DOGE: against the dense float64 definitions (tests/reference.py) in every space and compute path."""

import numpy as np
import pytest
import reference as ref
import torch
from test_merge_math import factors, pool, rel

from knots_serve.basis import build_basis
from knots_serve.compose import MergeError, MergeSpec, adapter_factors, merge_dense, merge_factors, merge_lora
from knots_serve.methods import METHODS, PARAMS, resolve
from knots_serve.methods.optimized import doge_delta, doge_loss, shared_subspace

SPECTRAL = ("iso-c", "iso-cts", "tsv", "cart", "wudi")
# each method's own knob at a non-default value, so the parameter is exercised
KNOBS = {"iso-c": {}, "wudi": {}, "iso-cts": {"common": 0.5}, "tsv": {"keep": 0.5}, "cart": {"rank": 0.3}}
W = {"t0": 1.0, "t1": 0.5, "t2": -0.7}


def fresh_seeds(n=2):
    return [int(s) % 10_000 for s in np.random.SeedSequence().generate_state(n)]


def paths(adapters, spec, dtype=torch.float64):
    """The merge's dense ΔW through every space and compute path a user can reach (bases kept in `dtype`)."""
    names = spec.tasks
    out = {}
    for space in ("full", "knots", "core"):
        method_id = spec.method if space == "full" else f"{space}-{spec.method}"
        s = MergeSpec(names, method_id, spec.params, spec.weights)
        out[space] = merge_dense(build_basis(adapters, space, store=dtype), s, dtype=dtype)
    lora = merge_factors(adapter_factors({a.name: a for a in adapters}, names, dtype), spec, dtype)
    out["factors"] = {m: B.double() @ A.double() for m, (B, A) in lora.items()}
    return out


@pytest.mark.parametrize("method", SPECTRAL)
@pytest.mark.parametrize("options", [{}, {"isotropize": 1}, {"lines": 0.6}])
def test_every_space_matches_the_dense_float64_definition(method, options):
    """Mixed ranks, rsLoRA, a task without a module, weights of both signs, fresh seeds."""
    for seed in fresh_seeds():
        adapters = pool(seed, drop=1)
        spec = MergeSpec(tuple(a.name for a in adapters), method, {"alpha": 0.8} | KNOBS[method] | options, W)
        want = ref.merge("full", method, factors(adapters), np.array(list(W.values())), **spec.resolved_params())
        for path, got in paths(adapters, spec).items():
            assert set(got) == set(want)
            for m in want:
                assert rel(got[m], want[m]) < 1e-6, (method, options, path, m, seed)


@pytest.mark.parametrize("method", SPECTRAL)
def test_float32_serving_path_is_within_1e_4(method):
    """What the server composes: float32 from the adapters' factors, and from a KnOTS and a Core basis."""
    for seed in fresh_seeds():
        adapters = pool(seed, drop=1)
        names = tuple(a.name for a in adapters)
        spec = MergeSpec(names, method, {"alpha": 1.3} | KNOBS[method], W)
        want = ref.merge("full", method, factors(adapters), np.array(list(W.values())), **spec.resolved_params())
        got = [merge_factors(adapter_factors({a.name: a for a in adapters}, names), spec)]
        for space in ("knots", "core"):
            got.append(merge_lora(build_basis(adapters, space), MergeSpec(names, f"{space}-{method}", spec.params, W)))
        for lora in got:
            for m in want:
                B, A = lora[m]
                assert B.dtype == torch.float32 and rel(B.double() @ A.double(), want[m]) < 1e-4, (method, m, seed)


def test_identities():
    adapters = pool(5)
    names = tuple(a.name for a in adapters)
    fs = adapter_factors({a.name: a for a in adapters}, names)

    def merge(method, tasks=names, **params):
        lora = merge_factors(fs, MergeSpec(tasks, method, params), torch.float64)
        return {m: B.double() @ A.double() for m, (B, A) in lora.items()}

    (one,) = pool(6, n=1, rslora=(True,))
    got = merge_factors(adapter_factors({"t0": one}, ("t0",)), MergeSpec(("t0",), "tsv"), torch.float64)
    for m, l in one.modules.items():  # TSV-M of one task at keep = 1 is that task, at its own rank
        assert got[m][0].shape[1] == l.rank and rel(got[m][0] @ got[m][1], l.delta()) < 1e-6
    deltas = {m: [a.modules[m].delta() for a in adapters] for m in adapters[0].modules}
    cases = [
        (merge("cart", rank=1.0), {m: sum(d) / len(d) for m, d in deltas.items()}),  # full rank: the mean
        (merge("iso-cts", common=1.0), merge("iso-c")),  # no task-specific directions: Iso-C
        (merge("ta", isotropize=1), merge("iso-c")),  # isotropized task arithmetic is Iso-C
        (merge("iso-c", alpha=2.0), {m: 2 * d for m, d in merge("iso-c").items()}),
    ]
    for got, want in cases:  # the factors are float32: exact up to their rounding
        assert all(rel(got[m], want[m]) < 1e-6 for m in want)
    iso = merge("iso-c")
    for m, d in iso.items():  # a flat spectrum: every nonzero singular value equal
        s = torch.linalg.svdvals(d)
        s = s[s > 1e-9 * s[0]]
        assert (
            s.numel() == min(sum(a.modules[m].rank for a in adapters), *d.shape)
            and (s.max() - s.min()) < 1e-10 * s.max()
        )


@pytest.mark.parametrize("method", SPECTRAL)
def test_rank_padding_changes_nothing(method):
    adapters = pool(7)
    padded = []
    for ad in adapters:
        mods = {
            m: type(l)(
                A=torch.cat([l.A, torch.zeros(3, l.A.shape[1])]),
                B=torch.cat([l.B, torch.zeros(l.B.shape[0], 3)], dim=1),
                scale=l.scale,
            )
            for m, l in ad.modules.items()
        }
        padded.append(type(ad)(ad.name, mods, ad.base_model))
    spec = MergeSpec(("t0", "t1", "t2"), method, KNOBS[method])
    for path, (x, y) in {p: (paths(adapters, spec)[p], paths(padded, spec)[p]) for p in ("core", "factors")}.items():
        assert all(rel(y[m], x[m]) < 1e-6 for m in x), (method, path)


def test_lines_scales_deeper_blocks_more_and_is_off_by_default():
    adapters = pool(8)
    names = tuple(a.name for a in adapters)
    fs = adapter_factors({a.name: a for a in adapters}, names)
    plain = merge_factors(fs, MergeSpec(names, "ta"), torch.float64)
    off = merge_factors(fs, MergeSpec(names, "ta", {"lines": 0.0}), torch.float64)
    assert all(torch.equal(plain[m][0], off[m][0]) for m in plain)
    on = merge_factors(fs, MergeSpec(names, "ta", {"lines": 0.5}), torch.float64)
    ratio = {m: (on[m][0].norm() / plain[m][0].norm()).item() for m in plain}
    # task arithmetic: a = 1/T on block 0; block l of L gets 1/T + beta·l/(L − 1) (the pool has 3 blocks)
    depth = {m: int(m.split(".layers.")[1].split(".")[0]) for m in ratio}
    assert all(abs(r - (1 / 3 + 0.5 * depth[m] / 2)) < 1e-10 for m, r in ratio.items())


def test_options_keep_old_keys_and_reach_the_name():
    spec = MergeSpec(("a", "b"), "knots-ties")
    assert "lines" not in spec.key() and "isotropize" not in spec.key()
    assert "isotropize" in MergeSpec(("a", "b"), "knots-ties", {"isotropize": 1}).key()


@pytest.mark.parametrize(
    "method,params,words",
    [
        ("tsv", {"keep": 0.0}, ["keep=0.0", "(0, 1]"]),
        ("tsv", {"keep": 1.5}, ["keep=1.5", "(0, 1]"]),
        ("iso-cts", {"common": -0.1}, ["common=-0.1", "[0, 1]"]),
        ("cart", {"rank": 0}, ["rank=0", "(0, 1]"]),
        ("iso-c", {"top_k": 0.3}, ["takes no parameter 'top_k'", "alpha"]),
        ("doge", {"steps": 2.5}, ["steps=2.5", "integer"]),
        ("ta", {"isotropize": 0.5}, ["isotropize=0.5", "integer"]),
        ("ties", {"lines": -1}, ["lines=-1", "[0, 10]"]),
    ],
)
def test_bad_values_name_the_parameter_and_its_range(method, params, words):
    with pytest.raises(MergeError) as e:
        MergeSpec(("a", "b"), method, params)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_every_method_is_in_every_space_with_its_paper():
    for name in ("iso-c", "iso-cts", "tsv", "cart", "doge"):
        for mid in (name, f"knots-{name}", f"core-{name}"):
            assert resolve(mid)[1] is METHODS[name]
        assert "arXiv" in METHODS[name].paper and all(p in PARAMS for p in METHODS[name].params)


# --- DOGE -------------------------------------------------------------------------------------------------
def test_doge_descends_its_objective_and_leaves_the_shared_subspace_alone():
    """The dense problem of the paper on one random module of three rank-4 tasks, float64."""
    g = torch.Generator().manual_seed(3)
    Y = torch.stack(
        [
            torch.randn(40, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 30, generator=g, dtype=torch.float64)
            for _ in range(3)
        ]
    )
    Y = Y * 0.01
    lam = 0.07 / torch.linalg.matrix_norm(Y)
    Us = shared_subspace(Y, 1 / 6)
    assert Us.shape == (40, 5) and torch.allclose(Us.T @ Us, torch.eye(5, dtype=torch.float64), atol=1e-10)
    trace = []
    delta = doge_delta(Y, lam, Us, steps=200, lr=1e-4, trace=trace)
    loss = torch.stack(trace)
    assert loss[-1] < 0.85 * loss[0] and bool((loss[1:] <= loss[:-1] * (1 + 1e-9)).all())
    assert torch.allclose(trace[-1], doge_loss(Y, (lam[:, None, None] * (Y + delta)).sum(0)))
    assert (Us.T @ delta).abs().max() < 1e-12 * delta.abs().max()
    assert delta.abs().max() > 0


def test_doge_in_every_space_is_exact_low_rank_and_seeded_by_nothing():
    adapters = pool(9, drop=1)
    names = tuple(a.name for a in adapters)
    for space in ("knots", "core"):
        basis = build_basis(adapters, space)
        spec = MergeSpec(names, f"{space}-doge", {"steps": 50, "alpha": 2.0}, W)
        dense, lora = merge_dense(basis, spec, dtype=torch.float64), merge_lora(basis, spec, dtype=torch.float64)
        for m, (B, A) in lora.items():
            assert rel(B @ A, dense[m]) < 1e-10 and B.shape[1] <= basis.modules[m].left.shape[1]
        again = merge_dense(basis, spec, dtype=torch.float64)
        assert all(torch.equal(again[m], dense[m]) for m in dense)
    full = merge_dense(build_basis(adapters, "full"), MergeSpec(names, "doge", {"steps": 50}), dtype=torch.float64)
    assert all(d.abs().sum() > 0 for d in full.values())


def test_doge_mask_keeps_the_top_fraction_of_each_task():
    """With no steps DOGE is the masked, norm-weighted sum: alpha·Σ_t (eta/‖X_t‖)·m_t ⊙ X_t."""
    adapters = pool(10)
    names = tuple(a.name for a in adapters)
    basis = build_basis(adapters, "full")
    spec = MergeSpec(names, "doge", {"steps": 0, "mask": 0.5, "eta": 1.0}, trim_scope="module")
    got = merge_dense(basis, spec, dtype=torch.float64)
    for m, ds in ref.updates(factors(adapters), np.ones(3)).items():
        want = sum(ref.trim(d.ravel(), 0.5).reshape(d.shape) / np.linalg.norm(d) for d in ds)
        assert rel(got[m], want) < 1e-6, m
