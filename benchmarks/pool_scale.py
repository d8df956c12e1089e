"""The pool's cost as it grows: basis build, resident memory, a 2-task compose, and adding one adapter.

    cd benchmarks
    ../.venv/bin/python pool_scale.py --shapes smollm2-135m --layers 2 --json results/pool_scale_smollm2.json
    ../.venv/bin/python pool_scale.py --shapes llama3-8b --layers 1 --json results/pool_scale_llama.json

Synthetic rank-16 factors (benchmarks/basis.py) on q/k/v/o/gate/up/down of --layers decoder layers, through
the server's basis store (serving/merges/basis_store.py) on the CPU; "per model" multiplies by the model's
layer count. Per pool size P:
- prepare: what a start or a pool change costs before its drain: each adapter hashed (the pool's
  fingerprint), its factors on the device; the shared KnOTS basis is not built (on first use);
- resident: the store's bytes on the device (the factors), and per unit of the pool's total rank;
- compose: a never-seen 2-task knots-ties merge (`basis: auto`: the subset's own basis) and knots-ta;
- add one: prepare(P + 1) from the installed pool of P: what is redone (the new adapter hashed and copied)
  and what is kept (every other task's device factors and hash);
- shared basis: its build on first use (a merge with `basis: shared`, or a subset over half the pool's
  rank under `auto`), and the resident bytes with it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from basis import SHAPES, synthetic_pool
from method_compose import timed

from knots_serve.basis import lora_ranks
from knots_serve.serving.merges.basis_store import BasisStore
from knots_serve.serving.merges.names import parse_model

LAYERS = {"llama3-8b": 32, "smollm2-135m": 30}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--pools", default="8,32,128")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    scale = LAYERS[args.shapes] / args.layers
    shapes = SHAPES[args.shapes]
    cpu = platform.processor() or platform.machine()
    print(
        f"# {args.shapes}, q/k/v/o/gate/up/down × {args.layers} layer(s), rank {args.rank}; per model = × {scale:g}; "
        f"cpu ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeat}"
    )
    print(
        "| pool | total rank | prepare, per model (s) | resident, per model (MiB) | bytes per unit rank | "
        "2-task knots-ties (s) | 2-task knots-ta (s) | add one: prepare (s) | kept factors | "
        "shared basis on first use (s) | resident with it (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for P in (int(p) for p in args.pools.split(",")):
        pool = synthetic_pool(shapes, list(shapes), P + 1, args.rank, args.layers)
        adapters = {a.name: a for a in pool[:P]}
        t0 = time.perf_counter()
        store = BasisStore(adapters, "cpu")
        prepare = time.perf_counter() - t0
        resident = store.nbytes()
        rank = sum(lora_ranks(adapters).values())
        names = "+".join(a.name for a in pool[:2])
        ties, ta = (parse_model(f"tasks:{names}@{m}", "knots-ties") for m in ("knots-ties", "knots-ta"))
        t_ties = timed(lambda: (store.clear_subsets(), store.merge(ties)), args.repeat)
        t_ta = timed(lambda: store.merge(ta), args.repeat)
        before = store._device_adapters
        t0 = time.perf_counter()
        prepared = store.prepare(adapters | {pool[P].name: pool[P]})
        add = time.perf_counter() - t0
        kept = sum(prepared["_device_adapters"][n] is before[n] for n in adapters)
        t0 = time.perf_counter()
        store.basis("knots", "shared", tuple(a.name for a in pool[:2]))
        shared = time.perf_counter() - t0
        with_shared = store.nbytes()
        row = {
            "pool": P,
            "total_rank_per_layer": rank / args.layers,
            "prepare_s_per_model": prepare * scale,
            "resident_bytes_per_model": resident * scale,
            "bytes_per_unit_rank": resident / rank,
            "compose_2_knots_ties_s_per_model": t_ties * scale,
            "compose_2_knots_ta_s_per_model": t_ta * scale,
            "add_one_prepare_s_per_model": add * scale,
            "add_one_kept_factors": f"{kept}/{P}",
            "shared_basis_first_use_s_per_model": shared * scale,
            "resident_with_shared_bytes_per_model": with_shared * scale,
        }
        rows.append(row)
        print(
            f"| {P} | {rank / args.layers:.0f} | {prepare * scale:.2f} | {resident * scale / 2**20:.0f} | "
            f"{resident / rank:.0f} | {t_ties * scale:.2f} | {t_ta * scale:.2f} | {add * scale:.2f} | {kept}/{P} | "
            f"{shared * scale:.2f} | {with_shared * scale / 2**20:.0f} |",
            flush=True,
        )
        store = prepared = before = None
    if args.json:
        meta = {"shapes": args.shapes, "layers": args.layers, "rank": args.rank, "cpu": cpu, "per_model": scale}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
