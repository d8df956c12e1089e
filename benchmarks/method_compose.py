"""Compose cost per merge method on the serving path, against knots-ties and knots-ta in the same run.

    .venv/bin/python benchmarks/method_compose.py --model demo                  # the 8 demo adapters (SmolLM2)
    .venv/bin/python benchmarks/method_compose.py --model llama3-8b --layers 1  # synthetic, × 32 per model

What a server composes for `tasks:A+B@METHOD` (the basis store's `merge`, `basis: auto`, factors back on the
host), for a subset of 2 and of 8 tasks of a pool of 8 rank-16 adapters. The subset-basis cache is cleared
before each run, as for a never-seen merge. `demo`: the trained adapters (q/k/v/o of 30 layers);
`llama3-8b` / `smollm2-135m`: synthetic factors (benchmarks/basis.py) of q/k/v/o/gate/up/down in --layers
layers; "per model" multiplies by the model's layer count. Each time is the median of --repeat runs after
a warm-up; `ratio` is to knots-ties at the same size. --json writes the rows.

The data-aware methods read each task's statistics: for `demo`, the files `knots-serve stats` wrote (--stats,
default state/stats); for a synthetic pool, random PSD Grams (dense up to 8192 input features, above it the
top-256 eigenpairs + diagonal form, as `knots-serve stats --sketch-rank 256` writes them).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from basis import SHAPES, synthetic_pool

from knots_serve.adapters import load_adapter
from knots_serve.serving.merges.basis_store import REGMEAN_MAX_INPUT, BasisStore
from knots_serve.serving.merges.names import parse_model
from knots_serve.stats import Gram, StatsDir, TaskStats

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["add", "sentiment", "reverse_words", "to_digits", "sort_numbers", "max_number", "last_word", "pick_category"]
METHODS = (
    "knots-ta",
    "knots-ties",
    "iso-c",
    "iso-cts",
    "tsv",
    "cart",
    "core-doge",
    "knots-doge",
    "wudi",
    "core-regmean",
)
LAYERS = {"llama3-8b": 32, "smollm2-135m": 30, "demo": 1}


def timed(fn, repeat: int) -> float:
    fn()  # warm-up: kernels compiled, the shared basis built
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_stats(pool, where: Path, sketch_rank: int = 256) -> None:
    """Random PSD Grams per task and distinct module input (L·Lᵀ + diag, L of 64 columns), written to `where`."""
    g = torch.Generator().manual_seed(0)
    for a in pool:
        grams = {}
        for m, lora in a.modules.items():
            inp = lora.A.shape[1]
            L = torch.randn(inp, 64, generator=g) / 8
            d = torch.rand(inp, generator=g) + 0.1
            if inp > REGMEAN_MAX_INPUT:
                L = torch.cat([L, torch.zeros(inp, sketch_rank - 64)], dim=1)
                grams[m] = Gram(low=L, diag_rest=d)
            else:
                grams[m] = Gram(dense=L @ L.T + torch.diag(d))
        StatsDir(where).put(TaskStats(a.name, 1000, 10, a.digest, "synthetic", grams))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(LAYERS), default="demo")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of a synthetic pool")
    ap.add_argument("--subsets", default="2,8")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--stats", type=Path, default=ROOT / "state" / "stats", help="demo: the statistics directory")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "demo":
        pool = [load_adapter(ROOT / "adapters" / n, n) for n in DEMO]
        scale = 1
    else:
        shapes = SHAPES[args.model]
        pool = synthetic_pool(shapes, list(shapes), 8, 16, args.layers)
        scale = LAYERS[args.model] / args.layers
    stats_dir = args.stats
    if args.model != "demo" and any("regmean" in m for m in args.methods.split(",")):
        stats_dir = Path(tempfile.mkdtemp(prefix="knots-stats-"))
        synthetic_stats(pool, stats_dir)
    store = BasisStore({a.name: a for a in pool}, "cpu", stats_dir=stats_dir)
    store.basis("knots", "shared", ())
    cpu = platform.processor() or platform.machine()
    print(
        f"# {args.model}{'' if args.model == 'demo' else f' × {args.layers} layer(s), per model × {scale:g}'}; "
        f"pool of {len(pool)}; cpu ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeat}"
    )
    print("| method | tasks | compose (s) | per model (s) | ratio to knots-ties |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for n in (int(s) for s in args.subsets.split(",")):
        names = "+".join(a.name for a in pool[:n])
        times = {}
        for method in args.methods.split(","):
            sel = parse_model(f"tasks:{names}@{method}", "knots-ties")
            times[method] = timed(lambda: (store.clear_subsets(), store.merge(sel)), args.repeat)
        base = times.get("knots-ties", float("nan"))  # ratios once every method of this size is timed
        for method, t in times.items():
            rows.append({"method": method, "tasks": n, "seconds": t, "per_model_s": t * scale, "ratio": t / base})
            print(f"| {method} | {n} | {t:.3f} | {t * scale:.2f} | {t / base:.2f} |", flush=True)
    if args.json:
        meta = {"model": args.model, "layers": args.layers, "cpu": cpu, "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
