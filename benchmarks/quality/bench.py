"""The KnOTS quality benchmark: the paper's protocol (Stoica et al. 2025, §5) on the demo tasks.

    .venv/bin/python benchmarks/quality/bench.py            # all 8 demo tasks (wall time: docs/BENCHMARKS.md)
    .venv/bin/python benchmarks/quality/bench.py --quick    # CI: 2 tasks, 4 examples, a 2-point grid

Every number is exact-match accuracy of greedy answers from vLLM with the merge pinned into the weights
(evaluate.py), on SmolLM2-135M-Instruct with the committed rank-16 q/k/v/o adapters (adapters/).
- Normalized accuracy of a task: merged-model accuracy / the task's own LoRA accuracy (same split, same path).
- Per-task setting: one merge of all tasks, each task's test prompts, normalized, averaged over tasks.
- Joint setting: the same merge answers the test prompts of every task mixed in one batch; pooled exact
  matches / pooled exact matches of the LoRAs. Each demo prompt states its task in its first line, so
  the two settings share generations and differ in the aggregate and in the hyperparameters chosen for it.
- Hyperparameters: one coordinate search for every method on the validation split only (alpha over its
  grid, then top_k, then DARE density; ties keep the earlier value), once per setting. DARE methods
  search with seed 0 and report the test mean ± std over --seeds seeds. The test split is only scored.
- Scale: merges of k = 2, 4, 6 tasks (--subsets random subsets each, fixed seeds) and of all tasks; each
  subset's parameters searched on its own validation examples (--scale-val-n per task; --no-scale-tune:
  the all-task per-task parameters for every size). KnOTS-TIES also with a basis built from the subset
  alone, and in the basis the server's `basis: auto` picks (subset when it spans at most half the pool's
  rank).
- Methods: the classic ones, KnOTS/Core TIES, and the spectral ones (iso-c, iso-cts, tsv, cart: the same
  merge in every space, one id each) and core-doge; grids in knots_serve/tune.py (GRID). The data-aware
  ones (regmean, core-regmean) read each task's statistics, measured (`knots-serve stats`'s code) on the
  first --stats-n validation examples: the test split never feeds them; wudi is data-free.
- Examples curve (--stats-curve 4,16,64): the data-aware merges of all tasks, at the per-task parameters
  chosen above, with statistics from that many validation examples per task, scored on test.
- RegMean++ (--layerwise N): regmean's per-task merge of all tasks made layer by layer (each layer's Grams
  measured with the layers below merged) from N validation examples per task, at regmean's chosen
  parameters, against regmean from the same N examples (the examples curve's point N), test split.
- Sketched statistics (--sketch-curve 16,64): the same with each Gram as its top-S eigenpairs + exact
  diagonal (`knots-serve stats --sketch-rank S`), and the bytes per task each form takes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

# OpenMP threads that spin while they wait make every other process on a shared CPU crawl, and pinning
# (compose in the worker) crawl with them: measured 108 s vs 2.8 s for one 8-task merge at load 10.
# Set before torch loads; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from knots_serve.adapters import load_adapter, save_factors
from knots_serve.base_model import prepare_base
from knots_serve.compose import MergeSpec
from knots_serve.demo_tasks import TASKS, task_data
from knots_serve.evaluate import Evaluator, Merge
from knots_serve.methods import resolve
from knots_serve.stats import StatsDir
from knots_serve.stats_run import layerwise_regmean, load_model, stats_for
from knots_serve.task_data import digest
from knots_serve.tune import GRID, Tuner

REPO = Path(__file__).resolve().parents[2]
OLD = ("ta", "ties", "dare-ties", "knots-ties", "knots-dare-ties", "core-ties")
# the spectral methods are the same in every space (one id each); DOGE in the Core space, per-request sized
NEW = ("iso-c", "iso-cts", "tsv", "cart", "core-doge")
DATA = ("regmean", "core-regmean", "wudi")  # wudi: data-free, the closed form of a data-like objective
METHODS = OLD + NEW + DATA
SUBSET_BASIS = ("knots-ties",)  # also in the subset's own basis and in the server's auto choice (scale run)
QUICK_GRID = {"alpha": (1.0, 2.0), "top_k": (0.2,), "density": (0.5,), "reduce": (0.95,)}
SETTINGS = ("per_task", "joint")


class Bench:
    """The benchmark's protocol on the library's Tuner (knots_serve/tune.py: scores, search, bases)."""

    def __init__(self, args):
        self.args, self.tasks = args, args.tasks
        adapters = {t: load_adapter(REPO / "adapters" / t, t) for t in self.tasks}
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        evaluator = Evaluator(
            prepare_base(),
            work / f"evals{'' if args.dtype == 'auto' else '-' + args.dtype}.json",
            eager=args.eager,
            dtype=args.dtype,
            max_model_len=512,
        )
        self.data = {split: {t: task_data(t, split) for t in self.tasks} for split in ("val", "test")}
        self.tuner = Tuner(adapters, evaluator, work, self.statistics(args.stats_n, adapters))
        self.n = {"val": args.val_n, "test": args.test_n}
        self.lora = {split: self.tuner.lora(self.data[split], self.n[split]) for split in self.data}

    def statistics(self, n: int, adapters=None) -> dict:
        """Each task's statistics from its first n validation examples (measured once, kept in --work)."""
        adapters = adapters or self.tuner.adapters
        examples = {t: list(self.data["val"][t].examples[:n]) for t in self.tasks}
        return stats_for(prepare_base(), adapters, examples, StatsDir(Path(self.args.work) / "stats"))

    def layerwise(self, n: int, params: dict) -> float:
        """RegMean++ of all tasks at regmean's chosen per-task parameters, from n validation examples per
        task: composed here (transformers), pinned as factors, scored on test (per-task normalized)."""
        spec = MergeSpec(tuple(self.tasks), "regmean", params)
        fp = digest(
            f"regmean++/{n}/{spec.key()}".encode(), *(self.tuner.adapters[t].digest.encode() for t in self.tasks)
        )
        path = Path(self.args.work) / f"factors-layerwise-{fp}.safetensors"
        if not path.is_file():
            model, tok = load_model(prepare_base())
            data = {t: list(self.data["val"][t].examples[:n]) for t in self.tasks}
            save_factors(layerwise_regmean(model, tok, self.tuner.adapters, data, spec), path)
        return self.score(Merge(spec, path, fp, kind="factors"), "test", self.args.test_n)["per_task"]

    def merge(self, method: str, tasks, params: dict, seed: int = 0, basis: str = "shared") -> Merge:
        """basis: shared (all the run's tasks), subset (the merged tasks alone), auto (the server's rule)."""
        return self.tuner.merge(method, tasks, params, seed, basis)

    def score(self, merge: Merge, split: str, n: int) -> dict:
        return self.tuner.score(merge, self.data[split], n)

    def search(self, method: str, setting: str, tasks=None, n=None) -> tuple[dict, float, list]:
        """The coordinate search on validation: of the all-task merge, or of one subset (scale run)."""
        grid = QUICK_GRID if self.args.quick else GRID | self.args.grid
        tasks, n = tasks or self.tasks, n or self.args.val_n
        return self.tuner.search(method, tasks, self.data["val"], grid, setting, n, "shared")

    def test(self, method: str, params: dict) -> list[dict]:
        seeds = range(self.args.seeds) if resolve(method)[1].random else [0]
        return [self.score(self.merge(method, self.tasks, params, seed), "test", self.args.test_n) for seed in seeds]

    def base(self) -> dict[str, float]:
        got = self.tuner.scores(None, self.data["test"], self.args.test_n)
        return {t: statistics.fmean(v) for t, v in got.items()}

    def scale_subsets(self) -> dict[int, list[tuple[str, ...]]]:
        out = {}
        for k in self.args.ks:
            if 2 <= k < len(self.tasks):
                combos = list(itertools.combinations(self.tasks, k))
                out[k] = random.Random(f"scale:{k}").sample(combos, min(self.args.subsets, len(combos)))
        out[len(self.tasks)] = [tuple(self.tasks)]
        return out


def mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items())


def report(res: dict) -> str:
    tasks = res["tasks"]
    lines = [
        f"Test split: {res['args']['test_n']} prompts per task; validation: {res['args']['val_n']}.",
        "",
        "| task | base | LoRA (test) | LoRA (val) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t} | {res['base'][t]:.3f} | {res['lora_test'][t]:.3f} | {res['lora_val'][t]:.3f} |" for t in tasks]
    for setting, title in (("per_task", "Per-task setting"), ("joint", "Joint setting")):
        lines += [
            "",
            f"**{title}** (normalized accuracy; merge of all {len(tasks)} tasks)",
            "",
            "| method | chosen on val | val | test | " + " | ".join(tasks) + " |",
            "|---|---|---|---|" + "---|" * len(tasks),
        ]
        for m, r in res["methods"].items():
            r = r[setting]
            per = [
                statistics.fmean(run["accuracy"][t] for run in r["test"]) / max(res["lora_test"][t], 1e-9)
                for t in tasks
            ]
            se = std_error(r["test"][0]["accuracy"], res["lora_test"], res["args"]["test_n"])
            lines.append(
                f"| {m} | {params_text(r['params'])} | {r['val']:.3f} | "
                f"{mean_std([run[setting] for run in r['test']])} ± {se:.3f} | "
                + " | ".join(f"{x:.2f}" for x in per)
                + " |"
            )
    ks = sorted({int(k) for c in res["scale"].values() for k in c})
    accuracy, rows = res.get("scale_accuracy", {}), {}
    for name, curve in res["scale"].items():
        cells = []
        for k in ks:
            runs = accuracy.get(name, {}).get(str(k), [])
            ses = [std_error(a, res["lora_test"], res["args"]["scale_n"]) for a in runs]
            se = f" ± {(sum(x * x for x in ses) ** 0.5) / len(ses):.3f}" if ses else ""
            cells.append(f"{statistics.fmean(curve[str(k)]):.3f}{se}")
        rows[name] = cells
    title = "**Scale** (per-task normalized accuracy, mean over subsets; test split, "
    title += f"{res['args']['scale_n']} prompts per task)"
    lines += table(title, [f"k={k}" for k in ks], rows)
    where = f"the {len(tasks)}-task merge at the per-task parameters chosen above, test split"
    curve = res.get("stats_curve", {})
    if curve:
        ns = sorted({int(n) for c in curve.values() for n in c})
        rows = {m: [f"{c[str(n)]:.3f}" for n in ns] for m, c in curve.items()}
        lines += table(f"**Examples per task** behind the statistics ({where})", [f"n={n}" for n in ns], rows)
    sketch = res.get("sketch_curve", {})
    if sketch:
        rs, mib = sorted({int(r) for c in sketch.values() for r in c}), res["sketch_bytes"]
        heads = [f"S={r or 'dense'} ({mib[str(r)] / 2**20:.1f} MiB)" for r in rs]
        rows = {m: [f"{c[str(r)]:.3f}" for r in rs] for m, c in sketch.items()}
        title = f"**Sketched statistics**: each Gram as its top-S eigenpairs + exact diagonal ({where}; MiB per task)"
        lines += table(title, heads, rows)
    if "layerwise" in res:
        lw = res["layerwise"]
        lines += [
            "",
            f"**RegMean++** ({where}, statistics from {lw['n']} examples per task): layer by layer "
            f"{lw['regmean++']:.3f}, RegMean {lw['regmean']:.3f}.",
        ]
    lines += ["", "(± one standard error of the test estimate: binomial per task, combined over tasks and subsets.)"]
    return "\n".join(lines)


def table(title: str, heads: list[str], rows: dict[str, list[str]]) -> list[str]:
    """A markdown table of one row per method, under its title."""
    out = ["", title, "", "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    return out + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]


def std_error(accuracy: dict, lora: dict, n: int) -> float:
    """Standard error of a per-task normalized accuracy: each task's binomial error over n test prompts,
    divided by its LoRA's accuracy, combined over the tasks."""
    var = sum(a * (1 - a) / n / max(lora[t], 1e-9) ** 2 for t, a in accuracy.items())
    return var**0.5 / len(accuracy)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in res["scale"].items():
        ks = sorted(curve, key=int)
        ax.plot(
            [int(k) for k in ks],
            [statistics.fmean(curve[k]) for k in ks],
            marker="o",
            label=name,
            linestyle="--" if "subset" in name else ":" if "auto" in name else "-",
        )
    ax.set_xlabel("tasks merged")
    ax.set_ylabel("normalized accuracy (test)")
    ax.set_title("Merging the SmolLM2 demo LoRAs (rank 16, q/k/v/o)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI mode: 2 tasks, 4 examples, 2-point grid, 2 seeds")
    p.add_argument("--tasks", help="comma-separated demo tasks (default: all; --quick: sentiment,last_word)")
    p.add_argument("--val-n", type=int, default=20, help="validation prompts per task for the search")
    p.add_argument("--test-n", type=int, default=200)
    p.add_argument("--scale-n", type=int, default=50, help="test prompts per task in the scale run")
    p.add_argument("--ks", default="2,4,6", help="subset sizes of the scale run (all tasks is always added)")
    p.add_argument("--subsets", type=int, default=3, help="random subsets per size in the scale run")
    p.add_argument("--seeds", type=int, default=3, help="DARE seeds at test time")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        help="NAME=v1,v2,… replaces or adds a parameter's search grid (e.g. lines=0,0.2,0.5,1: LiNeS β)",
    )
    p.add_argument("--scale-val-n", type=int, default=10, help="validation prompts per task, scale searches")
    p.add_argument(
        "--scale-tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="search each scale subset's parameters on its validation examples (else: the all-task ones)",
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--stats-n", type=int, default=64, help="validation examples per task behind the statistics")
    p.add_argument("--stats-curve", default="", help="comma list of examples per task for the examples curve")
    p.add_argument("--layerwise", type=int, default=0, help="RegMean++ from this many examples per task (0: off)")
    p.add_argument("--sketch-curve", default="", help="comma list of sketch ranks S (0: dense) for the statistics")
    p.add_argument("--work", default="/tmp/knots-quality", help="bases and the evaluation cache (resumable)")
    p.add_argument("--out", help="results.json, results.md, scale.png (default: benchmarks/quality/results)")
    p.add_argument("--eager", action="store_true", help="no torch.compile in vLLM (starts faster, runs slower)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="vLLM's dtype (auto: the model's bf16; float32 is far faster on CPUs without AVX512-BF16)",
    )
    p.add_argument("--render", action="store_true", help="only rewrite results.md and scale.png from results.json")
    args = p.parse_args(argv)
    if args.quick:
        args.val_n, args.test_n, args.scale_n, args.seeds, args.ks, args.stats_n = 4, 4, 4, 2, "", 4
        args.tasks = args.tasks or "sentiment,last_word"
    args.tasks = [t.strip() for t in (args.tasks or ",".join(TASKS)).split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.grid = {k: tuple(float(v) for v in vs.split(",")) for k, _, vs in (g.partition("=") for g in args.grid)}
    except ValueError:
        p.error(f"--grid: expected NAME=v1,v2,…, got {args.grid}")
    args.ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
    unknown = [t for t in args.tasks if t not in TASKS] + [m for m in args.methods if m not in METHODS]
    if unknown or len(args.tasks) < 2:
        p.error(
            f"need at least 2 known tasks ({', '.join(TASKS)}) and methods from {', '.join(METHODS)}; "
            f"got unknown {unknown}"
            if unknown
            else "need at least 2 tasks"
        )
    out = Path(args.out or (Path(args.work) / "quick" if args.quick else REPO / "benchmarks/quality/results"))
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        res = json.loads((out / "results.json").read_text())
        (out / "results.md").write_text(report(res) + "\n")
        plot(res, out / "scale.png")
        print(report(res))
        return 0

    t0 = time.time()
    bench = Bench(args)
    start_s = time.time() - t0
    res = {
        "tasks": args.tasks,
        "args": {k: v for k, v in vars(args).items() if k not in ("tasks",)},
        "lora_val": {t: statistics.fmean(v) for t, v in bench.lora["val"].items()},
        "lora_test": {t: statistics.fmean(v) for t, v in bench.lora["test"].items()},
        "base": bench.base(),
        "methods": {},
        "scale": {},
    }
    for method in args.methods:
        res["methods"][method] = {}
        for setting in SETTINGS:
            params, val, trail = bench.search(method, setting)
            res["methods"][method][setting] = {
                "params": params,
                "val": val,
                "search": trail,
                "test": bench.test(method, params),
            }
            print(
                f"{method:>16} {setting:>8}: {params_text(params)}  val {val:.3f}  test "
                f"{mean_std([r[setting] for r in res['methods'][method][setting]['test']])}",
                flush=True,
            )
    res["scale_params"] = {}
    for k, subsets in bench.scale_subsets().items():
        for method in args.methods:
            if args.scale_tune and k < len(args.tasks):  # each subset searched on its own validation examples
                chosen = [bench.search(method, "per_task", s, args.scale_val_n)[0] for s in subsets]
            else:
                chosen = [res["methods"][method]["per_task"]["params"]] * len(subsets)
            res["scale_params"].setdefault(method, {})[str(k)] = chosen
            variants = [(method, "shared")] + [
                (f"{method} ({b} basis)", b) for b in ("subset", "auto") if method in SUBSET_BASIS
            ]
            for name, basis in variants:
                curve = res["scale"].setdefault(name, {})
                runs = [
                    bench.score(bench.merge(method, s, params, basis=basis), "test", args.scale_n)
                    for s, params in zip(subsets, chosen)
                ]
                curve[str(k)] = [r["per_task"] for r in runs]
                res.setdefault("scale_accuracy", {}).setdefault(name, {})[str(k)] = [r["accuracy"] for r in runs]
        print(
            f"scale k={k}: " + ", ".join(f"{n} {statistics.fmean(c[str(k)]):.3f}" for n, c in res["scale"].items()),
            flush=True,
        )
    full = bench.statistics(args.stats_n)
    points = {("stats_curve", n): lambda n=n: bench.statistics(n) for n in numbers(args.stats_curve)}
    points |= {
        ("sketch_curve", r): lambda r=r: {t: s.sketched(r) if r else s for t, s in full.items()}
        for r in numbers(args.sketch_curve)
    }
    for (curve, x), stats in points.items():  # the data-aware merges again, with other statistics
        bench.tuner.stats = stats()
        if curve == "sketch_curve":
            res.setdefault("sketch_bytes", {})[str(x)] = statistics.fmean(
                s.nbytes() for s in bench.tuner.stats.values()
            )
        for method in [m for m in args.methods if resolve(m)[1].data]:
            params = res["methods"][method]["per_task"]["params"]
            got = bench.score(bench.merge(method, args.tasks, params), "test", args.test_n)
            res.setdefault(curve, {}).setdefault(method, {})[str(x)] = got["per_task"]
            print(f"{curve}: {method} {x}: {got['per_task']:.3f}", flush=True)
    if args.layerwise and "regmean" in args.methods:
        params = res["methods"]["regmean"]["per_task"]["params"]
        res["layerwise"] = {"n": args.layerwise, "regmean++": bench.layerwise(args.layerwise, params)}
        if str(args.layerwise) not in res.get("stats_curve", {}).get("regmean", {}):
            bench.tuner.stats = bench.statistics(args.layerwise)
            got = bench.score(bench.merge("regmean", args.tasks, params), "test", args.test_n)
            res.setdefault("stats_curve", {}).setdefault("regmean", {})[str(args.layerwise)] = got["per_task"]
        res["layerwise"]["regmean"] = res["stats_curve"]["regmean"][str(args.layerwise)]
        print(f"RegMean++ from {args.layerwise} examples per task: {res['layerwise']}", flush=True)
    res["wall_s"] = {
        "total": round(time.time() - t0, 1),
        "start_and_bases": round(start_s, 1),
        "pin": round(bench.tuner.eval.seconds["pin"], 1),
        "generate": round(bench.tuner.eval.seconds["generate"], 1),
        "prompts_generated": bench.tuner.eval.prompts,
    }
    res["machine"] = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "unknown"
    )
    res["date"] = time.strftime("%Y-%m-%d")
    (out / "results.json").write_text(json.dumps(res, indent=1))
    text = report(res)
    (out / "results.md").write_text(text + "\n")
    plot(res, out / "scale.png")
    print("\n" + text + f"\n\nwall time {res['wall_s']}; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
