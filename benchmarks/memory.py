"""Memory: bytes resident for the pool's basis vs storing merges, as the task count grows.

    .venv/bin/python benchmarks/memory.py [--shapes smollm2-135m] [--rank 16] [--counts 2,4,8,16]

Bytes of real tensors: the pool's LoRAs, its KnOTS and Core bases (Basis.nbytes) and one merge of all
n tasks as exact LoRA factors (knots-ties, merge_lora), built for one decoder layer of synthetic factors on
q/k/v/o/gate/up/down and multiplied by the model's layer count (every layer has the same shapes, so bytes
scale exactly). A dense merge is one O×I update per module in bf16 (what pinning writes). "Every subset"
is arithmetic: the 2^n − n − 1 subsets of ≥ 2 tasks, each merge of s tasks of rank min(s·r, O, I) per module.
"""

from __future__ import annotations

import argparse
from math import comb

from basis import SHAPES, synthetic_pool

from knots_serve.basis import build_basis
from knots_serve.compose import MergeSpec, merge_lora

LAYERS = {"llama3-8b": 32, "smollm2-135m": 30}
MODULES = ["q", "k", "v", "o", "gate", "up", "down"]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def human(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if b < 1024:
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} EiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=list(SHAPES), default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--counts", default="2,4,8,16")
    args = ap.parse_args()
    shapes, L = SHAPES[args.shapes], LAYERS[args.shapes]
    dense = L * sum(O * I for O, I in shapes.values()) * 2  # one dense merge, bf16
    print(
        f"# {args.shapes}: {L} layers × {'/'.join(MODULES)}, rank {args.rank}, float32 factors; dense merge in bf16 "
        f"= {human(dense)}"
    )
    print(
        "| tasks | pool LoRAs | KnOTS basis | Core basis | one merge, LoRA factors (rank) | one merge, dense | "
        "every subset as LoRAs | every subset dense | every subset as LoRAs / KnOTS basis | "
        "knots-ties compose buffer, all n (transient) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in map(int, args.counts.split(",")):
        pool = synthetic_pool(shapes, MODULES, n, args.rank)
        lora = L * nbytes(t for a in pool for m in a.modules.values() for t in (m.A, m.B))
        knots = build_basis(pool, "knots")
        core_b = L * build_basis(pool, "core").nbytes()
        knots_b = L * knots.nbytes()
        merged = merge_lora(knots, MergeSpec(tuple(a.name for a in pool), "knots-ties"))
        merge_b = L * nbytes(t for BA in merged.values() for t in BA)
        rank = max(B.shape[1] for B, _ in merged.values())
        # merging n tasks stacks n·k·I float64 entries per module (k: the basis rank); the trim and TIES
        # passes hold about two more buffers of that size at their peak
        buffer = L * n * 8 * sum(ms.left.shape[1] * ms.shape[1] for ms in knots.modules.values())
        subsets = sum(comb(n, s) for s in range(2, n + 1))
        all_lora = L * sum(
            comb(n, s) * min(s * args.rank, O, I) * (O + I) * 4  # a merge's rank is ≤ s·r, O, I
            for s in range(2, n + 1)
            for O, I in shapes.values()
        )
        print(
            f"| {n} | {human(lora)} | {human(knots_b)} | {human(core_b)} | {human(merge_b)} ({rank}) | "
            f"{human(dense)} | "
            f"{human(all_lora)} ({subsets}) | {human(subsets * dense)} | {all_lora / knots_b:.3g} | {human(buffer)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
