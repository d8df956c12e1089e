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
  first grid value of each; DARE with seed 0. The subset's recipe is the best (method, parameters) found,
  or the config default when nothing beats it.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .adapters import LoraAdapter
from .basis import build_basis
from .compose import MergeError, MergeSpec
from .demo_tasks import normalize
from .evaluate import DataError, Evaluator, Example, Merge, Scorer, TaskData
from .methods import factored, resolve
from .recipes import Recipe, subset_key, today
from .serving.basis_store import auto_basis, lora_ranks

GRID: dict[str, tuple[float, ...]] = {
    "alpha": (0.1, 0.2, 0.3, 0.6, 1.0, 1.5, 2.0, 3.0),
    "top_k": (0.2, 0.1, 0.5),
    "density": (0.5, 0.3),
    "common": (0.8, 0.5, 0.9),  # Iso-CTS: the authors' 0.8 first
    "keep": (1.0, 0.5),  # TSV-M: a LoRA's whole rank (the Core Space choice), half of it
    "rank": (0.08, 0.25, 0.5),  # CART: the authors' ~8% of the rank first
    # not searched unless a grid names them: LiNeS beta, DOGE's eta/steps/lr/subspace/mask (alpha scales DOGE)
}
SEARCH_ORDER = ("alpha", "top_k", "density", "common", "keep", "rank", "lines")


# --- data and scorers ----------------------------------------------------------------------------------
def _exact(output: str, answer: str) -> bool:
    return normalize(output) == normalize(answer)


def _contains(output: str, answer: str) -> bool:
    return normalize(answer) in normalize(output)


def _regex(output: str, answer: str) -> bool:
    return re.search(answer, output) is not None


SCORERS = {
    "exact": Scorer("exact", _exact, bounded=True),
    "contains": Scorer("contains", _contains),
    "regex": Scorer("regex", _regex),
}


def scorer(spec: str) -> Scorer:
    """`exact`, `contains`, `regex` or `py:module:function`."""
    if spec in SCORERS:
        return SCORERS[spec]
    if spec.startswith("py:"):
        module, _, name = spec[3:].rpartition(":")
        try:
            fn = getattr(importlib.import_module(module), name) if module else None
        except (ImportError, AttributeError) as e:
            raise DataError(f"scorer {spec!r}: {e}") from None
        if not callable(fn):
            raise DataError(f"scorer {spec!r}: expected py:module:function naming a callable")
        return Scorer(spec, fn)
    raise DataError(f"unknown scorer {spec!r}: use {', '.join(SCORERS)} or py:module:function")


def _messages(doc: dict, where: str) -> tuple[dict, ...]:
    if ("messages" in doc) == ("prompt" in doc):
        raise DataError(f'{where}: give exactly one of "messages" (a chat) or "prompt" (a user message)')
    if "prompt" in doc:
        if not isinstance(doc["prompt"], str) or not doc["prompt"]:
            raise DataError(f'{where}: "prompt" must be a non-empty string')
        return ({"role": "user", "content": doc["prompt"]},)
    msgs = doc["messages"]
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and isinstance(m["content"], str)
            and m["role"] in ("system", "user", "assistant")
            for m in msgs
        )
    )
    if not ok or msgs[-1]["role"] != "user":
        raise DataError(
            f'{where}: "messages" must be a list of {{"role": system|user|assistant, "content": str}} '
            "ending with a user message"
        )
    return tuple(msgs)


def load_task_data(path: Path, task: str, score: Scorer) -> TaskData:
    """Read and check one task's JSONL file (parse_task_data)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_task_data(raw, str(path), task, score)


def parse_task_data(raw: bytes, source: str, task: str, score: Scorer) -> TaskData:
    """One task's JSONL; a DataError names the source and line of the first problem. The scorer is tried on
    every example's own answer, so a scorer that raises fails here, before any engine starts."""
    examples = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            doc = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise DataError(f"{where}: expected a JSON object")
        unknown = set(doc) - {"messages", "prompt", "answer"}
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if not isinstance(doc.get("answer"), str):
            raise DataError(f'{where}: "answer" must be a string')
        examples.append(Example(_messages(doc, where), doc["answer"], where))
    if not examples:
        raise DataError(f"{source}: no examples (an empty split): tuning needs at least one")
    data = TaskData(task, tuple(examples), score, _digest(raw, score.name.encode()))
    for i, ex in enumerate(examples):
        data.score(i, ex.answer)
    return data


def load_data(directory: Path, pool: Iterable[str], tasks: Iterable[str], scorers: dict[str, str], default="exact"):
    """{task: TaskData} for the tasks to tune, from DIR/<task>.jsonl. Every .jsonl file in DIR and every
    scorer must name a task of the pool (a typo would otherwise tune nothing for it, silently)."""
    known = set(pool)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (expected one <task>.jsonl per task)")
    for f in sorted(directory.glob("*.jsonl")):
        if f.stem not in known:
            raise DataError(f"{f}: unknown task {f.stem!r}; the config's tasks: {', '.join(sorted(known))}")
    for t in scorers:
        if t not in known:
            raise DataError(f"--scorer {t}=…: unknown task {t!r}")
    out = {}
    for t in tasks:
        path = directory / f"{t}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: missing: task {t!r} is in a subset to tune and needs validation data")
        out[t] = load_task_data(path, t, scorer(scorers.get(t, default)))
    return out


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


# --- subsets ---------------------------------------------------------------------------------------------
def subsets(specs: Iterable[str], tasks: list[str], seed: int = 0) -> list[tuple[str, ...]]:
    """`pairs` (every pair), `all` (the whole pool), `K:N` (N random subsets of K tasks, seeded) or
    `A+B+C` (that subset); duplicates dropped, order kept."""
    out: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        if spec == "pairs":
            found = list(itertools.combinations(sorted(tasks), 2))
        elif spec == "all":
            found = [tuple(sorted(tasks))]
        elif re.fullmatch(r"\d+:\d+", spec):
            k, n = map(int, spec.split(":"))
            if not 2 <= k <= len(tasks):
                raise MergeError(f"--subsets {spec}: size {k} is not in 2..{len(tasks)} (the pool)")
            combos = list(itertools.combinations(sorted(tasks), k))
            found = random.Random(f"tune:{seed}:{k}").sample(combos, min(n, len(combos)))
        else:
            found = [tuple(sorted(spec.split("+")))]
            unknown = [t for t in found[0] if t not in tasks]
            if unknown or len(found[0]) < 2 or len(set(found[0])) < len(found[0]):
                raise MergeError(
                    f"--subsets {spec!r}: expected pairs, all, K:N or A+B[+…] of 2+ distinct known tasks"
                    + (f"; unknown task(s): {', '.join(unknown)}" if unknown else "")
                )
        for s in found:
            out.setdefault(subset_key(s), s)
    if not out:
        raise MergeError("no subsets to tune: give --subsets (pairs, all, K:N or A+B)")
    return list(out.values())


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


class BudgetSpent(Exception):
    """The tuning's time budget ran out before an evaluation."""


class Tuner:
    """Scores merges of a pool's adapters on validation data (evaluate.py) and searches their parameters.

    Bases are built once per (space, tasks) and kept in `work` as safetensors (the pin path loads a basis
    file); merges are composed in the basis the server would use (`basis: auto` over this pool)."""

    def __init__(self, adapters: dict[str, LoraAdapter], evaluator: Evaluator, work: Path):
        self.adapters, self.eval, self.work = adapters, evaluator, work
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
        if factored(m):  # the same ΔW from any basis with factors: the cheapest is the subset's Core basis
            space, basis = "core", "subset"
        if basis == "auto":
            basis = auto_basis(tasks, lora_ranks(self.adapters))
        path, fp = self.basis(space, tasks if basis == "subset" else self.adapters)
        return Merge(spec, path, fp)

    def scores(self, merge: Merge | None, data: dict[str, TaskData], n: int | None = None) -> dict[str, list[float]]:
        if time.monotonic() > self.deadline:
            raise BudgetSpent()
        return self.eval.scores(merge, data, n)

    def lora(self, data: dict[str, TaskData], n: int | None = None) -> dict[str, list[float]]:
        """Each task's own LoRA: a 1-task TA merge with alpha 1 is the adapter itself (a tested identity)."""
        return {t: self.scores(self.merge("knots-ta", [t], {"alpha": 1.0}), {t: d}, n)[t] for t, d in data.items()}

    def score(self, merge: Merge, data: dict[str, TaskData], n: int | None = None) -> dict:
        """per_task: mean over tasks of (merge's mean score / the LoRA's); joint: pooled score / pooled
        LoRA score; accuracy: the merge's mean score per task."""
        tasks = list(merge.spec.tasks)
        got, lora = self.scores(merge, {t: data[t] for t in tasks}, n), self.lora({t: data[t] for t in tasks}, n)
        ratio = [sum(got[t]) / sum(lora[t]) if sum(lora[t]) > 0 else statistics.fmean(got[t]) for t in tasks]
        pooled = sum(sum(lora[t]) for t in tasks)
        return {
            "per_task": statistics.fmean(ratio),
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
        search). Stops starting evaluations once `budget_s` is spent (finished subsets are kept)."""
        from tqdm import tqdm

        self.deadline = time.monotonic() + budget_s if budget_s else float("inf")
        steps = sum(max(1, sum(len(grid[p]) for p in search_space(m, grid))) for m in methods)
        bar = tqdm(total=steps * len(subsets), unit="eval", disable=not progress, desc="tune")
        recipes, log = [], []
        try:
            for tasks in subsets:
                bar.set_postfix_str(subset_key(tasks)[:40])
                sub = {t: data[t] for t in tasks}
                default = self.score(self.merge(default_method, tasks, {}), sub)["per_task"]
                best = (default, default_method, {})  # the default is kept unless something beats it
                for method in methods:
                    params, s, trail = self.search(method, tasks, sub, grid)
                    log.append({"tasks": list(tasks), "method": method, "params": params, "score": s, "trail": trail})
                    bar.update(max(1, len(trail)))
                    if s > best[0]:
                        best = (s, method, params)
                spec = MergeSpec(tasks, best[1], best[2])
                recipes.append(
                    Recipe(
                        tasks,
                        best[1],
                        spec.resolved_params(),
                        score=round(best[0], 4),
                        default_score=round(default, 4),
                        data=_digest(*(data[t].fingerprint.encode() for t in sorted(tasks))),
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
        f"task's own LoRA, averaged over the subset's tasks). Wall time {meta['wall_s']:.0f} s.",
        "",
        "| subset | recipe | params | val score | default's val score |",
        "|---|---|---|---|---|",
    ]
    for r in recipes:
        params = ", ".join(f"{k}={v:g}" for k, v in r.params.items())
        lines.append(f"| {r.key} | {r.method} | {params} | {r.score:.3f} | {r.default_score:.3f} |")
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
