"""Tiny real models for tests: a random Llama (config + weights + a word-level tokenizer) and PEFT LoRAs on it.
Nothing is downloaded; everything is built here."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from knots_serve.adapters import LoraAdapter, LoraModule

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "red", "blue", "one", "two", "three", "yes", "no", "hello", "world"]


def make_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [f"w{i}" for i in range(vocab_size)])}
    vocab = {w: i for w, i in vocab.items() if i < vocab_size}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    fast.save_pretrained(out)


def make_tiny_llama(out: Path, seed: int = 0, hidden: int = 128, layers: int = 2, vocab: int = 256) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(
            1, hidden // 128
        ),  # head_dim 64 (vLLM CPU has no 16) max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init is small; make the layers matter so merges move the logits
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out)
    make_tokenizer(out, vocab)
    return out


def make_peft_lora(
    base: Path,
    out: Path,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    targets=("q_proj", "v_proj"),
    use_rslora: bool = False,
    rank_pattern=None,
    alpha_pattern=None,
    std: float = 0.3,
) -> Path:
    """A PEFT LoRA with random non-zero A and B (as if trained), saved with PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    config = json.loads(cfg_path.read_text())
    config["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(config))
    return out


def random_adapter(name: str, shapes: dict[str, tuple[int, int]], ranks, seed: int, rslora=False) -> LoraAdapter:
    """An in-memory adapter with random factors: shapes {module: (O, I)}, ranks {module: r} or one int."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for m, (O, I) in shapes.items():
        r = ranks[m] if isinstance(ranks, dict) else ranks
        alpha = 2.0 * r
        scale = alpha / r**0.5 if rslora else alpha / r
        modules[m] = LoraModule(A=torch.randn(r, I, generator=g), B=torch.randn(O, r, generator=g), scale=scale)
    return LoraAdapter(name, modules, base_model="tiny")
