"""Basis build and merge: this project's low-rank KnOTS basis vs the KnOTS reference algorithm (dense
float64 SVD) vs PEFT add_weighted_adapter (`cat`, `ties_svd`), time and error against float64 references.

    .venv/bin/python benchmarks/basis.py --shapes smollm2-135m
    .venv/bin/python benchmarks/basis.py --shapes llama3-8b --dense-modules q,k,v

Synthetic factors (timing does not depend on the values), one decoder layer of the named model's shapes,
every module of --modules. The dense reference is the KnOTS paper's algorithm: an SVD of the concatenated
updates M = [ΔW_1 | … | ΔW_n] (O × nI) in float64; it is slow at 8B shapes (minutes per module), so
--dense-modules picks the module types it runs on, and the low-rank basis is timed on the same ones for the
ratio. PEFT runs on a one-layer random Llama of the same shapes (transformers + peft, the LoRAs copied in).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from peft_compare import add_weighted, rel_error

from knots_serve.adapters import LoraAdapter, LoraModule
from knots_serve.basis import DEFAULT_RTOL, build_basis
from knots_serve.compose import MergeSpec, merge_dense, merge_lora
from knots_serve.methods import METHODS

F64 = torch.float64
# (O, I) of one decoder layer's projections, and the attention head size
SHAPES = {
    "llama3-8b": dict(
        q=(4096, 4096),
        k=(1024, 4096),
        v=(1024, 4096),
        o=(4096, 4096),
        gate=(14336, 4096),
        up=(14336, 4096),
        down=(4096, 14336),
    ),
    "smollm2-135m": dict(
        q=(576, 576), k=(192, 576), v=(192, 576), o=(576, 576), gate=(1536, 576), up=(1536, 576), down=(576, 1536)
    ),
}
HEAD_DIM = {"llama3-8b": 128, "smollm2-135m": 64}
NAMES = dict(
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
)


def synthetic_pool(shapes: dict, modules: list[str], tasks: int, rank: int, layers: int = 1) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(0)
    pool = []
    for t in range(tasks):
        mods = {}
        for layer in range(layers):
            for m in modules:
                O, I = shapes[m]
                mods[f"model.layers.{layer}.{NAMES[m]}"] = LoraModule(
                    A=torch.randn(rank, I, generator=g) / I**0.5, B=torch.randn(O, rank, generator=g) / rank, scale=2.0
                )
        pool.append(LoraAdapter(f"task{t}", mods, "synthetic"))
    return pool


def only(pool: list[LoraAdapter], kinds: list[str]) -> list[LoraAdapter]:
    """The pool restricted to some module types (q, k, …)."""
    keep = tuple(NAMES[k] for k in kinds)
    return [LoraAdapter(a.name, {m: l for m, l in a.modules.items() if m.endswith(keep)}, a.base_model) for a in pool]


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def dense_reference(pool: list[LoraAdapter]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The KnOTS reference: per module, a dense float64 SVD of M = [ΔW_1 | … | ΔW_n], rank-truncated."""
    out = {}
    for m in pool[0].modules:
        M = torch.cat([a.modules[m].delta(F64) for a in pool], dim=1)
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        k = int((s > DEFAULT_RTOL * s[0]).sum())
        out[m] = (U[:, :k].clone(), s[:k].clone(), Vh[:k].clone())
    return out


def ties_from_reference(ref, pool: list[LoraAdapter], top_k: float) -> dict[str, torch.Tensor]:
    """KnOTS-TIES (per-module trim) in the dense reference basis: X_i = diag(σ)·Vh_i, ΔW = U·TIES(X)."""
    out = {}
    for m, (U, s, Vh) in ref.items():
        I = pool[0].modules[m].A.shape[1]
        X = torch.stack([x.flatten() for x in (s[:, None] * Vh).split(I, dim=1)])
        R = METHODS["ties"].fn(X, torch.ones(len(pool), dtype=F64), top_k=top_k).view(-1, I)
        out[m] = U @ R
    return out


def exact_ties(pool: list[LoraAdapter], top_k: float) -> dict[str, torch.Tensor]:
    """Dense TIES on the float64 ΔW_i with a per-module trim (what PEFT's ties_svd approximates)."""
    out = {}
    for m, lora in pool[0].modules.items():
        X = torch.stack([a.modules[m].delta(F64).flatten() for a in pool])
        out[m] = METHODS["ties"].fn(X, torch.ones(len(pool), dtype=F64), top_k=top_k).view(lora.shape)
    return out


def peft_model(shapes: str, pool: list[LoraAdapter], modules: list[str], rank: int):
    """A one-layer random Llama of the named shapes with the pool's LoRAs loaded into PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    S, hd = SHAPES[shapes], HEAD_DIM[shapes]
    cfg = LlamaConfig(
        hidden_size=S["q"][1],
        intermediate_size=S["gate"][0],
        num_hidden_layers=1,
        vocab_size=256,
        num_attention_heads=S["q"][0] // hd,
        num_key_value_heads=S["k"][0] // hd,
        head_dim=hd,
    )
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[NAMES[m].split(".")[1] for m in modules])
    model = get_peft_model(LlamaForCausalLM(cfg), lcfg, adapter_name=pool[0].name)
    for a in pool[1:]:
        model.add_adapter(a.name, lcfg)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and pool[0].name in module.lora_A:
                key = name.removeprefix("base_model.model.")
                for a in pool:
                    module.lora_A[a.name].weight.copy_(a.modules[key].A)
                    module.lora_B[a.name].weight.copy_(a.modules[key].B)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=list(SHAPES), default="smollm2-135m")
    ap.add_argument("--modules", default="q,k,v,o,gate,up,down")
    ap.add_argument("--dense-modules", default=None, help="module types for the dense reference (default: all)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top-k", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=3, help="best of N for the fast steps")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modules = args.modules.split(",")
    dense_mods = args.dense_modules.split(",") if args.dense_modules else modules
    pool = synthetic_pool(SHAPES[args.shapes], modules, args.tasks, args.rank)
    names, n = tuple(a.name for a in pool), args.tasks
    print(
        f"# {args.shapes}, one layer, {'/'.join(modules)}, {n} tasks, rank {args.rank}, top_k {args.top_k}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}",
        flush=True,
    )
    rows = []  # (group, implementation, time, alternative's time or None, error text)

    # 1. the basis: low-rank vs the dense reference, on the module types the reference runs on
    sub = only(pool, dense_mods)
    t_low_sub, basis_sub = timed(lambda: build_basis(sub, "knots"), args.repeat)
    t_dense, ref = timed(lambda: dense_reference(sub), 1)
    s_err = max(
        (torch.linalg.norm(ref[m][1][: len(s)] - s) / torch.linalg.norm(ref[m][1])).item()
        for m, ms in basis_sub.modules.items()
        for s in [torch.linalg.svdvals(torch.cat(list(ms.stack(list(names)).double()), dim=1))]
    )
    ties_spec = MergeSpec(names, "knots-ties", {"top_k": args.top_k}, trim_scope="module")
    k_err = rel_error(merge_dense(basis_sub, ties_spec), ties_from_reference(ref, sub, args.top_k))
    del ref
    on = "/".join(dense_mods)
    rows.append(
        ("KnOTS basis", f"reference: dense float64 SVD of [ΔW_1…ΔW_n], {on}", t_dense, t_dense, "0 (reference)")
    )
    rows.append(
        (
            "KnOTS basis",
            f"knots-serve low-rank (QR + core SVD), {on}",
            t_low_sub,
            t_dense,
            f"σ {s_err:.1e}; knots-ties ΔW {k_err:.1e}",
        )
    )
    t_knots, basis = timed(lambda: build_basis(pool, "knots"), args.repeat)
    t_core, _ = timed(lambda: build_basis(pool, "core"), args.repeat)
    full = dense_mods == modules
    rows.append(
        ("KnOTS basis", f"knots-serve low-rank, all {len(modules)} modules", t_knots, t_dense if full else None, "")
    )
    rows.append(
        (
            "KnOTS basis",
            f"knots-serve Core Space basis, all {len(modules)} modules",
            t_core,
            t_dense if full else None,
            "lossless (tests: 1e-5)",
        )
    )

    # 2. TA over all tasks: exact reference Σ ΔW_i
    ta_ref = {m: sum(a.modules[m].delta(F64) for a in pool) for m in pool[0].modules}
    t_ta, lora = timed(lambda: merge_lora(basis, MergeSpec(names, "knots-ta")), args.repeat)
    err_ta = rel_error({m: B.double() @ A.double() for m, (B, A) in lora.items()}, ta_ref)
    # 3. TIES over all tasks: exact reference = dense float64 TIES with a per-module trim (as PEFT trims)
    t_ties, ties_ref = timed(lambda: exact_ties(pool, args.top_k), 1)
    t_kt, _ = timed(lambda: merge_lora(basis, MergeSpec(names, "knots-ties", {"top_k": args.top_k})), args.repeat)
    t_cat = t_svd = None
    if not args.no_peft:
        peft = peft_model(args.shapes, pool, modules, args.rank)
        t_cat, got = add_weighted(peft, list(names), "cat", args.top_k, args.rank * n)
        cat_err = rel_error(got, ta_ref)
        t_svd, got = add_weighted(peft, list(names), "ties_svd", args.top_k, args.rank * n)
        svd_err = rel_error(got, ties_ref)
        del peft, got
        rows.append(("TA merge", "PEFT add_weighted_adapter cat", t_cat, t_cat, f"{cat_err:.1e}"))
    rows.append(("TA merge", "knots-serve knots-ta from the resident basis", t_ta, t_cat, f"{err_ta:.1e}"))
    rows.append(("TA merge", "knots-serve basis + knots-ta (from scratch)", t_knots + t_ta, t_cat, f"{err_ta:.1e}"))
    if not args.no_peft:
        rows.append(
            (
                "TIES merge",
                f"PEFT add_weighted_adapter ties_svd (svd_rank {args.rank * n})",
                t_svd,
                t_svd,
                f"{svd_err:.1e} vs dense TIES",
            )
        )
    rows.append(("TIES merge", "knots-serve ties, dense float64 (exact dense TIES)", t_ties, t_svd, "0 (reference)"))
    rows.append(
        (
            "TIES merge",
            "knots-serve knots-ties from the resident basis",
            t_kt,
            t_svd,
            "exact low-rank (KnOTS-TIES, another merge)",
        )
    )

    print("| step | implementation | time (s) | speedup vs alternative | rel. error vs float64 reference |")
    print("|---|---|---:|---:|---|")
    for group, impl, t, alt, err in rows:
        ratio = "—" if alt is None else f"{alt / t:.3g}"
        print(f"| {group} | {impl} | {t:.3f} | {ratio} | {err} |")
    print("\nspeedup: time of the step's first row (the reference SVD; PEFT cat; PEFT ties_svd) / this row's time")


if __name__ == "__main__":
    main()
