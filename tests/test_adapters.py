"""Adapter I/O on real PEFT adapters: scales as PEFT computes them, refusals, and written merges that
PEFT (and transformers, for full models) load with exactly the merged weights."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from knots_serve.adapters import (
    VLLM_RANKS,
    AdapterError,
    check_compatible,
    load_adapter,
    save_adapter,
    save_merged_model,
)
from knots_serve.basis import build_basis
from knots_serve.compose import MergeSpec, merge_dense, merge_lora


def peft_deltas(base, adapter_dir):
    """ΔW per module as PEFT itself applies it: merge_and_unload() minus the base weights."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base_sd = LlamaForCausalLM.from_pretrained(base).state_dict()
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter_dir).merge_and_unload()
    return {
        k.removesuffix(".weight"): v.double() - base_sd[k].double()
        for k, v in merged.state_dict().items()
        if not torch.equal(v, base_sd[k])
    }


def test_scales_match_peft_for_rslora_rank_and_alpha_patterns(tiny_base, tiny_adapters):
    for name, path in tiny_adapters.items():
        adapter = load_adapter(path, name)
        want = peft_deltas(tiny_base, path)
        assert set(want) == set(adapter.modules)
        for m, d in want.items():
            assert torch.allclose(adapter.modules[m].delta(), d, rtol=1e-5, atol=1e-6), (name, m)
    gamma = load_adapter(tiny_adapters["gamma"])
    assert gamma.modules["model.layers.0.self_attn.o_proj"].rank == 6
    assert gamma.modules["model.layers.0.mlp.up_proj"].scale == 5 / 2


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("method", ["knots-ties", "core-dare-ties", "ta", "knots-ta"])
def test_written_adapter_gives_the_merged_dense_logits(method, tiny_base, tiny_adapters, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapters = [load_adapter(p, n) for n, p in tiny_adapters.items()]
    basis = build_basis(adapters, "full" if method == "ta" else method.split("-")[0])
    spec = MergeSpec(tuple(tiny_adapters), method, {"alpha": 0.9})
    out = save_adapter(merge_lora(basis, spec), tmp_path / "merged", str(tiny_base))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] in VLLM_RANKS and config["lora_alpha"] == config["r"]

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = LlamaForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        for m, d in merge_dense(basis, spec).items():
            W = dense.get_submodule(m).weight
            W.copy_(W.double() + d)
    want = logits(dense, ids)
    got = logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), out), ids)
    base = logits(LlamaForCausalLM.from_pretrained(tiny_base), ids)
    assert (want - base).abs().max() > 1e-2  # the merge does move the logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)

    full = save_merged_model(tiny_base, merge_dense(basis, spec), tmp_path / "full")
    assert torch.allclose(logits(LlamaForCausalLM.from_pretrained(full), ids), want, rtol=1e-5, atol=1e-5)
    assert (full / "tokenizer.json").is_file()


def test_save_adapter_pads_to_a_vllm_rank_and_replaces_atomically(tmp_path):
    B, A = torch.randn(16, 9), torch.randn(9, 12)
    out = save_adapter({"model.layers.0.self_attn.q_proj": (B, A)}, tmp_path / "a")
    back = load_adapter(out)
    lora = back.modules["model.layers.0.self_attn.q_proj"]
    assert lora.rank == 16 and lora.scale == 1.0
    assert torch.allclose(lora.delta(), (B @ A).double(), atol=1e-5)
    save_adapter({"model.layers.0.self_attn.q_proj": (2 * B, A)}, out)  # overwrite in place
    assert torch.allclose(
        load_adapter(out).modules["model.layers.0.self_attn.q_proj"].delta(), (2 * B @ A).double(), atol=1e-4
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind
    with pytest.raises(AdapterError, match="exceeds the largest rank"):
        save_adapter({"m.q_proj": (torch.zeros(600, 513), torch.zeros(513, 600))}, tmp_path / "b")


def broken(src, dst, config=None, tensors=None, drop=None):
    """A copy of adapter src with its config updated by `config` and its tensors edited by `tensors(sd)`."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text()) | config
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        sd = load_file(dst / "adapter_model.safetensors")
        tensors(sd)
        save_file(sd, dst / "adapter_model.safetensors")
    if drop:
        (dst / drop).unlink()
    return dst


def _first(sd, suffix):
    return next(k for k in sorted(sd) if k.endswith(suffix))


BAD = {
    "missing adapter_config.json": dict(drop="adapter_config.json"),
    "missing adapter_model.safetensors": dict(drop="adapter_model.safetensors"),
    "not a LoRA adapter": dict(config={"peft_type": "IA3"}),
    "DoRA adapters are not supported": dict(config={"use_dora": True}),
    "trained biases are not supported": dict(config={"bias": "all"}),
    "modules_to_save is not supported": dict(config={"modules_to_save": ["lm_head"]}),
    "contains NaN or Inf": dict(tensors=lambda sd: sd[_first(sd, "lora_A.weight")].__setitem__((0, 0), float("nan"))),
    "A/B shape mismatch": dict(tensors=lambda sd: sd.__setitem__(_first(sd, "lora_B.weight"), torch.zeros(64, 3))),
    "config says r=": dict(config={"r": 16}),
    "but not both lora_A and lora_B": dict(tensors=lambda sd: sd.pop(_first(sd, "lora_B.weight"))),
    "unsupported DoRA magnitude tensor": dict(
        tensors=lambda sd: sd.__setitem__(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(64)
        )
    ),
    "unreadable adapter_config.json": dict(config=None),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_adapters_are_refused_with_a_clear_message(problem, tiny_adapters, tmp_path):
    path = broken(tiny_adapters["alpha"], tmp_path / "bad", **BAD[problem])
    if problem == "unreadable adapter_config.json":
        (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=problem.replace("(", r"\(")):
        load_adapter(path)


def test_lying_safetensors_header_is_refused(tiny_adapters, tmp_path):
    path = broken(tiny_adapters["alpha"], tmp_path / "bad")
    raw = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes((10**9).to_bytes(8, "little") + raw[8:])
    with pytest.raises(AdapterError, match="unreadable adapter_model.safetensors"):
        load_adapter(path)


def test_incompatible_sets_are_refused(tiny_adapters, tmp_path):
    a = load_adapter(tiny_adapters["alpha"])
    other_base = load_adapter(broken(tiny_adapters["beta"], tmp_path / "ob", config={"base_model_name_or_path": "x"}))
    with pytest.raises(AdapterError, match="different base models"):
        check_compatible([a, other_base])

    def widen(sd):
        k = _first(sd, "q_proj.lora_A.weight")
        sd[k] = torch.zeros(sd[k].shape[0], 80)

    wide = load_adapter(broken(tiny_adapters["alpha"], tmp_path / "wide", tensors=widen), "wide")
    with pytest.raises(AdapterError, match="different layer shapes"):
        check_compatible([a, wide])
    with pytest.raises(AdapterError, match="duplicate adapter names: alpha"):
        check_compatible([a, load_adapter(tiny_adapters["alpha"])])
    with pytest.raises(AdapterError, match="not a directory"):
        load_adapter(tmp_path / "nowhere")
