"""The `knots-serve` app and what its commands share: option parsing, the registry's parameters as options,
and the one way a command fails (an `error:` line, exit 2)."""

from __future__ import annotations

import functools
import inspect

import typer

from ..adapters import LoraAdapter, load_adapter
from ..compose import MergeError
from ..methods import METHODS, OPTION_PAPERS, PARAMS, SPACE_PAPERS

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    # help texts are plain: '[@REVISION][/SUBFOLDER]' is syntax to show, not rich markup (it crashed --help)
    rich_markup_mode=None,
    help="Serve and build merged LoRA models (KnOTS, Core Space, TIES, DARE, TA).",
)


def methods_help() -> str:
    lines = ["Method ids are METHOD (dense ΔW space) or SPACE-METHOD, e.g. ties, knots-ties, core-dare-ties."]
    lines += [f"{m.name}: {m.summary} (params: {', '.join(m.params)}). {m.paper}." for m in METHODS.values()]
    lines += [f"space {s}: {p}." for s, p in SPACE_PAPERS.items()]
    lines += [f"option {o} (every method): {p}." for o, p in OPTION_PAPERS.items()]
    lines += ["Parameters: " + "; ".join(f"{p.name} {param_range(p)}: {p.help}" for p in PARAMS.values()) + "."]
    return "\n\n".join(lines)


def param_range(p) -> str:
    return f"{'(' if p.low_open else '['}{p.low:g}, {p.high:g}] default {p.default:g}{' integer' if p.integer else ''}"


def pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise MergeError(f"{what} must look like NAME=VALUE, got {v!r}")
        if name in out:
            raise MergeError(f"{what} {name!r} given twice")
        out[name] = value
    return out


def fail(e: Exception):
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


def load_adapters(adapter: list[str]) -> list[LoraAdapter]:
    return [load_adapter(path, name) for name, path in pairs(adapter, "--adapter").items()]


def parse_float(v: str, what: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise MergeError(f"{what}: not a number: {v!r}") from None
