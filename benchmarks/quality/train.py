"""Train one LoRA per demo task (knots_serve/demo_tasks.py) on SmolLM2-135M-Instruct, on CPU.

    .venv/bin/python benchmarks/quality/train.py --tasks sentiment,add --steps 150 --out adapters

Writes adapters/<task>/ (PEFT adapter, bf16 safetensors, base_model_name_or_path = the model's name, not a
local path) and adapters/<task>/metrics.json (validation exact match of the base model and of the LoRA).
Resumable: a checkpoint is saved every --save-every steps into <out>/<task>/checkpoint.pt and training
continues from it; a task whose adapter was finished with the same settings is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from knots_serve.atomic import atomic_write_dir
from knots_serve.base_model import MODEL_NAME, prepare_base
from knots_serve.demo_tasks import TASKS, Task

REPO = Path(__file__).resolve().parents[2]
IGNORE = -100  # label of tokens that carry no loss (the prompt)


def encode(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-formatted tokens and labels; the loss sees only the answer and the <|im_end|> that ends it."""
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    tail = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return head + tail, [IGNORE] * len(head) + tail


def collate(tok, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in pairs)

    def pad(xs, v):
        return xs + [v] * (n - len(xs))

    return {
        "input_ids": torch.tensor([pad(ids, tok.pad_token_id) for ids, _ in pairs]),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in pairs]),
        "labels": torch.tensor([pad(labels, IGNORE) for _, labels in pairs]),
    }


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch: int = 50) -> list[str]:
    """Greedy answers, batched with left padding (so every row's next token comes at the same position)."""
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch):
        chats = [[{"role": "user", "content": p}] for p in prompts[i : i + batch]]
        enc = tok.apply_chat_template(
            chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        )
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def evaluate(model, tok, task: Task, examples, max_new_tokens: int) -> dict:
    preds = generate(model, tok, [e.prompt for e in examples], max_new_tokens)
    exact = sum(task.score(p, e.answer) for p, e in zip(preds, examples)) / len(examples)
    # does the answer appear anywhere: tells a base model that knows the answer but not the format apart
    contains = sum(e.answer.casefold() in p.casefold() for p, e in zip(preds, examples)) / len(examples)
    samples = [[e.prompt, e.answer, p] for p, e in list(zip(preds, examples))[:3]]
    return {"exact": exact, "contains": contains, "samples": samples}


def lr_at(step: int, args) -> float:
    warm = min(10, args.steps // 10)
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm))))


def save_adapter_bf16(model, out_dir: Path, metrics: dict) -> None:
    """PEFT save_pretrained, then weights as bf16 (half the size; vLLM casts to its own dtype anyway)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        weights = tmp / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}, weights)
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = MODEL_NAME  # a name: the local cache path means nothing elsewhere
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub, with a local path in it

    atomic_write_dir(out_dir, write)


def train_task(name: str, args, base_dir: Path, tok) -> dict:
    task, out_dir = TASKS[name], Path(args.out) / name
    settings = {
        "steps": args.steps,
        "lr": args.lr,
        "batch": args.batch,
        "rank": 16,
        "alpha": 32,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    done = out_dir / "metrics.json"
    if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
        print(f"{name}: already trained with these settings, skipping")
        return json.loads(done.read_text())

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)  # LoRA weights are kept in float32 even on a bf16 base (PEFT default)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    train, val = task.examples("train", args.seed), task.examples("val", args.seed)
    encoded = [encode(tok, e.prompt, e.answer) for e in train]
    order = list(range(len(encoded)))
    random.Random(args.seed).shuffle(order)
    max_new = max(len(tok(e.answer)["input_ids"]) for e in val) + 3

    ckpt_dir = Path(args.out) / f".{name}.checkpoint"
    ckpt, step, losses = ckpt_dir / "checkpoint.pt", 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        if state["settings"] == settings:
            set_peft_model_state_dict(model, state["lora"])
            opt.load_state_dict(state["optim"])
            step, losses = state["step"], state["losses"]
            print(f"{name}: resuming from step {step}")

    model.train()
    t0, bar = time.time(), tqdm(range(step, args.steps), desc=name, initial=step, total=args.steps)
    for step in bar:
        idx = [order[(step * args.batch + j) % len(order)] for j in range(args.batch)]  # fixed by the step: resumable
        batch = collate(tok, [encoded[i] for i in idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            acc = evaluate(model, tok, task, val[: args.eval_n], max_new)["exact"]
            tqdm.write(f"{name} step {step + 1}: val exact match {acc:.2f} (first {args.eval_n})")
            model.train()
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "settings": settings,
                "step": step + 1,
                "losses": losses,
                "lora": get_peft_model_state_dict(model),
                "optim": opt.state_dict(),
            }
            torch.save(state, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)  # a crash mid-save leaves the previous checkpoint
    train_s = time.time() - t0

    model.eval()
    lora = evaluate(model, tok, task, val, max_new)
    with model.disable_adapter():
        base = evaluate(model, tok, task, val, max_new)
    metrics = {
        "task": name,
        "description": task.description,
        "settings": settings,
        "train_seconds_this_run": round(train_s, 1),
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "val_size": len(val),
        "max_new_tokens": max_new,
        "base_val_exact": base["exact"],
        "lora_val_exact": lora["exact"],
        "base_val_contains": base["contains"],
        "lora_val_contains": lora["contains"],
        "base_samples": base["samples"],
        "lora_samples": lora["samples"],
    }
    save_adapter_bf16(model, out_dir, metrics)
    if ckpt_dir.is_dir():  # the adapter is final now: its checkpoint would only resume a finished run
        shutil.rmtree(ckpt_dir)
    print(f"{name}: val exact match base {base['exact']:.2f} -> LoRA {lora['exact']:.2f}")
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: all)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default=str(REPO / "adapters"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=0, help="also check val exact match every N steps")
    p.add_argument("--eval-n", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        p.error(f"unknown tasks {unknown}; known: {list(TASKS)}")
    base_dir = prepare_base()
    tok = AutoTokenizer.from_pretrained(base_dir)
    t0 = time.time()
    results = {n: train_task(n, args, base_dir, tok) for n in names}
    print(f"\n{'task':<15}{'base':>6}{'LoRA':>6}   ({time.time() - t0:.0f} s)")
    for n, m in results.items():
        print(f"{n:<15}{m['base_val_exact']:>6.2f}{m['lora_val_exact']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
