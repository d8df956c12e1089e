"""Where float32 changes what the TIES trim keeps, and what it costs: the demo adapters merged in float32
(the serving path) and in float64 from the same stored basis.

    .venv/bin/python benchmarks/float32_trim.py

Per merge (weights 1, and a 2-task merge weighted 0.7/1.3, where w·x is rounded too): entries each task's
trim keeps in float64 that float32 does not, or the other way round
(flips), out of all entries; and the relative Frobenius distance of the float32 merge (ΔW per module,
summed over modules) from the float64 one.
"""

from __future__ import annotations

import torch
from compose import DEMO, ROOT

from knots_serve.adapters import load_adapter
from knots_serve.basis import build_basis
from knots_serve.compose import MergeSpec, merge_dense
from knots_serve.methods import resolve, trim_thresholds


def stack(basis, names, dtype):
    return torch.cat([basis.modules[m].stack(names, dtype).flatten(1) for m in basis.modules], dim=1)


def flips(basis, names, spec: MergeSpec) -> tuple[int, int]:
    """Kept-entry decisions of the global trim that differ between float32 and float64 (all tasks)."""
    keep = []
    for dtype in (torch.float32, torch.float64):
        w = torch.tensor([spec.weights.get(t, 1.0) for t in names], dtype=dtype)
        X = w[:, None] * stack(basis, names, dtype)
        keep.append(X.abs() >= trim_thresholds(X, spec.resolved_params()["top_k"])[:, None])
    return int((keep[0] != keep[1]).sum()), keep[0].numel()


def main():
    pool = [load_adapter(ROOT / "adapters" / t, t) for t in DEMO]
    print("| merge | basis | entries | trim flips (f32 vs f64) | share | ‖ΔW₃₂ − ΔW₆₄‖ / ‖ΔW₆₄‖ |")
    print("|---|---|---:|---:|---:|---:|")
    for method in ("knots-ties", "core-ties", "ties"):
        space, _ = resolve(method)
        shared = build_basis(pool, space)
        for names, weights in (
            (tuple(DEMO[:2]), {}),
            (tuple(DEMO[:2]), {DEMO[0]: 0.7, DEMO[1]: 1.3}),
            (tuple(DEMO), {}),
        ):
            for label, basis in (
                ("shared", shared),
                ("subset", build_basis([a for a in pool if a.name in names], space)),
            ):
                if label == "subset" and len(names) == len(DEMO):
                    continue  # the subset of all tasks is the shared basis
                spec = MergeSpec(names, method, weights=weights)
                n, total = flips(basis, list(names), spec)
                a, b = merge_dense(basis, spec), merge_dense(basis, spec, dtype=torch.float64)
                num = sum(float(torch.linalg.norm(a[m] - b[m]) ** 2) for m in a) ** 0.5
                den = sum(float(torch.linalg.norm(b[m]) ** 2) for m in b) ** 0.5
                w = f", weights {'/'.join(str(weights[t]) for t in names)}" if weights else ""
                print(
                    f"| {method}, {len(names)} tasks{w} | {label} | {total} | {n} | {n / total:.1e} | "
                    f"{num / den:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
