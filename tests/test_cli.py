"""The `knots-serve` CLI as a user runs it (a real subprocess), and the install's import hygiene."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from knots_serve.adapters import load_adapter

CLI = str(Path(sys.executable).parent / "knots-serve")


def run(*args, cwd=None):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


# one merge, asked for twice: from the adapters, and from their saved basis
MERGE_FLAGS = (
    "--method",
    "knots-dare-ties",
    "--top-k",
    "0.3",
    "--density",
    "0.8",
    "--alpha",
    "1.2",
    "--weight",
    "alpha=0.5",
    "--seed",
    "3",
)


def test_merge_writes_an_adapter_and_a_full_model(tiny_base, tiny_adapters, tmp_path):
    adapters = [f"--adapter={n}={p}" for n, p in tiny_adapters.items()]
    r = run("merge", *adapters, *MERGE_FLAGS, "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    merged = load_adapter(tmp_path / "m")
    assert merged.modules and all(lora.scale == 1.0 for lora in merged.modules.values())

    # the same merge from a saved basis gives the same adapter
    r = run("basis", *adapters, "--space", "knots", "--out", tmp_path / "pool.safetensors")
    assert r.returncode == 0, r.stderr
    r = run("merge", *adapters, *MERGE_FLAGS, "--basis", tmp_path / "pool.safetensors", "--out", tmp_path / "m2")
    assert r.returncode == 0, r.stderr
    again = load_adapter(tmp_path / "m2")
    assert all(torch.equal(again.modules[m].A, merged.modules[m].A) for m in merged.modules)

    r = run(
        "merge", *adapters[:2], "--method", "ties", "--format", "full", "--base", tiny_base, "--out", tmp_path / "full"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "full" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "knots-nope"], "unknown merge method 'knots-nope'"),
        (["--top-k", "1.5"], "top_k=1.5 is out of range"),
        (["--method", "ta", "--top-k", "0.5"], "takes no parameter 'top_k'"),
        (["--density", "0"], "density=0.0 is out of range"),
        (["--weight", "zeta=1"], "weight given for 'zeta'"),
        (["--weight", "alpha=x"], "not a number"),
        (["--format", "full"], "--format full needs --base"),
        (["--adapter", "alpha=/nonexistent"], "adapter 'alpha' given twice"),
        (["--adapter", "broken"], "must look like NAME=VALUE"),
        (["--trim-scope", "layer"], "trim_scope must be"),
    ],
)
def test_merge_errors_exit_2_with_one_line_and_no_traceback(args, message, tiny_adapters, tmp_path):
    r = run(
        "merge",
        f"--adapter=alpha={tiny_adapters['alpha']}",
        f"--adapter=beta={tiny_adapters['beta']}",
        "--method",
        "knots-dare-ties",
        *args,
        "--out",
        tmp_path / "m",
    )
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()


def test_missing_adapter_and_basis_mismatch_are_cli_errors(tiny_adapters, tmp_path):
    r = run("merge", f"--adapter=x={tmp_path / 'missing'}", "--out", tmp_path / "m")
    assert r.returncode == 2 and "not a directory" in r.stderr and "Traceback" not in r.stderr
    a = f"--adapter=alpha={tiny_adapters['alpha']}"
    assert run("basis", a, "--space", "core", "--out", tmp_path / "b.safetensors").returncode == 0
    r = run("merge", a, "--method", "knots-ta", "--basis", tmp_path / "b.safetensors", "--out", tmp_path / "m")
    assert r.returncode == 2 and "rebuild it" in r.stderr


def test_help_explains_every_method_with_its_paper():
    out = run("merge", "--help").stdout
    for needle in ("knots-ties", "TIES-Merging", "DARE", "Task Arithmetic", "Knots", "Core Space", "magnitude"):
        assert needle in out, needle


def test_project_kernels_do_not_shadow_hugging_face_kernels(tmp_path):
    """kernels/ is installed as knots_serve.kernels; transformers' probe for HF `kernels` must not see it,
    from any working directory (the repo root included), and Llama + PEFT must import and run."""
    code = (
        "import importlib.metadata as md, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "from peft import LoraConfig, get_peft_model\n"
        "import knots_serve.kernels\n"
        "m = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,"
        " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)), LoraConfig(target_modules=['q_proj']))\n"
        "m(torch.tensor([[1, 2, 3]]))\n"
        "assert not is_kernels_available()\n"
        "assert 'kernels' not in md.packages_distributions()\n"
        "print('ok')\n"
    )
    repo = Path(__file__).resolve().parents[1]
    for cwd in (repo, tmp_path):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)
        assert r.stdout.strip() == "ok", r.stderr


def test_merge_takes_every_registry_parameter_and_refuses_bad_ones_in_one_line(tiny_adapters, tmp_path):
    adapters = [f"--adapter={n}={p}" for n, p in tiny_adapters.items()]
    r = run("merge", *adapters, "--method", "iso-cts", "--common", "0.5", "--lines", "0.3", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    meta = load_adapter(tmp_path / "m")
    assert meta.modules and all(lora.scale == 1.0 for lora in meta.modules.values())
    for flags, words in (
        (("--method", "tsv", "--keep", "0"), "keep=0.0 is out of range (0, 1]"),
        (("--method", "cart", "--rank", "-0.5"), "rank=-0.5 is out of range (0, 1]"),
        (("--method", "iso-c", "--keep", "0.5"), "takes no parameter 'keep'"),
        (("--method", "core-doge", "--steps", "2.5"), "steps=2.5 must be an integer"),
    ):
        r = run("merge", *adapters, *flags, "--out", tmp_path / "bad")
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
    r = run("methods")
    assert r.returncode == 0 and all(f"{m}:" in r.stdout for m in ("iso-c", "iso-cts", "tsv", "cart", "doge"))
    assert "arXiv:2502.04959" in r.stdout and "LiNeS" in r.stdout
    assert run("merge", "--help").returncode == 0  # help texts with [/SUBFOLDER] once crashed rich markup
