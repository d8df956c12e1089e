"""Pin/unpin (dense swap) time vs model size on the real server, with the LoRA path as the comparison.

    .venv/bin/python benchmarks/swap.py [--smollm2]

For each model: start `knots-serve serve` with two rank-16 q/k/v/o task adapters, then time
POST /admin/pin of their knots-ties merge and DELETE /admin/pin, 3 times each, and report the median,
split as the server reports it: prepared while requests are served (compose in the API server, factors
loaded by the workers) and the stop-the-world part (drain + write W0+ΔW + CPU repack + prefix-cache reset). Random
Llama-shaped models are built here (tests/tiny.py); --smollm2 adds the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import start_server
from tiny import make_peft_lora, make_tiny_llama

KEY = "bench-key"


def call(url, method, path, body=None):
    req = urllib.request.Request(
        f"{url}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read()), time.perf_counter() - t0


def params(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for f in model_dir.glob("*.safetensors") for t in load_file(f).values())


def bench(root: Path, base: Path, label: str, dtype: str):
    tasks = {
        n: make_peft_lora(
            base, root / n, seed=i, r=16, alpha=32, std=0.02, targets=("q_proj", "k_proj", "v_proj", "o_proj")
        )
        for i, n in enumerate(("a", "b"))
    }
    config = {
        "model": str(base),
        "served_model_name": "m",
        "tasks": {n: str(p) for n, p in tasks.items()},
        "max_lora_rank": 64,
        "cache_dir": str(root / "cache"),
        "state_dir": str(root / "state"),
        "vllm_args": ["--dtype", dtype, "--max-model-len", "256", "--kv-cache-memory-bytes", str(512 << 20)],
    }
    with start_server(root, config, {"KNOTS_ADMIN_KEY": KEY}, timeout=600) as srv:
        pins, unpins = [], []
        for _ in range(3):
            info, wall = call(srv.url, "POST", "/admin/pin", {"model": "tasks:a+b@knots-ties"})
            pinned = info["pinned"]
            pins.append((wall, pinned["prepare_s"], pinned["drain_s"] + pinned["swap_s"]))
            info, wall = call(srv.url, "DELETE", "/admin/pin")
            unpins.append((wall, info["swap_s"]))

    def med(rows, i):
        return statistics.median(r[i] for r in rows)

    print(
        f"| {label} | {params(base) / 1e6:.1f} M | {dtype} | {med(pins, 0):.3f} | {med(pins, 1):.3f} | "
        f"{med(pins, 2):.3f} | {med(unpins, 0):.3f} |",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2", action="store_true", help="also the real SmolLM2-135M-Instruct (prepare-base)")
    args = ap.parse_args()
    print(
        "| model | params | dtype | pin, wall (s) | prepared while serving (s) | stop-the-world (s) | unpin, wall (s) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, layers in ((128, 2), (512, 8), (1024, 16)):
            root = Path(tmp) / f"h{hidden}"
            base = make_tiny_llama(root / "base", hidden=hidden, layers=layers)
            bench(root, base, f"random Llama h{hidden} L{layers}", "float32")
        if args.smollm2:
            from knots_serve.base_model import prepare_base

            bench(Path(tmp) / "smol", prepare_base(), "SmolLM2-135M-Instruct", "bfloat16")


if __name__ == "__main__":
    main()
