"""Offline merges: `merge` (an adapter or a full model), `basis` (a pool's basis saved for reuse), `methods`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ..adapters import DTYPES, AdapterError, LoraAdapter, save_adapter, save_merged_model
from ..basis import DEFAULT_RTOL, SPACES, Basis, build_basis, fingerprint
from ..compose import MergeError, MergeSpec, adapter_factors, merge_dense, merge_factors, merge_lora, missing_stats
from ..methods import factored, resolve
from ..stats import StatsError, TaskStats
from .app import ADAPTER_HELP, app, fail, load_adapters, methods_help, pairs, parse_float, with_param_options


@app.command(help="Merge LoRA adapters into one PEFT adapter (or a full model).\n\n" + methods_help())
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
    layerwise: Path | None = typer.Option(
        None,
        help="DIR of <task>.jsonl examples: RegMean++ (regmean, core-regmean), the statistics of each layer measured "
        "with the layers below it merged (offline: about L/2 forward passes per example; needs --base)",
    ),
    max_examples: int | None = typer.Option(None, help="--layerwise: at most this many examples per task"),
    seed: int = typer.Option(0, help="seed of DARE's random drop"),
    trim_scope: str = typer.Option("global", help="TIES trim threshold per task over all modules or per module"),
    format: str = typer.Option("adapter", help="adapter (PEFT LoRA, scale 1) or full (base + ΔW)"),
    base: Path | None = typer.Option(None, help="base model directory (for --format full, --layerwise)"),
    basis: Path | None = typer.Option(None, help="saved basis file to reuse (see `knots-serve basis`)"),
    max_rank: int = typer.Option(512, help="largest rank of the written adapter (dense-space merges only)"),
    dtype: str = typer.Option("float32", help="dtype of the written adapter: float32, bfloat16, float16"),
):
    try:
        if format not in ("adapter", "full"):
            raise MergeError(f"--format must be adapter or full, got {format!r}")
        if format == "full" and base is None:
            raise MergeError("--format full needs --base MODEL_DIR")
        torch_dtype = DTYPES.get(dtype)
        if torch_dtype is None:
            raise MergeError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
        adapters = load_adapters(adapter)
        weights = {k: parse_float(v, f"--weight {k}") for k, v in pairs(weight, "--weight").items()}
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
        measured = _stats_for(adapters, stats, m.data and layerwise is None)
        if layerwise is not None:
            lora = _layerwise(adapters, spec, base, layerwise, max_examples)
            pool, base_model = None, next((a.base_model for a in adapters if a.base_model), None)
        elif pool is None:
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
        fail(e)
    typer.echo(f"wrote {out} ({method} over {', '.join(spec.tasks)}; basis {t1 - t0:.2f} s, merge {t2 - t1:.2f} s)")


def _layerwise(adapters: list[LoraAdapter], spec: MergeSpec, base: Path | None, data: Path, max_examples: int | None):
    """RegMean++ (stats_run.layerwise_regmean) on the examples in `data`, with a progress bar."""
    from tqdm import tqdm

    from ..stats_run import layerwise_regmean, load_model
    from ..task_data import load_data

    if not resolve(spec.method)[1].data:
        raise MergeError("--layerwise is RegMean++: for --method regmean or core-regmean")
    if base is None:
        raise MergeError("--layerwise needs --base MODEL_DIR (the adapters' base model)")
    names = list(spec.tasks)
    examples = {t: list(d.examples[:max_examples]) for t, d in load_data(data, names, names, {}).items()}
    model, tok = load_model(base)
    layers = len({m.rsplit(".", 2)[0] for a in adapters for m in a.modules})  # a pass per layer and example
    with tqdm(total=layers * sum(map(len, examples.values())), desc="RegMean++", unit="ex") as bar:
        lora = layerwise_regmean(model, tok, {a.name: a for a in adapters}, examples, spec, step=bar.update)
    return lora


def _stats_for(adapters: list[LoraAdapter], given: list[str], needed: bool) -> dict:
    """{task: TaskStats} from --stats NAME=FILE, each measured with the very adapter merged."""
    files = pairs(given, "--stats")
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
        pool = build_basis(load_adapters(adapter), space, progress=True)
        pool.save(out)
    except (AdapterError, MergeError, OSError) as e:
        fail(e)
    typer.echo(
        f"wrote {out}: {space} basis of {len(pool.tasks)} tasks, {len(pool.modules)} modules, "
        f"{pool.nbytes() / 2**20:.1f} MiB, {time.perf_counter() - t0:.2f} s"
    )


@app.command(help="List the merge methods with their parameters and papers.")
def methods():
    typer.echo(methods_help())
