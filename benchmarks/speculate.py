"""Speculative compose on the real server: the same seeded trace with `speculate: N` and with it off.

    .venv/bin/python benchmarks/speculate.py [--requests 40] [--think 1.5] [--speculate 4] [--max-tokens 4]

`knots-serve serve` with configs/default.yaml (SmolLM2-135M-Instruct + the 8 demo adapters). One client sends
--requests chat requests one after another, --think seconds apart (the idle time speculation uses), each for a
2-task knots-ties merge `tasks:A+B` whose tasks are drawn from a Zipf law over the 8 tasks (s = --zipf, fixed
seed): a few hot tasks, many pairs. Run twice on fresh servers, speculation off then on. Reported per run:
the requests whose merge had to be composed on the request path (cache misses), median and p90 latency, and
with speculation the composes it made and what came of them (knots_speculative_total: hit, wasted).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_load import one, scenario, server_config, start_server

TASKS = ["add", "sentiment", "reverse_words", "to_digits", "sort_numbers", "max_number", "last_word", "pick_category"]


def trace(n: int, s: float, seed: int) -> list[str]:
    """n merges of two distinct tasks, each task drawn with weight 1/rank^s."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(len(TASKS))]
    out = []
    while len(out) < n:
        a, b = rng.choices(TASKS, weights, k=2)
        if a != b:
            out.append(f"tasks:{'+'.join(sorted((a, b)))}")
    return out


def counters(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=60).read().decode()
    out = {}
    for name, label, value in re.findall(
        r'^(knots_compose_cache_total|knots_speculative_total)\{\w+="(\w+)"\} (\S+)', text, re.M
    ):
        out[f"{name.split('_')[1]}:{label}"] = float(value)
    return out


async def drive(url: str, models: list[str], think: float, max_tokens: int) -> list[float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900)
    await scenario(client, ["add", "sentiment"], 2, max_tokens)  # warm: engine and LoRA paths
    latencies = []
    for i, m in enumerate(models):
        await asyncio.sleep(think)
        latencies.append((await one(client, m, i, max_tokens))[1])
    return latencies


def run(models: list[str], speculate: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="knots-serve-bench-") as tmp:
        root = Path(tmp)
        cfg = server_config(root / "cache", root / "state", speculate=speculate) | {"store_poll_s": 0.5}
        with start_server(root, cfg, {"KNOTS_ADMIN_KEY": "bench-key"}, timeout=900) as srv:
            before = counters(srv.url)
            t0 = time.perf_counter()
            lat = asyncio.run(drive(srv.url, models, args.think, args.max_tokens))
            wall = time.perf_counter() - t0
            after = counters(srv.url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    lat.sort()
    return {
        "speculate": speculate,
        "misses": int(delta.get("compose:miss", 0)),
        "p50": statistics.median(lat),
        "p90": lat[int(0.9 * (len(lat) - 1))],
        "wall": wall,
        "composed": int(delta.get("speculative:composed", 0)),
        "hit": int(delta.get("speculative:hit", 0)),
        "wasted": int(delta.get("speculative:wasted", 0)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--think", type=float, default=1.5, help="seconds between a response and the next request")
    ap.add_argument("--speculate", type=int, default=4)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    models = trace(args.requests, args.zipf, args.seed)
    print(
        f"# {len(models)} requests, {len(set(models))} distinct merges; think {args.think} s; {args.max_tokens} tokens"
    )
    print("| speculate | composed on the request path | p50 (s) | p90 (s) | speculative: composed / hit / wasted |")
    print("|---:|---:|---:|---:|---|")
    for n in (0, args.speculate):
        r = run(models, n, args)
        spec = f"{r['composed']} / {r['hit']} / {r['wasted']}" if n else "—"
        print(f"| {n} | {r['misses']} | {r['p50']:.2f} | {r['p90']:.2f} | {spec} |", flush=True)


if __name__ == "__main__":
    main()
