"""The singular spectrum of the 8-task merged update per method, in a few layers: what each method does to
the directions of the tasks it sums (the picture next to the quality tables in docs/BENCHMARKS.md).

    .venv/bin/python benchmarks/quality/spectra.py   # reads the chosen parameters from results/methods

Each method at the parameters its per-task search chose on validation (results/methods/results.json; the
registry defaults where a method is missing there), merged by the library (no engine) from the 8 committed
demo adapters. For comparison, each task's own update: its spectrum is drawn in grey.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from knots_serve.adapters import load_adapter
from knots_serve.basis import build_basis
from knots_serve.compose import MergeSpec, adapter_factors, merge_factors, merge_lora
from knots_serve.demo_tasks import TASKS
from knots_serve.methods import factored, resolve

REPO = Path(__file__).resolve().parents[2]
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.15.self_attn.v_proj", "model.layers.29.self_attn.o_proj")


def spectrum(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of B·A from its factors (QRs, then the r × r core)."""
    _, Rb = torch.linalg.qr(B.double())
    _, Ra = torch.linalg.qr(A.double().T)
    return torch.linalg.svdvals(Rb @ Ra.T)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/quality/results/methods/results.json")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/quality/results/methods/spectra.png")
    args = p.parse_args()
    chosen = json.loads(args.results.read_text())["methods"] if args.results.is_file() else {}
    names = tuple(TASKS)
    adapters = {t: load_adapter(REPO / "adapters" / t, t) for t in names}
    factors = adapter_factors(adapters, names)
    methods = list(chosen) or ["ta", "ties", "knots-ties", "iso-c", "iso-cts", "tsv", "cart"]
    bases: dict[str, object] = {}
    spectra = {}
    for method in methods:
        params = chosen.get(method, {}).get("per_task", {}).get("params", {})
        spec = MergeSpec(names, method, params)
        space, m = resolve(method)
        if factored(m):
            lora = merge_factors(factors, spec)
        else:
            if space not in bases:
                bases[space] = build_basis(list(adapters.values()), space)
            lora = merge_lora(bases[space], spec, max_rank=None)
        spectra[method] = {mod: spectrum(*lora[mod]) for mod in MODULES}
        print(
            method,
            params,
            {mod.split(".")[2]: round(float(s[0] / s[s > 1e-6 * s[0]][-1]), 1) for mod, s in spectra[method].items()},
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODULES), figsize=(5.0 * len(MODULES), 4.0))
    for ax, mod in zip(axes, MODULES):
        for t in names:
            lora = adapters[t].modules[mod]
            ax.plot(spectrum(lora.scale * lora.B, lora.A).numpy(), color="0.8", linewidth=0.8)
        for method, per in spectra.items():
            s = per[mod].numpy()
            ax.plot(s[s > 1e-6 * s[0]], label=method, linewidth=1.4)
        ax.set_yscale("log")
        ax.set_title(mod.removeprefix("model."), fontsize=9)
        ax.set_xlabel("singular value index")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("singular value of the merged ΔW (grey: each task's own)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Spectrum of the 8-task merged update per method (parameters chosen on validation)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
