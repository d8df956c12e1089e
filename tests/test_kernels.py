"""Triton kernels against their torch references, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1 must be set before Triton compiles anything, so the checks run in a subprocess)."""

import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_triton_kernels_match_torch_under_the_interpreter():
        pytest.importorskip("triton")
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env=os.environ | {"TRITON_INTERPRET": "1"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert " passed" in r.stdout and "skipped" not in r.stdout

else:
    from knots_serve.kernels.lowrank_update import lowrank_update_torch, lowrank_update_triton
    from knots_serve.kernels.ties import ties_merge_torch, ties_merge_triton

    from knots_serve.methods import dare, trim_thresholds

    @pytest.mark.parametrize(
        "n, d, top_k, seed", [(3, 1000, 0.2, 0), (8, 4097, 0.5, 1), (1, 37, 1.0, 2), (5, 2500, 0.05, 3)]
    )
    def test_ties_merge(n, d, top_k, seed):
        g = torch.Generator().manual_seed(seed)
        Y = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g)
        Y = dare(Y, 0.7, g)  # zeros, as after DARE
        thr = trim_thresholds(Y, top_k)
        want = ties_merge_torch(Y.double(), thr.double()).float()
        got = ties_merge_triton(Y, thr, block=256)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)

    def test_ties_merge_resolves_zero_signs_to_the_majority():
        Y = torch.tensor([[1.0, 2.0, -1.0, 3.0], [-1.0, 1.0, 1.0, 1.0]])  # column 0 sums to 0 -> majority +
        got = ties_merge_triton(Y, torch.zeros(2), block=2)
        assert torch.equal(got, ties_merge_torch(Y, torch.zeros(2)))
        assert got[0].item() == 1.0

    @pytest.mark.parametrize("M, N, K, seed", [(64, 64, 16, 0), (100, 77, 5, 1), (257, 130, 48, 2), (1, 300, 1, 3)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_lowrank_update(M, N, K, seed, dtype):
        g = torch.Generator().manual_seed(seed)
        W0 = torch.randn(M, N, generator=g).to(dtype)
        L, R = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
        want = lowrank_update_torch(W0, L, R, 0.7)
        got = lowrank_update_triton(W0, L, R, 0.7)
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
        assert torch.allclose(got.float(), want.float(), **tol)

    def test_lowrank_update_writes_into_a_strided_slice():
        g = torch.Generator().manual_seed(4)
        packed = torch.randn(96, 40, generator=g)  # like qkv_proj: write rows 32..63 only
        before = packed.clone()
        L, R = torch.randn(32, 3, generator=g), torch.randn(3, 40, generator=g)
        lowrank_update_triton(before[32:64], L, R, 1.5, out=packed[32:64])
        assert torch.equal(packed[:32], before[:32]) and torch.equal(packed[64:], before[64:])
        assert torch.allclose(packed[32:64], before[32:64] + 1.5 * L @ R, atol=1e-4)
