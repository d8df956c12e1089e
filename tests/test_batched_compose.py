"""The compose runs batches of same-shaped modules at once: each batch gives what one module alone gives."""

import torch
from test_merge_math import SHAPES, pool, rel

from knots_serve.adapters import LoraAdapter
from knots_serve.basis import build_basis, compact_left, compact_lefts, restack
from knots_serve.compose import MergeSpec, merge_lora


def one_module(adapters, m):
    return [LoraAdapter(a.name, {m: a.modules[m]}, a.base_model) for a in adapters if m in a.modules]


def test_a_batch_of_modules_builds_what_each_module_builds_alone():
    adapters = pool(31, drop=2)
    batched = build_basis(adapters, "knots", dtype=torch.float32)
    for m in SHAPES:
        alone = build_basis(one_module(adapters, m), "knots", dtype=torch.float32).modules[m]
        ms = batched.modules[m]
        assert ms.tasks == alone.tasks and ms.left.shape == alone.left.shape
        for t in ms.tasks:
            assert rel(ms.to_dense(ms.task_tensor(t)), alone.to_dense(alone.task_tensor(t))) < 1e-5, (m, t)


def test_subset_bases_reuse_each_tasks_frames_exactly():
    adapters = pool(32)
    spec = MergeSpec(("t0", "t1"), "knots-ties")
    first = merge_lora(build_basis(adapters[:2], "knots", dtype=torch.float32), spec)
    assert all(
        (side, torch.float32) in lora.frames for a in adapters[:2] for lora in a.modules.values() for side in "AB"
    )
    again = merge_lora(build_basis(adapters[:2], "knots", dtype=torch.float32), spec)  # from the kept frames
    assert all(torch.equal(first[m][0], again[m][0]) and torch.equal(first[m][1], again[m][1]) for m in first)
    build_basis(adapters, "knots")  # a float64 pool basis keeps nothing: it is built once
    assert not any(key[1] == torch.float64 for a in adapters for lora in a.modules.values() for key in lora.frames)


def test_compact_lefts_certifies_full_rank_and_falls_back_otherwise():
    g = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(30, 6, generator=g, dtype=torch.float64))[0]
    full = torch.randn(6, 20, generator=g, dtype=torch.float64)
    emptied = full.clone()
    emptied[[1, 4]] = 0  # rows a trim emptied: dropped, the rest certified
    deficient = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 20, generator=g).double()
    items = [(U, X, None) for X in (full, emptied, deficient, torch.zeros(6, 20, dtype=torch.float64))]
    items.append((U, torch.randn(6, 4, generator=g, dtype=torch.float64), None))  # tall: compact_left's own path
    for (U_, X, _), (B, A) in zip(items, compact_lefts(items)):
        want = compact_left(U_, X)
        assert B.shape[1] == want[0].shape[1] == int(torch.linalg.matrix_rank(X)), X.shape
        assert torch.allclose(B @ A, U_ @ X, atol=1e-12)
    (B, A), _ = compact_lefts(items[1:3])
    assert B.shape[1] == 4 and torch.equal(A, emptied[[0, 2, 3, 5]])


def test_compact_lefts_of_wide_rows_certifies_from_a_few_columns_and_else_from_all():
    """Rows far wider than tall (as at 8B shapes) are first certified from the 12 of 1000 columns holding the
    largest shares of their energy. `sparse` holds all of its energy in 3 columns, which must be among them;
    `agree` has two rows equal on their heaviest columns, so only the whole rows certify it."""
    g = torch.Generator().manual_seed(6)
    U = torch.linalg.qr(torch.randn(30, 3, generator=g))[0]
    full = torch.randn(3, 1000, generator=g)
    emptied = full.clone()
    emptied[1] = 0
    deficient = torch.randn(3, 2, generator=g) @ torch.randn(2, 1000, generator=g)
    sparse = torch.zeros(3, 1000)
    sparse[[0, 1, 2], [3, 500, 997]] = torch.tensor([1.0, -2.0, 1e-3])
    agree = torch.randn(3, 1000, generator=g) / 100
    agree[:2, :12] = 10.0
    agree[0, 500:510] += 0.5
    items = [(U, X, None) for X in (full, emptied, deficient, sparse, agree)]
    got = compact_lefts(items)
    for (_, X, _), (B, A), rank in zip(items, got, (3, 2, 2, 3, 3)):
        assert B.shape[1] == compact_left(U, X)[0].shape[1] == rank
        assert torch.allclose(B.double() @ A.double(), U.double() @ X.double(), atol=1e-5)
    for X, (B, A) in zip((full, sparse, agree), (got[0], got[3], got[4])):
        assert torch.equal(B, U) and torch.equal(A, X)  # certified: kept as they are, not refactored
    assert torch.equal(got[1][1], emptied[[0, 2]])


def test_subset_basis_of_a_task_and_its_copy_has_the_tasks_rank():
    """Block Gram-Schmidt on a copy: the second task brings no new direction (its projection is 0), and the
    basis keeps r orthonormal columns, not 2r, as the QR of the stacked B's did."""
    a = pool(33)[1]
    twin = LoraAdapter(
        "twin", {m: type(lo)(A=lo.A.clone(), B=lo.B.clone(), scale=lo.scale) for m, lo in a.modules.items()}
    )
    basis = build_basis([a, twin], "knots", dtype=torch.float32)
    lora = merge_lora(basis, MergeSpec((a.name, "twin"), "knots-ta"))
    for m, lo in a.modules.items():
        U = basis.modules[m].left.double()
        assert U.shape[1] == lo.rank and torch.allclose(U.T @ U, torch.eye(lo.rank, dtype=torch.float64), atol=1e-5)
        B, A = lora[m]
        assert rel(B.double() @ A.double(), 2 * lo.delta()) < 1e-5


def test_restack_views_equally_spaced_pieces_of_one_buffer_and_copies_anything_else():
    buffer = torch.randn(4 * 6 + 5)
    pieces = [buffer[1 + 6 * j : 7 + 6 * j].view(2, 3) for j in range(4)]  # consecutive, as a merge lays modules
    view = restack(pieces)
    assert torch.equal(view, torch.stack(pieces)) and view.data_ptr() == pieces[0].data_ptr()  # no copy
    spaced = [buffer[7 * j : 7 * j + 6].view(2, 3) for j in range(3)]  # a gap between pieces: still one view
    assert torch.equal(restack(spaced), torch.stack(spaced)) and restack(spaced).data_ptr() == buffer.data_ptr()
    for other in (pieces[::-1], [pieces[0], pieces[2], pieces[1]], [buffer[:6].view(2, 3), buffer[3:9].view(2, 3)]):
        got = restack(other)  # out of order, or overlapping: stacked as a copy
        assert torch.equal(got, torch.stack(other)) and got.data_ptr() != buffer.data_ptr()
