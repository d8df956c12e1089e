"""PEFT LoRA adapters in and out: read, validate, write.

A LoRA adapter is, per adapted module, two factors and a scale: ΔW = scale · B @ A with
B (O×r) and A (r×I). Everything downstream (basis, methods, compose) works on `LoraAdapter`
objects and never touches files, so all file-format and validation concerns live here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_write_dir, atomic_write_file

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
    # ("A" or "B", dtype) -> the QR of Aᵀ or of B, kept by basis.lora_frames: a task's own half of every
    # per-request joint SVD
    frames: dict = field(default_factory=dict, repr=False, compare=False)

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

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of every module's factors and scale: what a basis is built from. Hashed once per loaded
        adapter, so a pool change hashes only the adapters it adds (basis.fingerprint)."""
        h = hashlib.sha256()
        for m, lora in sorted(self.modules.items()):
            h.update(m.encode())
            h.update(repr(lora.scale).encode())
            for t in (lora.A, lora.B):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name it ends with (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(path: str | os.PathLike, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory, or an hf:// reference (`adapter_dir`), refusing with AdapterError
    whatever it cannot merge exactly. The adapter's `path` is the local directory its files were read from."""
    if is_hub_ref(path):
        ref = parse_hub_ref(path)
        name = name or (ref.subfolder or ref.repo_id).rsplit("/", 1)[-1]
        path = hub_snapshot(ref)
        where = f"adapter {name!r} ({ref}, in {path})"
    else:
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


# --- adapters on the Hugging Face Hub -----------------------------------------------------------------------
# hf://OWNER/NAME[@REVISION][/SUBFOLDER]: the model-repo subset of huggingface_hub's own URI grammar
# (hf://[TYPE/]ID[@REVISION][/PATH]). The prefix is what makes a string a Hub reference: anything else is
# a local path, so a relative directory and a repo id are never confused.
HUB_PREFIX = "hf://"
_HUB_PART = re.compile(r"^\w(?:[\w.-]{0,94}\w)?$", re.ASCII)  # an owner or repo name (huggingface_hub's rule)
_HUB_REVISION = re.compile(r"^[\w.-]+(?:/[\w.-]+)*$", re.ASCII)  # a branch, tag or commit hash
_HUB_OTHER_TYPES = ("datasets", "spaces", "kernels", "buckets")


@dataclass(frozen=True)
class HubRef:
    """An adapter in a Hugging Face Hub model repo: its files are REVISION's SUBFOLDER/adapter_config.json and
    SUBFOLDER/adapter_model.safetensors (the repo's root without a subfolder; the default branch without
    a revision)."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    def __str__(self) -> str:
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{rev}" + (f"/{self.subfolder}" if self.subfolder else "")


def is_hub_ref(ref) -> bool:
    """Is this adapter location a Hub reference (a str starting with hf://)? A Path never is: Path()
    collapses the double slash."""
    return isinstance(ref, str) and ref.startswith(HUB_PREFIX)


def check_hub_name(part: str, what: str, ref: str) -> None:
    if not _HUB_PART.match(part) or ".." in part or "--" in part:
        raise AdapterError(
            f"invalid Hub reference {ref!r}: {what} {part!r} must be 1-96 letters, digits, '_', '.', '-' "
            "(starting and ending with a letter, digit or '_'; no '--' or '..')"
        )


def parse_hub_ref(ref: str) -> HubRef:
    """hf://OWNER/NAME[@REVISION][/SUBFOLDER] -> HubRef; AdapterError naming what is wrong. A revision with a
    '/' is written %2F (as in huggingface_hub's URIs), except refs/pr/N."""
    if not is_hub_ref(ref):
        raise AdapterError(f"not a Hub reference: {ref!r} (hf://OWNER/NAME[@REVISION][/SUBFOLDER])")
    parts = ref[len(HUB_PREFIX) :].split("/")
    if parts[0] == "models":  # huggingface_hub's explicit type prefix for model repos
        parts = parts[1:]
    if parts and parts[0] in _HUB_OTHER_TYPES:
        raise AdapterError(f"invalid Hub reference {ref!r}: adapters are read from model repos, not {parts[0]}")
    if len(parts) < 2:
        raise AdapterError(f"invalid Hub reference {ref!r}: use hf://OWNER/NAME[@REVISION][/SUBFOLDER]")
    owner, (name, at, revision), sub = parts[0], parts[1].partition("@"), parts[2:]
    check_hub_name(owner, "owner", ref)
    check_hub_name(name, "repo name", ref)
    if revision == "refs" and len(sub) >= 2 and sub[0] == "pr":  # a pull request's ref: refs/pr/N
        revision, sub = f"refs/pr/{sub[1]}", sub[2:]
    revision = unquote(revision)
    if at and (not _HUB_REVISION.match(revision) or ".." in revision):
        raise AdapterError(
            f"invalid Hub reference {ref!r}: revision {revision!r} must be a branch, tag or commit hash "
            "(letters, digits, '_', '.', '-', '/'; no '..')"
        )
    if any(not _HUB_PART.match(s) for s in sub):
        raise AdapterError(
            f"invalid Hub reference {ref!r}: the subfolder {'/'.join(sub)!r} must be '/'-separated names of "
            "letters, digits, '_', '.', '-' (each starting and ending with a letter, digit or '_')"
        )
    return HubRef(f"{owner}/{name}", revision if at else None, "/".join(sub))


def hub_snapshot(ref: HubRef) -> Path:
    """The local directory of a Hub adapter: huggingface_hub.snapshot_download of its two files into the
    Hugging Face cache (HF_HUB_CACHE, HF_HOME), or straight from the cache without any request when
    HF_HUB_OFFLINE=1 (or when the Hub cannot be reached). Every failure is an AdapterError naming the repo."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise AdapterError(
            f"{ref}: Hub adapters need the huggingface_hub package (pip install huggingface_hub)"
        ) from None
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    revision = ref.revision or "main"
    at = f"{ref.repo_id!r} (revision {revision!r})"
    try:
        root = snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=[prefix + CONFIG_NAME, prefix + WEIGHTS_NAME]
        )
    except RepositoryNotFoundError:  # GatedRepoError too
        raise AdapterError(
            f"{ref}: no model repo {ref.repo_id!r} on the Hub, or it is private or gated and the token "
            "(HF_TOKEN) has no access"
        ) from None
    except RevisionNotFoundError:
        raise AdapterError(f"{ref}: the Hub repo {ref.repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError as e:  # not (completely) cached, and the Hub not asked or not reachable
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the Hub cannot be reached ({e.__cause__ or e})"
        raise AdapterError(
            f"{ref}: {at} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and {why}; fill the cache "
            f"where the Hub can be reached: hf download {ref.repo_id} --revision {revision} "
            f"--include '{prefix}adapter_*'"
        ) from None
    except Exception as e:  # the network and the Hub fail in many ways: name the repo, never a traceback
        raise AdapterError(f"{ref}: cannot fetch {at} from the Hub: {type(e).__name__}: {e}") from None
    local = Path(root) / ref.subfolder
    missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (local / f).is_file()]
    if missing:
        raise AdapterError(f"{ref}: {at} has no {' or '.join(prefix + f for f in missing)}: not a PEFT adapter there")
    return local


def adapter_dir(ref: str | os.PathLike) -> Path:
    """The local directory of an adapter named by a path or an hf:// reference (hub_snapshot)."""
    return hub_snapshot(parse_hub_ref(ref)) if is_hub_ref(ref) else Path(ref)


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype names


def save_factors(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], path) -> None:
    """A merge's factors {module: (B, A)} as one safetensors file of {module}.B / {module}.A, written
    atomically: what a pin loads (`PinWorker.knots_prepare("factors", path)`)."""
    tensors = {f"{m}.{k}": t.contiguous() for m, (B, A) in lora.items() for k, t in (("B", B), ("A", A))}
    atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp)))


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
