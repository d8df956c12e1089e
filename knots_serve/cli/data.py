"""The commands that read the operator's own examples: `stats` (task statistics for the data-aware merges)
and `tune` (recipes searched on validation data)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ..adapters import AdapterError, load_adapter
from ..compose import MergeError
from ..methods import resolve
from ..stats import StatsError
from .app import app, fail, pairs


@app.command(
    help="Tune merge recipes on your own validation data: per subset, the KnOTS paper's coordinate search over "
    "each method's parameters (alpha, then top_k, then density), every merge scored through the pinning path "
    "the server uses. Writes a recipe per subset to STATE_DIR/recipes.json (a running server serves it for "
    "tasks:A+B without @METHOD): the best point found where its gain over the config's default_method on the "
    "same examples is significant (paired bootstrap), else the default; and a report. Resumable: evaluations "
    "are cached in --work."
)
def tune(
    config: Path = typer.Option(Path("configs/default.yaml"), help="serve config (YAML): base model, tasks, state"),
    data: Path = typer.Option(..., help="directory of validation data: one <task>.jsonl per task"),
    subsets: list[str] = typer.Option(
        ["pairs"], help="pairs | all | K:N (N random subsets of K tasks) | A+B[+C]; a comma list, or repeat the flag"
    ),
    methods: str = typer.Option("", help="comma-separated method ids (default: the config's default_method,ta,ties)"),
    scorer: list[str] = typer.Option([], help="TASK=exact|contains|regex|py:module:function (default: exact)"),
    budget_s: float | None = typer.Option(None, help="stop starting evaluations after this many seconds"),
    max_examples: int | None = typer.Option(None, help="use at most this many examples per task"),
    work: Path | None = typer.Option(None, help="evaluation cache and bases (default: STATE_DIR/tune-work)"),
    report: Path | None = typer.Option(None, help="report directory (default: STATE_DIR/tune-report)"),
    seed: int = typer.Option(0, help="seed of the K:N subset sampling"),
    dtype: str = typer.Option("auto", help="vLLM dtype (float32 is far faster on CPUs without AVX512-BF16)"),
    eager: bool = typer.Option(False, help="no torch.compile in vLLM (starts faster, generates slower)"),
    max_tokens: int = typer.Option(64, help="generation budget for scorers other than exact"),
):
    import dataclasses

    from ..atomic import atomic_write_file, atomic_write_json
    from ..evaluate import Evaluator
    from ..recipes import subset_key, today
    from ..serving.server.config import load_config
    from ..serving.state.backends import open_store
    from ..serving.state.registry import task_table
    from ..task_data import load_data
    from ..tune import Tuner, plot, report_markdown
    from ..tune import subsets as subset_list

    try:
        cfg = load_config(config)
        store = open_store(cfg.store, cfg.state_dir)
        pool = task_table(cfg.tasks, store).items()
        chosen = subset_list(subsets, sorted(pool), seed)
        method_ids = list(dict.fromkeys(m.strip() for m in (methods or f"{cfg.default_method},ta,ties").split(",")))
        for m in method_ids:
            if m == "" or m == "auto":
                raise MergeError(f"--methods: {m!r} is not a method id")
            resolve(m)
        needed = sorted({t for s in chosen for t in s})
        val = load_data(data, pool, needed, pairs(scorer, "--scorer"))
        if max_examples is not None:
            val = {t: dataclasses.replace(d, examples=d.examples[:max_examples]) for t, d in val.items()}
        store.recipes()  # unreadable recipes fail now, before any work
        adapters = {n: load_adapter(p, n) for n, p in pool.items()}
        measured = {}
        if any(resolve(m)[1].data for m in method_ids):  # from the validation examples only
            from ..stats import StatsDir
            from ..stats_run import stats_for

            examples = {t: list(d.examples) for t, d in val.items()}
            measured = stats_for(cfg.model, adapters, examples, StatsDir(cfg.stats_dir))
    except (AdapterError, MergeError, ValueError, OSError) as e:
        fail(e)
    work = work or cfg.state_dir / "tune-work"
    report = report or cfg.tune_report_dir
    typer.echo(f"tune: {len(chosen)} subsets x {len(method_ids)} methods; starting the engine ({cfg.model})", err=True)
    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    tuner = Tuner(adapters, Evaluator(cfg.model, work / "evals.json", eager, dtype, max_tokens), work, measured)
    try:
        recipes, log = tuner.tune(chosen, method_ids, val, cfg.default_method, budget_s=budget_s)
    except MergeError as e:  # a scorer that fails on a generated answer names the example
        fail(e)
    try:
        store.put_recipes(recipes)
    except MergeError as e:
        fail(e)
    done = {r.key for r in recipes}
    meta = {
        "date": today(),
        "data": str(data),
        "methods": method_ids,
        "default_method": cfg.default_method,
        "wall_s": time.time() - t0,
        "unfinished": [subset_key(s) for s in chosen if subset_key(s) not in done],
        "data_fingerprints": {t: d.fingerprint for t, d in val.items()},
    }
    report.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        report / "tune.json", {"meta": meta, "recipes": [dataclasses.asdict(r) for r in recipes], "log": log}
    )
    atomic_write_file(report / "report.md", lambda tmp: Path(tmp).write_text(report_markdown(recipes, log, meta)))
    if recipes:
        atomic_write_file(report / "report.png", lambda tmp: plot(recipes, Path(tmp)))
    typer.echo(
        f"tuned {len(recipes)} of {len(chosen)} subsets in {meta['wall_s']:.0f} s -> {store.where('recipes')}; "
        f"report {report}"
        + (f"; not tuned (budget spent): {', '.join(meta['unfinished'])}" if meta["unfinished"] else "")
    )


@app.command(
    help="Measure each task's statistics for the data-aware merges (regmean, core-regmean): its own adapted model "
    "(base + its LoRA) run over its examples (DIR/<task>.jsonl, the files `tune` reads), the mean Gram of every "
    "adapted module's input. One file per task in STATE_DIR/stats, keyed by the adapter's and the data's digests "
    "(a changed adapter is never merged with stale statistics); every server process reads them there."
)
def stats(
    config: Path = typer.Option(Path("configs/default.yaml"), help="serve config (YAML): base model, tasks, state"),
    data: Path = typer.Option(
        ..., help="directory of examples: one <task>.jsonl per task (tasks without one: skipped)"
    ),
    max_examples: int | None = typer.Option(None, help="use at most this many examples per task"),
    sketch_rank: int = typer.Option(0, help="store each Gram as its top S eigenpairs + diagonal (0: dense)"),
    dtype: str = typer.Option("float32", help="dtype of the forward passes: float32, bfloat16, float16"),
):
    from ..serving.server.config import load_config
    from ..serving.state.backends import open_store
    from ..serving.state.registry import task_table
    from ..stats import StatsDir
    from ..stats_run import SHAPES, measure_all, shape_bytes
    from ..task_data import load_data

    try:
        if sketch_rank < 0 or (max_examples is not None and max_examples < 1):
            raise MergeError("--sketch-rank must be ≥ 0 and --max-examples ≥ 1")
        cfg = load_config(config)
        store = open_store(cfg.store, cfg.state_dir)
        pool = task_table(cfg.tasks, store).items()
        store.close()
        with_data = sorted(t for t in pool if (data / f"{t}.jsonl").is_file())
        if not with_data:
            raise MergeError(f"{data}: no <task>.jsonl for any task of the pool ({', '.join(sorted(pool))})")
        val = load_data(data, pool, with_data, {})
        examples = {t: list(d.examples[:max_examples]) for t, d in val.items()}
        adapters = {t: load_adapter(pool[t], t) for t in with_data}
        t0 = time.perf_counter()
        measured = measure_all(cfg.model, adapters, examples, sketch_rank=sketch_rank, dtype=dtype)
        out = StatsDir(cfg.stats_dir)
        paths = [out.put(s) for s in measured]
    except (AdapterError, MergeError, StatsError, OSError) as e:
        fail(e)
    for s, path in zip(measured, paths):
        typer.echo(f"{s.task}: {s.examples} examples, {s.tokens} tokens, {s.nbytes() / 2**20:.1f} MiB -> {path}")
    skipped = sorted(set(pool) - set(with_data))
    typer.echo(
        f"statistics of {len(measured)} tasks in {time.perf_counter() - t0:.1f} s"
        + (f"; no data for {', '.join(skipped)}" if skipped else "")
    )
    for name, (inputs, layers) in SHAPES.items():
        sizes = [f"dense {shape_bytes(inputs, layers) / 2**30:.2f} GiB"]
        sizes += [f"sketch {r}: {shape_bytes(inputs, layers, r) / 2**30:.2f} GiB" for r in (sketch_rank or 256,)]
        typer.echo(f"per task at {name} shapes, every projection adapted: {', '.join(sizes)}")
