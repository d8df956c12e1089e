"""Tuned recipes vs the defaults on the demo suite (issue 15): what `knots-serve tune` buys.

    .venv/bin/python benchmarks/quality/tuning.py            # 28 pairs, 2 subsets of 4 and of 6, all 8
    .venv/bin/python benchmarks/quality/tuning.py --quick    # 3 tasks, 4 examples, a 2-point grid

The search is the library's (`knots_serve.tune.Tuner.tune`, what `knots-serve tune` runs) on the
validation split of the 8 demo tasks; every merge is pinned into SmolLM2-135M-Instruct through the server's
PinWorker and scored by exact match, normalized by each task's own LoRA. Then, on the test split, for
every tuned subset and method: the method at the registry defaults (alpha 1, top_k 0.2, density 0.5: what
the server serves for `tasks:A+B@METHOD`) vs the method at its tuned parameters, and the subset's recipe
(the best method) vs the server's default (`default_method` knots-ties at the defaults). The scale curve is
the tuned column per subset size: hyperparameters tuned at each size, not the 8-task ones reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench.py: spinning OpenMP threads starve a shared CPU

from knots_serve.adapters import load_adapter
from knots_serve.base_model import prepare_base
from knots_serve.demo_tasks import TASKS, task_data
from knots_serve.evaluate import Evaluator
from knots_serve.recipes import RecipeBook, save_recipes
from knots_serve.tune import GRID, Tuner, subsets

REPO = Path(__file__).resolve().parents[2]
QUICK_GRID = {"alpha": (0.6, 1.0), "top_k": (0.2,), "density": (0.5,)}
DEFAULT_METHOD = "knots-ties"  # configs/default.yaml


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 tasks, 4 examples, a 2-point grid")
    p.add_argument("--methods", default="ta,ties,knots-ties")
    p.add_argument("--subsets", default="pairs,4:2,6:2,all", help="as `knots-serve tune --subsets`")
    p.add_argument("--val-n", type=int, default=20, help="validation examples per task (the search)")
    p.add_argument("--test-n", type=int, default=50, help="test examples per task (the comparison)")
    p.add_argument("--work", default="/tmp/knots-tuning", help="bases and the evaluation cache (resumable)")
    p.add_argument("--out", help="results (default: benchmarks/quality/results/tuning)")
    p.add_argument("--dtype", default="auto", help="vLLM's dtype (float32 on CPUs without AVX512-BF16)")
    p.add_argument("--eager", action="store_true")
    args = p.parse_args(argv)
    tasks = ["sentiment", "last_word", "add"] if args.quick else list(TASKS)
    if args.quick:
        args.val_n, args.test_n, args.subsets = 4, 4, "pairs,all"
    grid = QUICK_GRID if args.quick else GRID
    methods = [m for m in args.methods.split(",") if m]
    out = Path(args.out or (Path(args.work) / "quick" if args.quick else REPO / "benchmarks/quality/results/tuning"))
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tag = "" if args.dtype == "auto" else "-" + args.dtype
    evaluator = Evaluator(prepare_base(), work / f"evals{tag}.json", args.eager, args.dtype, max_model_len=512)
    tuner = Tuner({t: load_adapter(REPO / "adapters" / t, t) for t in tasks}, evaluator, work)
    data = {s: {t: task_data(t, s) for t in tasks} for s in ("val", "test")}
    val = {t: dataclasses.replace(d, examples=d.examples[: args.val_n]) for t, d in data["val"].items()}
    chosen = subsets(args.subsets.split(","), tasks)
    recipes, log = tuner.tune(chosen, methods, val, DEFAULT_METHOD, grid)
    tune_s = time.time() - t0

    rows = []  # one per (subset, method): test scores at the defaults and at the tuned parameters
    for entry in log:
        sub, method = entry["tasks"], entry["method"]
        at = {"default": {}, "tuned": entry["params"]}
        test = {k: tuner.score(tuner.merge(method, sub, params), data["test"], args.test_n) for k, params in at.items()}
        rows.append(
            {"tasks": sub, "method": method, "params": entry["params"], "val": entry["score"]}
            | {k: round(v["per_task"], 4) for k, v in test.items()}
        )
    recipe_rows = []
    for r in recipes:
        served = tuner.score(tuner.merge(r.method, r.tasks, r.params), data["test"], args.test_n)["per_task"]
        default = tuner.score(tuner.merge(DEFAULT_METHOD, r.tasks, {}), data["test"], args.test_n)["per_task"]
        recipe_rows.append(
            {
                "tasks": list(r.tasks),
                "recipe": r.method,
                "params": r.params,
                "recipe_test": served,
                "default_test": default,
            }
        )
    res = {
        "tasks": tasks,
        "args": vars(args),
        "rows": rows,
        "recipes": recipe_rows,
        "wall_s": {
            "total": round(time.time() - t0, 1),
            "tune": round(tune_s, 1),
            "pin": round(evaluator.seconds["pin"], 1),
            "generate": round(evaluator.seconds["generate"], 1),
            "prompts_generated": evaluator.prompts,
        },
        "machine": next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "unknown"
        ),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "results.json").write_text(json.dumps(res, indent=1))
    save_recipes(out / "recipes.json", RecipeBook(recipes))
    text = report(res, methods)
    (out / "results.md").write_text(text + "\n")
    plot(res, methods, out / "scale.png")
    print("\n" + text + f"\n\nwall time {res['wall_s']}; results in {out}")
    return 0


def _mean(xs) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def report(res: dict, methods: list[str]) -> str:
    sizes = sorted({len(r["tasks"]) for r in res["rows"]})
    lines = [
        f"Test split: {res['args']['test_n']} examples per task; search on {res['args']['val_n']} validation "
        "examples per task. Normalized accuracy, mean over the subsets of each size (count in the header).",
        "",
        "| method | "
        + " | ".join(
            f"k={k} ({len({tuple(r['tasks']) for r in res['rows'] if len(r['tasks']) == k})}) default / tuned"
            for k in sizes
        )
        + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for m in methods:
        cells = []
        for k in sizes:
            rs = [r for r in res["rows"] if r["method"] == m and len(r["tasks"]) == k]
            cells.append(f"{_mean([r['default'] for r in rs]):.3f} / **{_mean([r['tuned'] for r in rs]):.3f}**")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    cells = []
    for k in sizes:
        rs = [r for r in res["recipes"] if len(r["tasks"]) == k]
        cells.append(f"{_mean([r['default_test'] for r in rs]):.3f} / **{_mean([r['recipe_test'] for r in rs]):.3f}**")
    lines.append(f"| server: {DEFAULT_METHOD} default / recipe | " + " | ".join(cells) + " |")
    won = {}
    for r in res["recipes"]:
        won.setdefault(len(r["tasks"]), []).append(r["recipe"])
    lines += [
        "",
        "Methods the recipes chose, per size: "
        + "; ".join(
            f"k={k}: " + ", ".join(f"{m} ×{v.count(m)}" for m in sorted(set(v))) for k, v in sorted(won.items())
        )
        + ".",
    ]
    return "\n".join(lines)


def plot(res: dict, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({len(r["tasks"]) for r in res["rows"]})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, m in enumerate(methods):
        for col, style in (("tuned", "-"), ("default", ":")):
            ys = [_mean([r[col] for r in res["rows"] if r["method"] == m and len(r["tasks"]) == k]) for k in sizes]
            ax.plot(sizes, ys, style, marker="o", color=f"C{i}", label=f"{m} ({col})")
    ax.set_xlabel("tasks merged")
    ax.set_ylabel("normalized accuracy (test)")
    ax.set_title("Per-size tuned vs default parameters (SmolLM2 demo LoRAs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
