"""Compose time: a merged adapter for a new subset from the resident basis vs recomputing from scratch
(building the subset's basis, then merging), on the 8 demo adapters and as the task count and rank grow.

    .venv/bin/python benchmarks/compose.py [--layers 4] [--ranks 8,16,64] [--counts 2,4,8,16]

Table 1: the 8 trained demo adapters (SmolLM2-135M, rank 16, q/k/v/o of 30 layers), every method from
the resident pool basis (the server's default, `basis: shared`) vs the same merge from scratch (build the
pool basis, then merge) and vs the subset's own basis (`basis: subset`, the KnOTS paper's setting: for
TIES/DARE another merge, equal for TA). Table 2: synthetic SmolLM2-135M q/k/v/o factors, --layers
layers, a pool of max(--counts) tasks per rank whose basis is resident (as in the server); each row
merges the first n tasks. Times are the median of --repeat runs, one thread (torch.set_num_threads(1):
on this shared 2-core machine two threads measure the neighbours more than the code).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from basis import SHAPES, synthetic_pool

from knots_serve.adapters import load_adapter
from knots_serve.basis import build_basis
from knots_serve.compose import MergeSpec, merge_lora

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["add", "sentiment", "reverse_words", "to_digits", "sort_numbers", "max_number", "last_word", "pick_category"]
RESIDENT = ("knots-ties", "core-ties", "knots-ta")


def median_time(repeat: int, fn, *args) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_selection() -> str:
    """The sampled-bracket selection (used on long rows) must equal torch.kthvalue exactly."""
    try:
        from knots_serve.methods import kth_smallest
    except ImportError:  # a version before it (for before/after timings: PYTHONPATH=<old checkout>)
        return "no sampled selection in this version of knots_serve"
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 600_000, generator=g, dtype=torch.float64).abs()
    A[1, ::3] = 0  # ties at zero, as after DARE
    A[2] = A[2].round(decimals=2)  # many repeated values
    for k in (1, 1000, 300_000, 480_001, 600_000):
        assert torch.equal(kth_smallest(A, k), A.kthvalue(k, dim=1).values), k
    return "kth_smallest == torch.kthvalue on 3 × 600000 rows (zeros, repeats), 5 ranks"


def from_scratch(adapters, names, method: str):
    """Build a basis over `adapters`, then merge `names` in it."""
    return merge_lora(build_basis(adapters, method.split("-")[0]), MergeSpec(names, method))


def timings(pool, bases, names, method: str, repeat: int) -> tuple[float, float, float]:
    """(resident pool basis, the same merge from scratch, the subset's own basis from scratch) for one merge."""
    subset = [a for a in pool if a.name in names]
    return (
        median_time(repeat, merge_lora, bases[method.split("-")[0]], MergeSpec(names, method)),
        median_time(repeat, from_scratch, pool, names, method),
        median_time(repeat, from_scratch, subset, names, method),
    )


def demo_table(repeat: int, methods: list[str], sizes: list[int]) -> None:
    pool = [load_adapter(ROOT / "adapters" / t, t) for t in DEMO]
    bases = {s: build_basis(pool, s) for s in ("knots", "core")}
    print(
        "| subset | method | resident pool basis (s) | same merge from scratch: pool basis + merge (s) | speedup | "
        "subset's own basis + merge (s) | resident / subset basis |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for names in (tuple(DEMO[:n]) for n in sizes):
        for method in methods:
            t_res, t_new, t_sub = timings(pool, bases, names, method, repeat)
            print(
                f"| {len(names)} tasks | {method} | {t_res:.3f} | {t_new:.3f} | {t_new / t_res:.2f} | {t_sub:.3f} | "
                f"{t_res / t_sub:.2f} |",
                flush=True,
            )


def scaling_table(layers: int, ranks: list[int], counts: list[int], repeat: int) -> None:
    shapes = SHAPES["smollm2-135m"]
    print(
        "| rank | tasks | knots-ties, resident (s) | knots-ties, pool basis + merge (s) | speedup | "
        "knots-ties, subset basis + merge (s) | core-ties, resident (s) | knots-ta, resident (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in ranks:
        pool = synthetic_pool(shapes, ["q", "k", "v", "o"], max(counts), r, layers)
        bases = {s: build_basis(pool, s) for s in ("knots", "core")}
        for n in counts:
            names = tuple(a.name for a in pool[:n])
            t_res, t_new, t_sub = timings(pool, bases, names, "knots-ties", repeat)
            t_core = median_time(repeat, merge_lora, bases["core"], MergeSpec(names, "core-ties"))
            t_ta = median_time(repeat, merge_lora, bases["knots"], MergeSpec(names, "knots-ta"))
            print(
                f"| {r} | {n} | {t_res:.3f} | {t_new:.3f} | {t_new / t_res:.2f} | {t_sub:.3f} | {t_core:.3f} | "
                f"{t_ta:.3f} |",
                flush=True,
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the synthetic pool")
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--counts", default="2,4,8,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and the exactness check only (for tests)")
    ap.add_argument("--table", choices=("demo", "scaling", "both"), default="both")
    ap.add_argument("--demo-methods", default=",".join(RESIDENT + ("knots-dare-ties",)))
    ap.add_argument("--demo-sizes", default="2,4,8", help="subset sizes (the first n demo tasks)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s); {check_selection()}", flush=True)
    if args.quick:
        scaling_table(1, [8], [2, 4], 1)
        return
    if args.table != "scaling":
        print("\n## the 8 demo adapters (SmolLM2-135M, rank 16, q/k/v/o × 30 layers)")
        demo_table(args.repeat, args.demo_methods.split(","), [int(x) for x in args.demo_sizes.split(",")])
    if args.table == "demo":
        return
    print(
        f"\n## synthetic SmolLM2-135M q/k/v/o × {args.layers} layers, resident basis over "
        f"{max(map(int, args.counts.split(',')))} tasks"
    )
    scaling_table(
        args.layers, [int(x) for x in args.ranks.split(",")], [int(x) for x in args.counts.split(",")], args.repeat
    )


if __name__ == "__main__":
    main()
