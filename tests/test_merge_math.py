"""Every merge against the dense float64 reference (tests/reference.py) on random adapters."""

import numpy as np
import pytest
import reference as ref
import torch
from tiny import random_adapter

from knots_serve.basis import Basis, build_basis, compact, joint_svd
from knots_serve.compose import MergeSpec, adapter_factors, merge_dense, merge_factors, merge_lora
from knots_serve.methods import METHODS, dare, factored, method_ids, resolve

# (O, I) per module; ranks differ per task and per module; Σr > O in "narrow" (the basis is then O-wide).
# several layers: the compose batches modules of one shape (q of layers 0-2; k reads what q reads but writes
# fewer rows), and task 0's ranks differ between layers, so batches split by rank too
SHAPES = {
    "m.layers.0.q_proj": (24, 40),
    "m.layers.0.o_proj": (40, 24),
    "m.layers.1.v_proj": (8, 30),
    "m.layers.1.q_proj": (24, 40),
    "m.layers.1.k_proj": (8, 40),
    "m.layers.2.q_proj": (24, 40),
    "m.layers.2.k_proj": (8, 40),
}
RANKS = [
    {
        "m.layers.0.q_proj": 3,
        "m.layers.0.o_proj": 5,
        "m.layers.1.v_proj": 4,
        "m.layers.1.q_proj": 3,
        "m.layers.1.k_proj": 3,
        "m.layers.2.q_proj": 5,
        "m.layers.2.k_proj": 3,
    },
    2,
    4,
]


def pool(seed, n=3, rslora=(False, True, False), drop=None):
    """n random adapters; task `drop` (if given) lacks the first module."""
    out = []
    for i in range(n):
        shapes = {m: s for m, s in SHAPES.items() if not (i == drop and m == next(iter(SHAPES)))}
        out.append(random_adapter(f"t{i}", shapes, RANKS[i % 3], seed * 100 + i, rslora=rslora[i % 3]))
    return out


def factors(adapters):
    """{module: per-task (B, A, s) float64 numpy or None} for the reference."""
    mods = sorted({m for a in adapters for m in a.modules})
    return {
        m: [
            (a.modules[m].B.double().numpy(), a.modules[m].A.double().numpy(), a.modules[m].scale)
            if m in a.modules
            else None
            for a in adapters
        ]
        for m in mods
    }


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_knots_basis_matches_dense_svd_and_reconstructs(seed):
    adapters = pool(seed)
    basis = build_basis(adapters, "knots")
    for m, per_task in factors(adapters).items():
        xs, back = ref.space_tensors("knots", per_task)
        ms = basis.modules[m]
        dense = np.hstack([s * B @ A for B, A, s in per_task])
        U, sig, _ = np.linalg.svd(dense, full_matrices=False)
        k = ms.left.shape[1]
        assert k == min(dense.shape[0], sum(B.shape[1] for B, _, _ in per_task))
        assert np.allclose(
            np.linalg.svd(
                ms.left.double().numpy() @ np.hstack([ms.task_tensor(a.name).double().numpy() for a in adapters]),
                compute_uv=False,
            )[:k],
            sig[:k],
            rtol=1e-5,
        )
        for a, (B, A, s) in zip(adapters, per_task):
            assert rel(ms.to_dense(ms.task_tensor(a.name)), s * B @ A) < 1e-6


def test_joint_svd_is_exact_in_float64():
    g = torch.Generator().manual_seed(7)
    Bs = [torch.randn(50, r, generator=g, dtype=torch.float64) for r in (3, 6)]
    As = [torch.randn(r, 70, generator=g, dtype=torch.float64) for r in (3, 6)]
    U, s, coefs, qs = joint_svd(Bs, As, [0.5, 2.0])
    M = torch.cat([0.5 * Bs[0] @ As[0], 2.0 * Bs[1] @ As[1]], dim=1)
    recon = U @ torch.cat([c @ q.T for c, q in zip(coefs, qs)], dim=1)
    assert torch.linalg.norm(recon - M) / torch.linalg.norm(M) < 1e-13
    assert torch.allclose(s, torch.linalg.svdvals(M)[: len(s)], rtol=1e-12)


def test_rank_padding_changes_nothing():
    a = pool(4)
    padded = []
    for ad in a:
        mods = {}
        for m, l in ad.modules.items():  # append zero rank-directions, as a padded adapter would have
            mods[m] = type(l)(
                A=torch.cat([l.A, torch.zeros(3, l.A.shape[1])]),
                B=torch.cat([l.B, torch.zeros(l.B.shape[0], 3)], dim=1),
                scale=l.scale,
            )
        padded.append(type(ad)(ad.name, mods, ad.base_model))
    for method in ("knots-ties", "core-ties", "ties"):
        spec = MergeSpec(("t0", "t1", "t2"), method)
        space = resolve(method)[0]
        x = merge_dense(build_basis(a, space), spec)
        y = merge_dense(build_basis(padded, space), spec)
        for m in x:
            assert rel(y[m], x[m]) < 1e-5, (method, m)


# DARE's random mask is checked against the same formula in test_dare_methods_match_reference_with_the_same_mask;
# DOGE against its objective in test_spectral.py
@pytest.mark.parametrize(
    "method_id", [m for m in method_ids() if not resolve(m)[1].random and not resolve(m)[1].data and "doge" not in m]
)
@pytest.mark.parametrize("scope", ["global", "module"])
def test_every_method_in_every_space_matches_reference(method_id, scope):
    space, method = resolve(method_id)
    for seed in (11, 12):
        adapters = pool(seed, drop=1)
        w = np.array([1.0, 0.5, -0.7])
        spec = MergeSpec(
            tuple(a.name for a in adapters),
            method_id,
            {"alpha": 0.8} | ({"top_k": 0.3} if "top_k" in method.params else {}),
            weights={"t0": 1.0, "t1": 0.5, "t2": -0.7},
            trim_scope=scope,
        )
        got = merge_dense(build_basis(adapters, space), spec)
        want = ref.merge(space, method.name, factors(adapters), w, scope=scope, **spec.resolved_params())
        assert set(got) == set(want)
        for m in want:
            assert rel(got[m], want[m]) < 1e-5, (method_id, scope, m, seed)
        if factored(method) and not method.data:  # the server's path: from the adapters' factors, no basis
            lora = merge_factors(adapter_factors({a.name: a for a in adapters}, spec.tasks), spec)
            for m in want:
                assert rel(lora[m][0].double() @ lora[m][1].double(), want[m]) < 1e-5, (method_id, m, seed)


def test_dare_drops_and_rescales_reproducibly():
    X = torch.randn(4, 20000, dtype=torch.float64)
    Y = dare(X, 0.3, torch.Generator().manual_seed(5))
    kept = Y != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    assert torch.allclose(Y[kept], X[kept] / 0.3)
    assert torch.equal(Y, dare(X, 0.3, torch.Generator().manual_seed(5)))
    assert not torch.equal(Y, dare(X, 0.3, torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("name", ["dare-ta", "dare-ties"])
def test_dare_methods_match_reference_with_the_same_mask(name):
    X = torch.randn(3, 500, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    mask = (dare(torch.ones_like(X), 0.6, torch.Generator().manual_seed(9)) != 0).double().numpy()
    got = METHODS[name].fn(X, w, alpha=1.3, top_k=0.4, density=0.6, generator=torch.Generator().manual_seed(9))
    want = ref.merge_rows(name, X.numpy(), w.numpy(), alpha=1.3, top_k=0.4, masks=mask, density=0.6)
    assert np.allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("space", ["knots", "core", "full"])
def test_dare_merge_is_seeded(space):
    adapters = pool(5)
    basis = build_basis(adapters, space)

    def merge(seed):
        return merge_dense(basis, MergeSpec(("t0", "t1"), f"{space}-dare-ties".removeprefix("full-"), seed=seed))

    a, b, c = merge(1), merge(1), merge(2)
    assert all(torch.equal(a[m], b[m]) for m in a)
    assert any(not torch.equal(a[m], c[m]) for m in a)


@pytest.mark.parametrize("seed", [21, 22])
def test_knots_ta_equals_ta_and_core_ta(seed):
    adapters = pool(seed)
    names = tuple(a.name for a in adapters)
    w = {"t0": 0.3, "t1": 1.0, "t2": 2.0}
    outs = [
        merge_dense(build_basis(adapters, s), MergeSpec(names, f"{s}-ta".removeprefix("full-"), {"alpha": 0.7}, w))
        for s in ("full", "knots", "core")
    ]
    for m in outs[0]:
        assert rel(outs[1][m], outs[0][m]) < 1e-6 and rel(outs[2][m], outs[0][m]) < 1e-6


@pytest.mark.parametrize("space", ["knots", "core", "full"])
def test_one_task_ta_is_the_adapter_itself(space):
    (a,) = pool(31, n=1, rslora=(True,))
    basis = build_basis([a], space)
    lora = merge_lora(basis, MergeSpec(("t0",), "ta" if space == "full" else f"{space}-ta"))
    for m, l in a.modules.items():
        B, A = lora[m]
        assert B.shape[1] == l.rank  # exact and minimal: the rank is the adapter's own
        assert rel(B.double() @ A.double(), l.delta()) < 1e-6


def test_shared_pool_basis_gives_subset_ta_exactly():
    adapters = pool(41, n=3)
    shared = build_basis(adapters, "knots")
    subset = build_basis(adapters[:2], "knots")
    spec = MergeSpec(("t0", "t1"), "knots-ta")
    x, y = merge_dense(shared, spec), merge_dense(subset, spec)
    assert all(rel(x[m], y[m]) < 1e-6 for m in y)


def test_merged_lora_is_compact_and_exact():
    adapters = pool(51)
    basis = build_basis(adapters, "knots")
    spec = MergeSpec(("t0", "t1"), "knots-ties", {"top_k": 0.5})
    dense, lora = merge_dense(basis, spec), merge_lora(basis, spec)
    for m, (B, A) in lora.items():
        assert rel(B.double() @ A.double(), dense[m]) < 1e-5
        assert B.shape[1] <= basis.modules[m].left.shape[1]
    U, A = compact(torch.randn(30, 2).double() @ torch.randn(2, 6).double(), torch.randn(6, 40).double())
    assert U.shape[1] == 2  # rank-deficient products shrink to their true rank


@pytest.mark.parametrize("space", ["knots", "core", "full"])
def test_basis_save_load_round_trip(space, tmp_path):
    adapters = pool(61, drop=2)
    basis = build_basis(adapters, space)
    basis.save(tmp_path / "b.safetensors")
    again = Basis.load(tmp_path / "b.safetensors")
    assert again.fingerprint == basis.fingerprint and again.tasks == basis.tasks
    spec = MergeSpec(("t0", "t2"), "ties" if space == "full" else f"{space}-ties")
    x, y = merge_dense(basis, spec), merge_dense(again, spec)
    assert all(torch.equal(x[m], y[m]) for m in x)


def test_trim_keeps_the_top_fraction():
    X = torch.arange(1.0, 11.0).repeat(2, 1) * torch.tensor([[1.0], [-1.0]])
    Y = METHODS["magnitude"].fn(X, torch.ones(2), top_k=0.3)
    assert torch.equal(Y, torch.zeros(10))  # the kept entries of the two rows cancel
    # the TIES reference keeps |x| >= the (d - floor(d*top_k))-th smallest: floor(d*top_k) + 1 entries
    Y = METHODS["magnitude"].fn(X[:1], torch.ones(1), top_k=0.25)
    assert torch.equal(Y, torch.tensor([0.0] * 7 + [8.0, 9.0, 10.0]))
    assert torch.equal(METHODS["magnitude"].fn(X[:1], torch.ones(1), top_k=1.0), X[0])
