"""Compose kernels against the memory-bandwidth floor: TIES elect + disjoint mean, and W = W0 + α·L·R.

    .venv/bin/python benchmarks/kernels.py            # GPU (Triton vs torch) when CUDA is there, else CPU torch

The floor of a kernel is the bytes it must move divided by the device's copy bandwidth, measured here
by a large device-to-device copy (so the floor is what this device actually sustains, not a datasheet).
"""

from __future__ import annotations

import argparse
import time

import torch
from knots_serve.kernels import abs_thresholds, cpu
from knots_serve.kernels.lowrank_update import lowrank_update_torch, lowrank_update_triton, triton
from knots_serve.kernels.ties import ties_merge_torch, ties_merge_triton

from knots_serve.methods import kth_smallest, trim_thresholds


def timeit(fn, device, repeat=20):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device) -> float:
    """Bytes/s of a 512 MiB copy (read + write counted)."""
    x = torch.empty(128 << 20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), device, repeat=5)
    return 2 * x.numel() * 4 / t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = args.device
    use_triton = dev == "cuda" and triton is not None
    bw = copy_bandwidth(dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}; torch {torch.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s")
    print("| kernel | shape | impl | time (ms) | floor (ms) | time / floor |")
    print("|---|---|---|---:|---:|---:|")
    g = torch.Generator(device=dev).manual_seed(0)
    # TIES over the V blocks of 8 tasks of a Llama-3-8B layer's q/k/v/o (k = 128): n × d = 8 × 128·4096·4
    for n, d in ((8, 128 * 4096 * 4), (16, 256 * 4096 * 4)):
        Y = torch.randn(n, d, device=dev, generator=g)
        thr = trim_thresholds(Y, 0.2)
        floor = (2 * n * d * 4 + d * 8) / bw
        impls = [("torch", lambda: ties_merge_torch(Y, thr))]
        if use_triton:
            impls.append(("triton", lambda: ties_merge_triton(Y, thr)))
        if cpu.available(Y):
            impls.append(("numba", lambda: cpu.ties_merge_numba(Y, thr)))
        for impl, fn in impls:
            t = timeit(fn, dev, repeat=5 if dev == "cpu" else 20)
            print(
                f"| TIES elect + disjoint mean | {n}×{d} fp32 | {impl} | {t * 1e3:.2f} | {floor * 1e3:.3f} | "
                f"{t / floor:.1f} |"
            )
        # the trim threshold: the exact k-th smallest |x| of each row (two reads of Y at best)
        k = d - int(d * 0.2)
        impls = [("torch (sampled bracket)", lambda: kth_smallest(Y.abs(), k))]
        if cpu.available(Y):
            impls.append(("numba (bit histogram)", lambda: abs_thresholds(Y, k)))
        for impl, fn in impls:
            t = timeit(fn, dev, repeat=5 if dev == "cpu" else 20)
            floor = 2 * n * d * 4 / bw
            print(
                f"| TIES trim threshold | {n}×{d} fp32 | {impl} | {t * 1e3:.2f} | {floor * 1e3:.3f} | {t / floor:.1f} |"
            )
    for (O, I, k), dtype in (
        ((4096, 4096, 128), torch.bfloat16),
        ((14336, 4096, 128), torch.bfloat16),
        ((4096, 4096, 128), torch.float32),
    ):
        W0 = torch.randn(O, I, device=dev, generator=g).to(dtype)
        L = torch.randn(O, k, device=dev, generator=g)
        R = torch.randn(k, I, device=dev, generator=g)
        out = torch.empty_like(W0)
        floor = (2 * O * I * W0.element_size() + (O + I) * k * 4) / bw
        impls = [("torch", lambda: lowrank_update_torch(W0, L, R, 1.0, out=out))]
        if use_triton:
            impls.append(("triton", lambda: lowrank_update_triton(W0, L, R, 1.0, out=out)))
        for impl, fn in impls:
            t = timeit(fn, dev, repeat=5 if dev == "cpu" else 20)
            print(
                f"| W0 + L·R | {O}×{I}, k={k}, {str(dtype).removeprefix('torch.')} | {impl} | {t * 1e3:.2f} | "
                f"{floor * 1e3:.3f} | {t / floor:.1f} |"
            )


if __name__ == "__main__":
    main()
