"""Tuning merges on the operator's own validation data: the KnOTS paper's coordinate search (§5), per subset
and method, through the pinning path the server uses (evaluate.py); the result is a recipe per subset
(recipes.py) that the server then serves for `tasks:A+B`.

- Data: one JSONL file per task, `DIR/<task>.jsonl`, each line `{"messages": [...]}` or `{"prompt": "..."}`
  plus `"answer"`. A scorer per task: `exact` (the default; case-, space- and final-period-insensitive),
  `contains`, `regex` (the answer is a pattern searched in the output) or `py:module:function`
  (function(output, answer) -> bool or a number in [0, 1]).
- Score of a merge on a subset: per task, its mean score divided by the task's own LoRA's (same data, same
  path: a 1-task TA merge at alpha 1 is the adapter itself), averaged over the subset's tasks ("normalized
  accuracy", as in the paper). A task whose own LoRA scores 0 counts unnormalized.
- Search, per method: alpha over its grid, then top_k, then density (ties keep the earlier value), from the
  first grid value of each; DARE with seed 0.
- Choice: the best (method, parameters) found replaces the config default only when its gain over the
  default on the same examples is significant (a paired bootstrap over the examples, one-sided 95%: the
  5th percentile of the resampled gains is above 0); small validation sets otherwise pick noise.
"""

from __future__ import annotations

import itertools
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .adapters import LoraAdapter, save_factors
from .basis import auto_basis, build_basis, lora_ranks
from .compose import MergeError, MergeSpec, adapter_factors, merge_factors, missing_stats
from .evaluate import Evaluator, Merge
from .methods import factored, resolve
from .recipes import Recipe, subset_key, today
from .stats import TaskStats
from .task_data import TaskData, digest

GRID: dict[str, tuple[float, ...]] = {
    "alpha": (0.1, 0.2, 0.3, 0.6, 1.0, 1.5, 2.0, 3.0),
    "top_k": (0.2, 0.1, 0.5),
    "density": (0.5, 0.3),
    "common": (0.8, 0.5, 0.9),  # Iso-CTS: the authors' 0.8 first
    "keep": (1.0, 0.5),  # TSV-M: a LoRA's whole rank (the Core Space choice), half of it
    "rank": (0.08, 0.25, 0.5),  # CART: the authors' ~8% of the rank first
    "reduce": (0.95, 0.6, 0.3),  # RegMean: FusionBench's 0.95 (CLIP) first, then 0.6 (its GPT-2 setting)
    # not searched unless a grid names them: LiNeS beta, DOGE's eta/steps/lr/subspace/mask (alpha scales DOGE)
}
SEARCH_ORDER = ("alpha", "reduce", "top_k", "density", "common", "keep", "rank", "lines")
RESAMPLES = 2000  # bootstrap resamples per comparison (seeded, so a rerun decides the same)
KEPT = "kept default: gain not significant"
REPLACED = "replaced the default"


# --- subsets ---------------------------------------------------------------------------------------------
def subsets(specs: Iterable[str], tasks: list[str], seed: int = 0) -> list[tuple[str, ...]]:
    """`pairs` (every pair), `all` (the whole pool), `K:N` (N random subsets of K tasks, seeded) or
    `A+B+C` (that subset), each spec one of these or a comma-separated list of them; duplicates dropped,
    order kept."""
    out: dict[str, tuple[str, ...]] = {}
    for given in specs:
        entries = [e.strip() for e in given.split(",")]
        if "" in entries:  # else it would read as a subset of one task named ''
            raise MergeError(f"--subsets {given!r}: an empty entry")
        for spec in entries:
            for s in _subset_spec(spec, tasks, seed):
                out.setdefault(subset_key(s), s)
    if not out:
        raise MergeError("no subsets to tune: give --subsets (pairs, all, K:N or A+B)")
    return list(out.values())


def _subset_spec(spec: str, tasks: list[str], seed: int) -> list[tuple[str, ...]]:
    """The subsets one entry of --subsets names (subsets)."""
    if spec == "pairs":
        return list(itertools.combinations(sorted(tasks), 2))
    if spec == "all":
        return [tuple(sorted(tasks))]
    if re.fullmatch(r"\d+:\d+", spec):
        k, n = map(int, spec.split(":"))
        if not 2 <= k <= len(tasks):
            raise MergeError(f"--subsets {spec}: size {k} is not in 2..{len(tasks)} (the pool)")
        combos = list(itertools.combinations(sorted(tasks), k))
        return random.Random(f"tune:{seed}:{k}").sample(combos, min(n, len(combos)))
    found = tuple(sorted(spec.split("+")))
    unknown = [t for t in found if t not in tasks]
    if unknown or len(found) < 2 or len(set(found)) < len(found):
        raise MergeError(
            f"--subsets {spec!r}: expected pairs, all, K:N or A+B[+…] of 2+ distinct known tasks"
            + (f"; unknown task(s): {', '.join(unknown)}" if unknown else "")
        )
    return [found]


def search_space(method: str, grid: dict[str, tuple[float, ...]] = GRID) -> list[str]:
    """The parameters a coordinate search varies for a method, in search order."""
    params = resolve(method)[1].params
    return [p for p in SEARCH_ORDER if p in params and grid.get(p)]


def coordinate_search(params: list[str], grid: dict, score: Callable[[dict], float]):
    """One pass over the parameters in order, each over its grid with the others held (from each grid's
    first value); ties keep the earlier value. -> (best params, best score, [[params, score], ...])."""
    current = {p: grid[p][0] for p in params}
    best_score, trail = None, []
    for p in params or [None]:
        best = None
        for v in grid[p] if p else [None]:
            trial = current | ({p: v} if p else {})
            s = score(trial)
            trail.append([trial, round(s, 4)])
            if best is None or s > best[0]:
                best = (s, v)
        if p:
            current[p] = best[1]
        best_score = best[0]
    return current, best_score, trail


# --- significance ----------------------------------------------------------------------------------------
Scores = dict[str, Sequence[float]]  # per task, one score per example, in the data's order


def normalized(got: Scores, lora: Scores) -> float:
    """A merge's score on a subset: per task, its summed score over the task's own LoRA's (unnormalized where
    the LoRA scores 0), averaged over the tasks."""
    return statistics.fmean(sum(got[t]) / sum(lora[t]) if sum(lora[t]) > 0 else statistics.fmean(got[t]) for t in lora)


def resampled(got: Scores, lora: Scores, n: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """`normalized` on each of n bootstrap resamples (each task's examples drawn with replacement). The draws
    depend on the seed and the tasks' sizes only, so two merges scored on the same examples get the same
    draws: their differences are paired."""
    rng = np.random.default_rng(seed)
    ratios = []
    for t in sorted(lora):
        size = len(lora[t])
        idx = rng.integers(0, size, (n, size))
        g, ref = np.asarray(got[t], float)[idx].sum(1), np.asarray(lora[t], float)[idx].sum(1)
        ratios.append(np.divide(g, ref, out=g / size, where=ref > 0))
    return np.mean(ratios, axis=0)


def interval(got: Scores, lora: Scores, n: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The 95% bootstrap interval (2.5th and 97.5th percentiles) of a merge's normalized score."""
    low, high = np.percentile(resampled(got, lora, n, seed), [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap(a: Scores, b: Scores, lora: Scores, n: int = RESAMPLES, seed: int = 0):
    """-> (normalized score of a minus b's, and the 5th and 95th percentiles of that difference over n
    resamples that draw the same examples for both). The gain of a over b is significant (one-sided 95%)
    when the 5th percentile is above 0."""
    diffs = resampled(a, lora, n, seed) - resampled(b, lora, n, seed)
    low, high = np.percentile(diffs, [5, 95])
    return normalized(a, lora) - normalized(b, lora), float(low), float(high)


def versus_default(best: Scores, default: Scores, lora: Scores, n: int = RESAMPLES, seed: int = 0) -> dict:
    """The best point found against the default on the same examples: each one's score and 95% interval,
    the gain with its paired 5th-95th percentiles, and whether the best replaces the default. The search
    chose `best` as the maximum of many points on these very examples, so even this test flatters it; it
    still refuses the gains that a few lucky examples carry."""
    gain = paired_bootstrap(best, default, lora, n, seed)
    return {
        "score": _rounded(normalized(best, lora), *interval(best, lora, n, seed)),
        "default": _rounded(normalized(default, lora), *interval(default, lora, n, seed)),
        "gain": _rounded(*gain),
        "replaced": gain[1] > 0,
    }


def _rounded(*xs: float) -> list[float]:
    return [round(x, 4) for x in xs]


class BudgetSpent(Exception):
    """The tuning's time budget ran out before an evaluation."""


class Tuner:
    """Scores merges of a pool's adapters on validation data (evaluate.py) and searches their parameters.

    Bases are built once per (space, tasks) and kept in `work` as safetensors (the pin path loads a basis
    file); merges are composed in the basis the server would use (`basis: auto` over this pool). The
    data-aware merges are composed here from the tasks' statistics (`stats`, measured on the validation
    examples) and pinned as factors."""

    def __init__(
        self,
        adapters: dict[str, LoraAdapter],
        evaluator: Evaluator,
        work: Path,
        stats: dict[str, TaskStats] | None = None,
    ):
        self.adapters, self.eval, self.work, self.stats = adapters, evaluator, work, stats or {}
        self.work.mkdir(parents=True, exist_ok=True)
        self._bases: dict[tuple, tuple[Path, str]] = {}
        self.deadline = float("inf")

    def basis(self, space: str, tasks) -> tuple[Path, str]:
        key = (space, tuple(sorted(tasks)))
        if key not in self._bases:
            b = build_basis([self.adapters[t] for t in key[1]], space)
            path = self.work / f"{space}-{b.fingerprint}.safetensors"
            if not path.is_file():
                b.save(path)
            self._bases[key] = (path, b.fingerprint)
        return self._bases[key]

    def merge(self, method: str, tasks, params: dict, seed: int = 0, basis: str = "auto") -> Merge:
        """basis: shared (the whole pool), subset (the merged tasks alone), auto (the server's rule)."""
        space, m = resolve(method)
        spec = MergeSpec(tuple(tasks), method, {p: v for p, v in params.items() if p in m.params}, seed=seed)
        if m.data:
            return self._composed(spec)
        if factored(m):  # the same ΔW from any basis with factors: the cheapest is the subset's Core basis
            space, basis = "core", "subset"
        if basis == "auto":
            basis = auto_basis(tasks, lora_ranks(self.adapters))
        path, fp = self.basis(space, tasks if basis == "subset" else self.adapters)
        return Merge(spec, path, fp)

    def _composed(self, spec: MergeSpec) -> Merge:
        """A data-aware merge composed here (the engine holds no statistics), its factors kept in `work`,
        named by the tasks' adapters and the data their statistics came from."""
        lacking = [t for t in spec.tasks if t not in self.stats]
        if lacking:
            raise MergeError(missing_stats(lacking))

        def measured(t: str) -> str:  # the adapter and the data; a sketched form of them is other statistics
            rank = int(self.stats[t].meta.get("sketch_rank") or 0)
            return f"{self.adapters[t].digest}/{self.stats[t].data}" + (f"/sketch{rank}" if rank else "")

        fp = digest(*(measured(t).encode() for t in spec.tasks))
        path = self.work / f"factors-{digest(fp.encode(), spec.key().encode())}.safetensors"
        if not path.is_file():
            lora = merge_factors(adapter_factors(self.adapters, spec.tasks), spec, stats=self.stats)
            save_factors(lora, path)
        return Merge(spec, path, fp, kind="factors")

    def scores(self, merge: Merge | None, data: dict[str, TaskData], n: int | None = None) -> dict[str, list[float]]:
        if time.monotonic() > self.deadline:
            raise BudgetSpent()
        return self.eval.scores(merge, data, n)

    def lora(self, data: dict[str, TaskData], n: int | None = None) -> dict[str, list[float]]:
        """Each task's own LoRA: a 1-task TA merge with alpha 1 is the adapter itself (a tested identity)."""
        return {t: self.scores(self.merge("knots-ta", [t], {"alpha": 1.0}), {t: d}, n)[t] for t, d in data.items()}

    def score(self, merge: Merge, data: dict[str, TaskData], n: int | None = None) -> dict:
        """per_task: `normalized`; joint: pooled score / pooled LoRA score; accuracy: the merge's mean score
        per task."""
        tasks = list(merge.spec.tasks)
        got, lora = self.scores(merge, {t: data[t] for t in tasks}, n), self.lora({t: data[t] for t in tasks}, n)
        pooled = sum(sum(lora[t]) for t in tasks)
        return {
            "per_task": normalized(got, lora),
            "joint": sum(sum(got[t]) for t in tasks) / pooled if pooled else 0.0,
            "accuracy": {t: statistics.fmean(v) for t, v in got.items()},
        }

    def search(
        self, method: str, tasks, data, grid=GRID, objective: str = "per_task", n: int | None = None, basis="auto"
    ):
        """The coordinate search of one method on one subset -> (params, score, trail)."""
        return coordinate_search(
            search_space(method, grid),
            grid,
            lambda params: self.score(self.merge(method, tasks, params, basis=basis), data, n)[objective],
        )

    def tune(
        self,
        subsets: list[tuple[str, ...]],
        methods: list[str],
        data: dict[str, TaskData],
        default_method: str,
        grid=GRID,
        budget_s: float | None = None,
        progress: bool = True,
    ) -> tuple[list[Recipe], list[dict]]:
        """Search every method on every subset; -> (one recipe per finished subset, the log of every
        search). The best search of a finished subset carries `versus_default` and the outcome (REPLACED
        or KEPT). Stops starting evaluations once `budget_s` is spent (finished subsets are kept)."""
        from tqdm import tqdm

        self.deadline = time.monotonic() + budget_s if budget_s else float("inf")
        steps = sum(max(1, sum(len(grid[p]) for p in search_space(m, grid))) for m in methods)
        bar = tqdm(total=steps * len(subsets), unit="eval", disable=not progress, desc="tune")
        recipes, log = [], []
        try:
            for tasks in subsets:
                bar.set_postfix_str(subset_key(tasks)[:40])
                sub = {t: data[t] for t in tasks}
                lora, default = self.lora(sub), self.scores(self.merge(default_method, tasks, {}), sub)
                searched = []  # (log entry, per-example scores of its best point)
                for method in methods:
                    params, s, trail = self.search(method, tasks, sub, grid)
                    entry = {"tasks": list(tasks), "method": method, "params": params, "score": s, "trail": trail}
                    log.append(entry)
                    bar.update(max(1, len(trail)))
                    # straight from the evaluator: the search just scored this point, so it is cached and
                    # must not be refused by the budget
                    searched.append((entry, self.eval.scores(self.merge(method, tasks, params), sub)))
                # a recipe is served per request: DOGE is searched and logged, never a recipe (pin it); with
                # nothing servable searched, the default is compared with itself and stands
                servable = [e for e in searched if resolve(e[0]["method"])[1].per_request] or [
                    ({"score": float("-inf")}, default)
                ]
                best, got = max(servable, key=lambda e: e[0]["score"])  # ties: the earlier method
                versus = versus_default(got, default, lora)
                best |= {"versus_default": versus, "outcome": REPLACED if versus["replaced"] else KEPT}
                method, params = (best["method"], best["params"]) if versus["replaced"] else (default_method, {})
                recipes.append(
                    Recipe(
                        tasks,
                        method,
                        MergeSpec(tasks, method, params).resolved_params(),
                        score=versus["score" if versus["replaced"] else "default"][0],
                        default_score=versus["default"][0],
                        data=digest(*(data[t].fingerprint.encode() for t in sorted(tasks))),
                        date=today(),
                    )
                )
        except BudgetSpent:
            pass
        finally:
            bar.close()
        return recipes, log


# --- report ----------------------------------------------------------------------------------------------
def report_markdown(recipes: list[Recipe], log: list[dict], meta: dict) -> str:
    lines = [
        f"# Tuned merge recipes ({meta['date']})",
        "",
        f"Validation data: {meta['data']}; methods searched: {', '.join(meta['methods'])}; "
        f"default: {meta['default_method']} at its registry defaults. Scores are normalized (merge / each "
        f"task's own LoRA, averaged over the subset's tasks), with 95% bootstrap intervals over the examples. "
        f"The gain is the best point found minus the default on the same examples, with the 5th and 95th "
        f"percentiles of {RESAMPLES} paired resamples; the best point replaces the default only when the 5th "
        f"percentile is above 0 (one-sided 95%). Wall time {meta['wall_s']:.0f} s.",
        "",
        "| subset | recipe | params | val score [95%] | default's [95%] | gain [5%, 95%] | outcome |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in recipes:
        best = next(e for e in log if "outcome" in e and tuple(e["tasks"]) == r.tasks)
        versus = best["versus_default"]
        score = versus["score" if versus["replaced"] else "default"]
        outcome = best["outcome"]
        if not versus["replaced"]:
            found = " ".join(filter(None, (best["method"], _params(best["params"]))))
            outcome += f" (best found: {found}, {_ci(versus['score'])})"
        lines.append(
            f"| {r.key} | {r.method} | {_params(r.params)} | {_ci(score)} | {_ci(versus['default'])} "
            f"| {_ci(versus['gain'], '+.3f')} | {outcome} |"
        )
    by_size: dict[tuple[int, str], list[float]] = {}
    for entry in log:
        by_size.setdefault((len(entry["tasks"]), entry["method"]), []).append(entry["score"])
    lines += ["", "Mean tuned validation score per method and subset size:", "", "| method | size | subsets | mean |"]
    lines.append("|---|---|---|---|")
    for (size, method), scores in sorted(by_size.items()):
        lines.append(f"| {method} | {size} | {len(scores)} | {statistics.fmean(scores):.3f} |")
    if meta.get("unfinished"):
        lines += ["", f"Not tuned (time budget spent): {', '.join(meta['unfinished'])}."]
    return "\n".join(lines) + "\n"


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items())


def _ci(stat: list[float], fmt: str = ".3f") -> str:
    """[value, low, high] as 'value [low, high]'."""
    value, low, high = stat
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def plot(recipes: list[Recipe], path: Path) -> None:
    """Per subset size: the mean validation score of the config default vs the tuned recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({len(r.tasks) for r in recipes})
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for offset, (label, attr) in ((-0.2, ("default", "default_score")), (0.2, ("tuned", "score"))):
        means = [statistics.fmean(getattr(r, attr) for r in recipes if len(r.tasks) == k) for k in sizes]
        ax.bar([k + offset for k in sizes], means, width=0.4, label=label)
    ax.set_xticks(sizes)
    ax.set_xlabel("tasks merged")
    ax.set_ylabel("normalized score (validation)")
    ax.set_title("Tuned recipes vs the default merge")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
