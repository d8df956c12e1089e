"""Pinned merges: the merged ΔW written into the engine's own weights (no LoRA cost per token).

`PinWorker` is a vLLM worker extension (`--worker-extension-cls`): its methods run in every worker
process, called from the API server through `collective_rpc`. It keeps the pool's basis resident
(loaded once per basis file), composes the merge there, and writes W = W0 + B·A with the fused kernel —
q/k/v into their rows of the packed `qkv_proj`, gate/up into `gate_up_proj`, each worker its own
tensor-parallel shard. The basis lives on the weights' device and the merge is composed there (float32).
W0 of every touched parameter is kept, so unpinning (or pinning another merge,
always from W0) restores the base bit-exactly.

On CPUs vLLM packs each linear weight into a oneDNN (or SGL) kernel handle at load time and drops the
weight tensor (`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`), so writing into `weight`
would change nothing. `keep_cpu_weights` (run from the plugin in every worker before the model loads)
keeps each layer's unpacked weight as W0; a pin computes the new weight and packs it again with vLLM's
own dispatch. On GPUs the weights are written in place.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from . import fleet_files

# HF module suffix -> (vLLM parameter module suffix, index in the packed parameter or None, parallelism)
VLLM_PARAMS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0, "column"),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1, "column"),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2, "column"),
    "self_attn.o_proj": ("self_attn.o_proj", None, "row"),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0, "column"),
    "mlp.up_proj": ("mlp.gate_up_proj", 1, "column"),
    "mlp.down_proj": ("mlp.down_proj", None, "row"),
}


@dataclass(frozen=True)
class Placement:
    """Where one module's ΔW (O×I, full) lands in one worker's parameter: param[rows] += ΔW[src_rows, src_cols]."""

    param: str
    rows: slice  # rows of the local parameter
    src_rows: slice  # rows of the full ΔW
    src_cols: slice  # columns of the full ΔW


def vllm_param(module: str) -> tuple[str, int | None, str]:
    """'model.layers.3.self_attn.k_proj' -> ('model.layers.3.self_attn.qkv_proj.weight', 1, 'column')."""
    prefix, _, suffix = module.rpartition(".")
    prefix, _, parent = prefix.rpartition(".")
    key = f"{parent}.{suffix}"
    if key not in VLLM_PARAMS:
        raise ValueError(f"cannot pin {module}: no vLLM parameter for {key}")
    param_module, index, kind = VLLM_PARAMS[key]
    return f"{prefix}.{param_module}.weight", index, kind


def placement(
    module: str,
    shape: tuple[int, int],
    packed_sizes: list[int] | None,
    replicas: list[int] | None,
    tp_size: int,
    tp_rank: int,
) -> Placement:
    """The shard math. Column-parallel (q/k/v, gate/up) split output rows: the local parameter stacks one
    part of each packed sub-matrix, of height packed_sizes[j] / tp_size (vLLM's `output_sizes`, which
    count replicated k/v heads once per worker); the worker's part of sub-matrix j is number
    tp_rank // replicas[j] (k/v heads are replicated when there are fewer than tp_size).
    Row-parallel (o, down) split input columns evenly."""
    param, index, kind = vllm_param(module)
    O, I = shape
    if kind == "row":
        width = I // tp_size
        return Placement(param, slice(0, O), slice(0, O), slice(tp_rank * width, (tp_rank + 1) * width))
    sizes = packed_sizes or [O * tp_size]
    reps = replicas or [1] * len(sizes)
    heights = [s // tp_size for s in sizes]
    index = index or 0
    h = heights[index]
    start = sum(heights[:index])
    part = tp_rank // reps[index]
    return Placement(param, slice(start, start + h), slice(part * h, (part + 1) * h), slice(0, I))


def keep_cpu_weights() -> None:
    """Patch vLLM's CPU weight packing to keep the unpacked weight (as `_knots_w0`) for pinning."""
    from vllm.model_executor.layers import linear
    from vllm.platforms import current_platform

    method = linear.UnquantizedLinearMethod
    if not current_platform.is_cpu() or getattr(method.process_weights_after_loading, "knots_keeps_w0", False):
        return
    original = method.process_weights_after_loading

    def process_weights_after_loading(self, layer):
        w0 = layer.weight.detach()
        original(self, layer)
        if getattr(layer, "cpu_linear", None) is not None and layer.weight.numel() != w0.numel():
            layer._knots_w0 = w0  # packed and dropped by vLLM: keep it

    process_weights_after_loading.knots_keeps_w0 = True
    method.process_weights_after_loading = process_weights_after_loading


class PinWorker:
    """Worker extension methods (names prefixed, to stay clear of the worker's own)."""

    def _knots_layer(self, param: str):
        """The linear layer owning `param`; with LoRA enabled vLLM wraps it (`.base_layer`)."""
        layer = self.model_runner.get_model().get_submodule(param.removesuffix(".weight"))
        return getattr(layer, "base_layer", layer)

    def _knots_placement(self, module: str, shape: tuple[int, int]) -> Placement:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        layer = self._knots_layer(vllm_param(module)[0])
        sizes = getattr(layer, "output_sizes", None)
        replicas = (
            [1, layer.num_kv_head_replicas, layer.num_kv_head_replicas]
            if sizes is not None and hasattr(layer, "num_kv_head_replicas")
            else None
        )
        return placement(
            module, shape, sizes, replicas, get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        )

    def knots_prepare(self, kind: str, path: str, spec_json: str = "") -> dict:
        """Get a pin ready without touching the weights: kind "factors" loads a merge's exact LoRA factors,
        composed elsewhere (`path`: a safetensors file of {module}.B / {module}.A, see adapters.save_factors); kind
        "basis" composes the merge here from its basis (`path`), dense for a dense-space merge (full-rank:
        too large to send). `knots_pin` then writes it."""
        from safetensors.torch import load_file

        from ...basis import Basis
        from ...compose import MergeSpec, merge_dense, merge_lora

        t0 = time.perf_counter()
        dense = False
        if kind == "basis":
            cache = getattr(self, "_knots_bases", {})
            if path not in cache:  # resident on the weights' device (composed there): one basis at a time
                device = next(self.model_runner.get_model().parameters()).device
                cache = self._knots_bases = {path: Basis.load(path).to(device)}
            basis = cache[path]
            spec = MergeSpec(**{k: tuple(v) if k == "tasks" else v for k, v in json.loads(spec_json).items()})
            # a dense-space merge (TIES trims entries of ΔW) is full-rank: add ΔW itself rather than factor it
            dense = basis.space == "full"
            merged = merge_dense(basis, spec) if dense else merge_lora(basis, spec, max_rank=None)
            shapes = {m: basis.modules[m].shape for m in merged}
        else:
            with fleet_files.local(path) as local:  # from the fleet on a node without the file
                tensors = load_file(local)
            merged = {m[:-2]: (B, tensors[m[:-2] + ".A"]) for m, B in tensors.items() if m.endswith(".B")}
            shapes = {m: (B.shape[0], A.shape[1]) for m, (B, A) in merged.items()}
        updates: dict[str, list] = {}
        for module, m in merged.items():
            p = self._knots_placement(module, shapes[module])
            part = m[p.src_rows, p.src_cols] if dense else (m[0][p.src_rows], m[1][:, p.src_cols])
            updates.setdefault(p.param, []).append((p, part))
        self._knots_staged = (dense, updates)
        return {"modules": len(merged), "params": len(updates), "prepare_s": time.perf_counter() - t0}

    def knots_pin(self) -> dict:
        """Write W0 + ΔW of the prepared merge into the live weights (under the server's drain)."""
        from ...kernels import lowrank_update

        t0 = time.perf_counter()
        dense, updates = self.__dict__.pop("_knots_staged")
        self._knots_restore()  # always from W0: A -> B never accumulates
        for param, parts in updates.items():
            layer = self._knots_layer(param)
            W0 = self._knots_w0(param)
            W = W0.clone()
            for p, part in parts:
                if dense:
                    W[p.rows] = (W0[p.rows].double() + part.to(W.device)).to(W.dtype)
                else:
                    lowrank_update(W0[p.rows], part[0].to(W.device), part[1].to(W.device), 1.0, out=W[p.rows])
            self._knots_set(layer, W)
        return {"params": len(updates), "write_s": time.perf_counter() - t0}

    def _knots_w0(self, param: str) -> torch.Tensor:
        """The base weight of a parameter: kept by keep_cpu_weights (CPU) or saved at the first pin."""
        layer = self._knots_layer(param)
        if not hasattr(layer, "_knots_w0"):
            layer._knots_w0 = layer.weight.detach().clone()
        self.__dict__.setdefault("_knots_touched", set()).add(param)
        return layer._knots_w0

    def _knots_set(self, layer, W: torch.Tensor) -> None:
        with torch.no_grad():
            if getattr(layer, "cpu_linear", None) is not None and layer.weight.numel() != W.numel():
                from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

                layer.weight = torch.nn.Parameter(W, requires_grad=False)
                dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # repack, as vLLM did at load
            else:
                layer.weight.data.copy_(W)

    def _knots_restore(self) -> None:
        for param in getattr(self, "_knots_touched", ()):
            layer = self._knots_layer(param)
            self._knots_set(layer, layer._knots_w0.clone())

    def knots_unpin(self) -> dict:
        t0 = time.perf_counter()
        self._knots_restore()
        return {"restored": len(getattr(self, "_knots_touched", ())), "write_s": time.perf_counter() - t0}
