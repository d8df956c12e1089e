"""PEFT LoRA adapters in and out: read, validate, write.

A LoRA adapter is, per adapted module, two factors and a scale: ΔW = scale · B @ A with
B (O×r) and A (r×I). Everything downstream (basis, methods, compose) works on `LoraAdapter`
objects and never touches files, so all file-format and validation concerns live here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_write_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Ranks vLLM accepts for --max-lora-rank (vllm/config/lora.py); merged adapters are padded to one.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class AdapterError(ValueError):
    """An adapter (or a set of adapters) that this project cannot use; the message says why."""


@dataclass
class LoraModule:
    """One adapted linear layer: ΔW = scale · B @ A (B: out×r, A: r×in)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass
class LoraAdapter:
    name: str
    modules: dict[str, LoraModule]  # "model.layers.0.self_attn.q_proj" -> factors
    base_model: str | None = None
    path: str | None = None
    config: dict = field(default_factory=dict)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name it ends with (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(path: str | os.PathLike, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory, refusing with AdapterError whatever it cannot merge exactly."""
    path = Path(path)
    name = name or path.name
    where = f"adapter {name!r} ({path})"
    if not path.is_dir():
        raise AdapterError(f"{where}: not a directory")
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / fname).is_file():
            raise AdapterError(f"{where}: missing {fname}")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{where}: unreadable {CONFIG_NAME}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: {CONFIG_NAME} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    if config.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters are not supported (use_dora=true)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: trained biases are not supported (bias={config['bias']!r})")
    if config.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save is not supported ({config['modules_to_save']})")
    try:
        tensors = load_file(path / WEIGHTS_NAME)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{where}: unreadable {WEIGHTS_NAME}: {e}") from None

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            kind = "DoRA magnitude" if "lora_magnitude" in key else "non-LoRA"
            raise AdapterError(f"{where}: unsupported {kind} tensor {key!r}")
        factors.setdefault(m["module"], {})[m["ab"]] = t
    if not factors:
        raise AdapterError(f"{where}: no LoRA tensors in {WEIGHTS_NAME}")

    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"{where}: {module}: A/B shape mismatch, lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}"
            )
        r = A.shape[0]
        r_config = _pattern_value(rank_pattern, module, r_default)
        if r != r_config:
            raise AdapterError(f"{where}: {module}: tensors have rank {r} but the config says r={r_config}")
        if module.rsplit(".", 1)[-1] not in SUPPORTED_TARGETS:
            raise AdapterError(f"{where}: {module}: only {', '.join(SUPPORTED_TARGETS)} can be merged")
        for label, t in (("lora_A", A), ("lora_B", B)):
            if not torch.isfinite(t).all():
                raise AdapterError(f"{where}: {module}.{label} contains NaN or Inf")
        alpha = _pattern_value(alpha_pattern, module, alpha_default)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        # copies: load_file's tensors can share the file's memory map, and a file rewritten in place later
        # (truncated) would then kill the process with SIGBUS when they are read
        modules[module] = LoraModule(
            A=A.to(torch.float32, copy=True), B=B.to(torch.float32, copy=True), scale=float(scale)
        )
    return LoraAdapter(name, modules, config.get("base_model_name_or_path"), str(path), config)


def check_compatible(adapters: list[LoraAdapter]) -> None:
    """Refuse a set of adapters that cannot be merged: duplicate names, other base models, other shapes."""
    if not adapters:
        raise AdapterError("no adapters given")
    names = [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AdapterError(f"duplicate adapter names: {', '.join(dupes)}")
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        raise AdapterError(
            "adapters are for different base models: "
            + ", ".join(f"{a.name}={a.base_model}" for a in adapters if a.base_model)
        )
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for a in adapters:
        for module, lora in a.modules.items():
            seen = shapes.setdefault(module, (lora.shape, a.name))
            if seen[0] != lora.shape:
                raise AdapterError(
                    f"{module} has shape {seen[0]} in {seen[1]!r} but {lora.shape} in {a.name!r}: "
                    "adapters for different layer shapes"
                )


def padded_rank(rank: int, allowed: tuple[int, ...] = VLLM_RANKS) -> int:
    for r in allowed:
        if r >= rank:
            return r
    raise AdapterError(f"merged rank {rank} exceeds the largest rank vLLM serves ({allowed[-1]})")


def save_adapter(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    out_dir: str | os.PathLike,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    metadata: dict | None = None,
) -> Path:
    """Write {module: (B, A)} (ΔW = B @ A, scale 1) as a PEFT adapter that PEFT and vLLM load.

    All modules are zero-padded to one vLLM-allowed rank R and lora_alpha = R, so the scale is
    exactly 1; zero rows of A / columns of B change nothing.
    """
    if not modules:
        raise AdapterError("nothing to save: the merge has no modules")
    rank = padded_rank(max(max(B.shape[1], 1) for B, _ in modules.values()))
    tensors = {}
    for module, (B, A) in sorted(modules.items()):
        Bp = B.new_zeros(B.shape[0], rank)
        Ap = A.new_zeros(rank, A.shape[1])
        Bp[:, : B.shape[1]], Ap[: A.shape[0]] = B, A
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = Ap.to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = Bp.to(dtype).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
    }

    def write(tmp: Path) -> None:
        # provenance (method, tasks, params) goes in the safetensors header: PEFT's config loader
        # rejects keys it does not know.
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"knots_serve": json.dumps(metadata or {})})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    return atomic_write_dir(out_dir, write)


def save_merged_model(base_dir: str | os.PathLike, deltas: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> Path:
    """Write base_dir's model with W += ΔW for each module in deltas (a merged full model).

    Works on the safetensors checkpoint directly (single file or sharded), so no model class is needed;
    every other file (config, tokenizer, …) is copied as is. Each W is updated in float64, then cast back.
    """
    base = Path(base_dir)
    shards = sorted(base.glob("*.safetensors"))
    if not (base / "config.json").is_file() or not shards:
        raise AdapterError(f"base model {base}: needs config.json and *.safetensors weights")
    pending = {f"{m}.weight": d for m, d in deltas.items()}

    def write(tmp: Path) -> None:
        for f in base.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        for shard in shards:
            with safe_open(str(shard), framework="pt") as fh:
                meta = fh.metadata()
            tensors = load_file(shard)
            for key in set(tensors) & set(pending):
                W, d = tensors[key], pending.pop(key)
                if tuple(W.shape) != tuple(d.shape):
                    raise AdapterError(f"{key}: base weight {tuple(W.shape)} but merged update {tuple(d.shape)}")
                tensors[key] = (W.double() + d.double()).to(W.dtype)
            save_file(tensors, tmp / shard.name, metadata=meta)
        if pending:
            raise AdapterError(f"base model {base} has no weight for: {', '.join(sorted(pending)[:5])}")

    return atomic_write_dir(out_dir, write)
