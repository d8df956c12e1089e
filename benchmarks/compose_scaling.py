"""Compose cost vs the pool: a 2-task and an 8-task merge of a pool of 8, 32, 128 rank-16 tasks.

    .venv/bin/python benchmarks/compose_scaling.py --shapes llama3-8b --pools 8,32,128 --layers 1
    .venv/bin/python benchmarks/compose_scaling.py --shapes smollm2-135m --pools 8,32,128 --layers 1
    .venv/bin/python benchmarks/compose_scaling.py --shapes llama3-8b --pools 8 --subsets 2,8 --layers 32  # whole model
    PYTHONPATH=<an older checkout> .venv/bin/python benchmarks/compose_scaling.py ...                   # before

Synthetic factors (benchmarks/basis.py: `synthetic_pool`), q/k/v/o/gate/up/down of --layers decoder layers;
"per model" multiplies by the model's layer count when fewer layers are timed. Columns, each the median of
--repeat runs after one warm-up:
- shared: knots-ties in the pool's resident KnOTS basis (`basis: shared`; the server's only mode before);
- subset: the subset's own basis built, then knots-ties in it (`basis: subset`);
- server: what the server composes for `tasks:…@knots-ties` — the basis store's `merge` (`basis: auto`),
  factors on the host — where this version of knots_serve has a basis store, else the shared column;
- ta: knots-ta the same two ways: server path (from the factors) / in the shared basis.
--device cuda runs the same on a GPU (timed with synchronization).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from basis import SHAPES, synthetic_pool

from knots_serve.basis import build_basis
from knots_serve.compose import MergeSpec, merge_lora

LAYERS = {"llama3-8b": 32, "smollm2-135m": 30}


def timed(fn, device: str, repeat: int) -> float:
    def once():
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()  # warm-up: kernels compiled, caches filled
    return statistics.median(once() for _ in range(repeat))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--pools", default="8,32,128")
    ap.add_argument("--subsets", default="2,8")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from knots_serve.serving.merges.basis_store import BasisStore
        from knots_serve.serving.merges.names import parse_model
    except ImportError:  # an older version: the server composed in the shared basis
        BasisStore = None
    scale = LAYERS[args.shapes] / args.layers
    device = args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    print(
        f"# {args.shapes}, q/k/v/o/gate/up/down × {args.layers} layer(s), rank {args.rank}; per model = × {scale:g}; "
        f"{device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{'basis store' if BasisStore else 'no basis store (older version)'}; median of {args.repeat}"
    )
    print(
        "| pool | subset | shared basis build (s) | knots-ties shared (s) | knots-ties subset (s) | "
        "knots-ties server (s) | per model, server (s) | knots-ta server (s) | knots-ta shared (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    shapes = SHAPES[args.shapes]
    for P in (int(p) for p in args.pools.split(",")):
        pool = synthetic_pool(shapes, list(shapes), P, args.rank, args.layers)
        t0 = time.perf_counter()
        shared = build_basis(pool, "knots") if BasisStore is None else None  # (older versions: CPU only)
        store = BasisStore({a.name: a for a in pool}, device) if BasisStore else None
        if store is not None:
            shared = store.basis("knots", "shared", ())
        build = time.perf_counter() - t0
        for n in (int(s) for s in args.subsets.split(",")):
            names = tuple(a.name for a in pool[:n])
            subset = pool[:n]
            ties, ta = MergeSpec(names, "knots-ties"), MergeSpec(names, "knots-ta")
            t_shared = timed(lambda: merge_lora(shared, ties), device, args.repeat)
            on = {} if device == "cpu" else {"device": device}  # (older versions: no device argument)
            t_subset = timed(lambda: merge_lora(build_basis(subset, "knots", **on), ties), device, args.repeat)
            t_ta_shared = timed(lambda: merge_lora(shared, ta), device, args.repeat)
            if store is not None:
                sel = parse_model(f"tasks:{'+'.join(names)}@knots-ties", "knots-ties")
                store.clear_subsets()
                t_server = timed(lambda: (store.clear_subsets(), store.merge(sel)), device, args.repeat)
                t_ta = timed(
                    lambda: store.merge(parse_model(f"tasks:{'+'.join(names)}@knots-ta", "knots-ties")),
                    device,
                    args.repeat,
                )
            else:
                t_server, t_ta = t_shared, t_ta_shared
            print(
                f"| {P} | {n} | {build:.2f} | {t_shared:.3f} | {t_subset:.3f} | {t_server:.3f} | "
                f"{t_server * scale:.2f} | {t_ta:.3f} | {t_ta_shared:.3f} |",
                flush=True,
            )
        pool = shared = store = None  # free this pool before the next one is built


if __name__ == "__main__":
    main()
