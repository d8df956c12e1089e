"""Merging the demo adapters: this project vs PEFT `add_weighted_adapter` (`cat`, `ties_svd`), time and
error against the exact float64 merge.

    .venv/bin/python benchmarks/peft_compare.py [--tasks add,sentiment,...]

Real SmolLM2-135M-Instruct and the trained demo adapters (8 × rank 16 on q/k/v/o of 30 layers). The
exact reference of a TA merge is Σ w_i ΔW_i; of a TIES merge, TIES on the dense ΔW_i in float64 (this
project's `ties`, checked against the numpy reference in tests). PEFT re-factors a dense TIES merge by
a truncated SVD (`ties_svd`, rank = svd_rank) — the error column shows what that costs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from knots_serve.adapters import load_adapter
from knots_serve.base_model import prepare_base
from knots_serve.basis import build_basis
from knots_serve.compose import MergeSpec, merge_dense, merge_lora

ROOT = Path(__file__).resolve().parents[1]


def rel_error(got: dict, want: dict) -> float:
    num = sum(float(torch.linalg.norm(got[m].double() - want[m]) ** 2) for m in want)
    return (num / sum(float(torch.linalg.norm(w) ** 2) for w in want.values())) ** 0.5


def peft_merge(base_dir: Path, tasks: list[str], combination: str, density: float, rank: int):
    """(seconds, {module: ΔW}) for PEFT's add_weighted_adapter on the real model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, ROOT / "adapters" / tasks[0], adapter_name=tasks[0])
    for t in tasks[1:]:
        peft.load_adapter(ROOT / "adapters" / t, adapter_name=t)
    return add_weighted(peft, tasks, combination, density, rank)


def add_weighted(peft, tasks: list[str], combination: str, density: float, rank: int):
    """(seconds, {module: ΔW float64}) of PEFT's add_weighted_adapter over the loaded adapters `tasks`."""
    kw = {"density": density} if combination.startswith("ties") else {}
    if combination.endswith("svd"):
        kw["svd_rank"] = rank
    t0 = time.perf_counter()
    peft.add_weighted_adapter(tasks, [1.0] * len(tasks), "merged", combination_type=combination, **kw)
    seconds = time.perf_counter() - t0
    deltas = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            A, B = module.lora_A["merged"].weight.double(), module.lora_B["merged"].weight.double()
            deltas[key] = module.scaling["merged"] * B @ A
    peft.delete_adapter("merged")
    return seconds, deltas


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tasks", default="add,sentiment,reverse_words,to_digits,sort_numbers,max_number,last_word,pick_category"
    )
    ap.add_argument("--top-k", type=float, default=0.2, help="TIES keep fraction (PEFT: density)")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    base = prepare_base()
    pool = [load_adapter(ROOT / "adapters" / t, t) for t in tasks]
    names = tuple(tasks)
    ta_ref = merge_dense(build_basis(pool, "full"), MergeSpec(names, "ta"))
    t0 = time.perf_counter()
    full = build_basis(pool, "full")
    # PEFT trims each module's ΔW on its own: compare with the per-module trim scope
    ties_ref = merge_dense(full, MergeSpec(names, "ties", {"top_k": args.top_k}, trim_scope="module"))
    t_ties_dense = time.perf_counter() - t0
    rank = 16 * len(tasks)
    print(
        f"# {len(tasks)} demo adapters on SmolLM2-135M-Instruct; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| merge | implementation | time (s) | rank | rel. error vs exact |")
    print("|---|---|---:|---:|---:|")
    t0 = time.perf_counter()
    knots = build_basis(pool, "knots")
    lora = merge_lora(knots, MergeSpec(names, "knots-ta"))
    t = time.perf_counter() - t0
    got = {m: B.double() @ A.double() for m, (B, A) in lora.items()}
    print(
        f"| TA | knots-serve knots-ta (basis + merge) | {t:.2f} | {max(B.shape[1] for B, _ in lora.values())} | "
        f"{rel_error(got, ta_ref):.1e} |"
    )
    t, got = peft_merge(base, tasks, "cat", args.top_k, rank)
    print(f"| TA | PEFT add_weighted_adapter cat | {t:.2f} | {rank} | {rel_error(got, ta_ref):.1e} |")
    print(
        f"| TIES (dense, per-module trim) | knots-serve ties, float64 (the reference) | {t_ties_dense:.2f} | full | 0 |"
    )
    t, got = peft_merge(base, tasks, "ties_svd", args.top_k, rank)
    print(
        f"| TIES (dense, per-module trim) | PEFT add_weighted_adapter ties_svd, svd_rank {rank} | {t:.2f} | {rank} | "
        f"{rel_error(got, ties_ref):.1e} |"
    )
    t0 = time.perf_counter()
    lora = merge_lora(knots, MergeSpec(names, "knots-ties", {"top_k": args.top_k}))
    t = time.perf_counter() - t0
    print(
        f"| KnOTS-TIES | knots-serve, from the resident basis | {t:.2f} | "
        f"{max(B.shape[1] for B, _ in lora.values())} | exact (low-rank by construction) |"
    )


if __name__ == "__main__":
    main()
