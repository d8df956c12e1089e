"""Basis build and merge time: this project's low-rank KnOTS basis vs the reference dense float64 SVD.

    .venv/bin/python benchmarks/basis.py --shapes llama3-8b --modules q,k,v,o --tasks 8 --rank 16

Synthetic factors (timing does not depend on the values). The dense reference is the KnOTS paper's
algorithm: an SVD of the concatenated updates M = [ΔW_1 | … | ΔW_n] (O × nI) in float64.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from knots_serve.adapters import LoraAdapter, LoraModule
from knots_serve.basis import build_basis
from knots_serve.compose import MergeSpec, merge_lora

# (O, I) of one decoder layer's projections
SHAPES = {
    "llama3-8b": dict(q=(4096, 4096), k=(1024, 4096), v=(1024, 4096), o=(4096, 4096),
                      gate=(14336, 4096), up=(14336, 4096), down=(4096, 14336)),
    "smollm2-135m": dict(q=(576, 576), k=(192, 576), v=(192, 576), o=(576, 576),
                         gate=(1536, 576), up=(1536, 576), down=(576, 1536)),
}
NAMES = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
             gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")


def synthetic_pool(shapes: dict, modules: list[str], tasks: int, rank: int, layers: int = 1) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(0)
    pool = []
    for t in range(tasks):
        mods = {}
        for layer in range(layers):
            for m in modules:
                O, I = shapes[m]
                mods[f"model.layers.{layer}.{NAMES[m]}"] = LoraModule(
                    A=torch.randn(rank, I, generator=g) / I**0.5, B=torch.randn(O, rank, generator=g) / rank, scale=2.0)
        pool.append(LoraAdapter(f"task{t}", mods, "synthetic"))
    return pool


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def dense_reference(pool: list[LoraAdapter]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for m in pool[0].modules:
        M = torch.cat([a.modules[m].delta(torch.float64) for a in pool], dim=1)
        U, s, _ = torch.linalg.svd(M, full_matrices=False)
        out[m] = (U, s)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=list(SHAPES), default="llama3-8b")
    ap.add_argument("--modules", default="q,k,v,o")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense float64 SVD reference")
    args = ap.parse_args()
    modules = args.modules.split(",")
    pool = synthetic_pool(SHAPES[args.shapes], modules, args.tasks, args.rank)
    print(f"# {args.shapes} {'/'.join(modules)}, {args.tasks} tasks, rank {args.rank}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| step | time (s) | vs low-rank |")
    print("|---|---:|---:|")
    t_knots, basis = timed(lambda: build_basis(pool, "knots"), args.repeat)
    print(f"| KnOTS basis, low-rank (QR + core SVD) | {t_knots:.3f} | 1.0 |")
    t_core, _ = timed(lambda: build_basis(pool, "core"), args.repeat)
    print(f"| Core Space basis | {t_core:.3f} | {t_core / t_knots:.2f} |")
    names = tuple(a.name for a in pool)
    for method in ("knots-ta", "knots-ties", "knots-dare-ties"):
        t, _ = timed(lambda: merge_lora(basis, MergeSpec(names, method)), args.repeat)
        print(f"| merge {method}, all {args.tasks} tasks, from the basis | {t:.3f} | {t / t_knots:.2f} |")
    if not args.no_dense:
        t_dense, ref = timed(lambda: dense_reference(pool), 1)
        # σ of the low-rank basis: the singular values of [X_1 | … | X_n] = diag(σ)·[Vh_1 | … | Vh_n]
        err = max((lambda s_ref, s: (torch.linalg.norm(s_ref[: len(s)] - s) / torch.linalg.norm(s_ref)).item())(
            ref[m][1], torch.linalg.svdvals(torch.cat(list(ms.stack(list(names)).double()), dim=1)))
            for m, ms in basis.modules.items())
        print(f"| KnOTS basis, dense float64 SVD (reference) | {t_dense:.3f} | {t_dense / t_knots:.1f} |")
        print(f"\nrelative error of the low-rank singular values vs the dense SVD: {err:.1e}")


if __name__ == "__main__":
    main()
