"""Serving throughput and time to first token on the real server (SmolLM2-135M-Instruct + 8 demo adapters).

    .venv/bin/python benchmarks/serve_load.py [--rounds 2] [--requests 8] [--concurrency 8] [--max-tokens 16]

Starts `knots-serve serve` with configs/default.yaml (its own port, merge cache and state in a temp dir),
then drives it with an async `openai` client, streaming, greedy, `ignore_eos` so every request generates
exactly --max-tokens tokens. Scenarios, back to back in one run:

- base: the base model;  lora: one original task adapter (plain vLLM multi-LoRA, the alternative);
- cached merge: a two-task knots-ties merge composed and loaded before the run;
- cold merge: every request names a merge never seen before (compose + write + LoRA load on its path);
- pinned merge: the same merge written into the base weights (POST /admin/pin), served without LoRA;
- many subsets: every request a different two-task subset, more subsets than the server's LoRA slots.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_process import start_server

KEY = "bench-key"
PROMPT = "Add the two numbers and give only the sum.\n{a} + {b}"


SHM = Path("/dev/shm")  # where configs/default.yaml keeps the merge cache (tmpfs: a write is never a disk's fsync)


def tmpfs_dir(prefix: str = "knots-serve-cache-") -> tempfile.TemporaryDirectory:
    """A temporary directory on tmpfs where there is one, as the default config's cache_dir is."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir=SHM if SHM.is_dir() else None)


def server_config(cache: Path, state: Path, speculate: int = 0) -> dict:
    """configs/default.yaml with absolute paths and this run's own cache and state directories; speculative
    compose off unless asked (what a never-seen merge costs is what most of these benchmarks measure)."""
    cfg_dir = ROOT / "configs"
    cfg = yaml.safe_load((cfg_dir / "default.yaml").read_text())
    cfg["tasks"] = {n: str((cfg_dir / p).resolve()) for n, p in cfg["tasks"].items()}
    cfg["adapter_dirs"] = [str((cfg_dir / p).resolve()) for p in cfg["adapter_dirs"]]
    return cfg | {"cache_dir": str(cache), "state_dir": str(state), "speculate": speculate}


def admin(url: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"{url}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


async def one(client, model: str, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(TTFT, latency, output tokens) of one streamed request."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": PROMPT.format(a=10 + i, b=47 + 3 * i)}],
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft, time.perf_counter() - t0, tokens


async def scenario(client, models: list[str], concurrency: int, max_tokens: int) -> list[tuple]:
    """Send len(models) requests (request i asks for models[i]) with at most `concurrency` in flight;
    returns (wall, [(ttft, latency, tokens)])."""
    gate = asyncio.Semaphore(concurrency)

    async def limited(i, m):
        async with gate:
            return await one(client, m, i, max_tokens)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(limited(i, m) for i, m in enumerate(models)))
    return time.perf_counter() - t0, results


def summary(runs: list) -> dict:
    """Pool the rounds of one scenario: output tok/s over its wall time, TTFT and per-request decode rate."""
    wall = sum(w for w, _ in runs)
    res = [r for _, rs in runs for r in rs]
    ttfts = sorted(r[0] for r in res)
    decode = statistics.median((r[2] - 1) / (r[1] - r[0]) for r in res)
    return {
        "requests": len(res),
        "tok_s": sum(r[2] for r in res) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_max": ttfts[-1],
        "decode": decode,
    }


def row(label: str, r: dict, ref: dict) -> str:
    return (
        f"| {label} | {r['requests']} | {r['tok_s']:.2f} | {r['tok_s'] / ref['tok_s']:.2f} | "
        f"{r['ttft_p50']:.2f} | {r['ttft_p50'] / ref['ttft_p50']:.2f} | {r['ttft_max']:.2f} | {r['decode']:.2f} |"
    )


async def run(url: str, base: str, args) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900)
    tasks = [
        "add",
        "sentiment",
        "reverse_words",
        "to_digits",
        "sort_numbers",
        "max_number",
        "last_word",
        "pick_category",
    ]
    merge, pinned = "tasks:add+sentiment", "tasks:add+max_number@knots-ties"
    pairs = [f"tasks:{a}+{b}" for a, b in itertools.combinations(tasks, 2)]
    n, c, t = args.requests, args.concurrency, args.max_tokens
    for m in (base, "add", merge):  # warm: engine paths, the LoRA loaded, the merge composed and loaded
        await scenario(client, [m] * 2, 2, t)
    runs = {k: [] for k in ("base", "lora", "cached", "cold", "subsets", "pinned")}
    pin_s = []
    for rnd in range(args.rounds):  # scenarios interleaved round by round: the machine's noise hits each alike
        runs["base"].append(await scenario(client, [base] * n, c, t))
        runs["lora"].append(await scenario(client, ["add"] * n, c, t))
        runs["cached"].append(await scenario(client, [merge] * n, c, t))
        # never seen: a distinct top_k per request makes every request a new merge (compose + write + load)
        runs["cold"].append(
            await scenario(
                client, [f"{merge}@knots-ties?top_k={0.1 + 0.01 * (rnd * n + i):.2f}" for i in range(n)], c, t
            )
        )
        runs["subsets"].append(await scenario(client, pairs[rnd * n : (rnd + 1) * n], c, t))
        t0 = time.perf_counter()
        admin(url, "POST", "/admin/pin", {"model": pinned})
        pin_s.append(time.perf_counter() - t0)
        await scenario(client, [pinned] * 2, 2, t)
        runs["pinned"].append(await scenario(client, [pinned] * n, c, t))
        admin(url, "DELETE", "/admin/pin")
    res = {k: summary(v) for k, v in runs.items()}
    ref = res["lora"]
    print(
        f"\n# {args.rounds} rounds × {n} requests a scenario, {c} in flight, {t} output tokens each (ignore_eos), "
        f"streaming; max_loras {args.max_loras}; pin (POST /admin/pin, wall) {statistics.median(pin_s):.2f} s median"
    )
    print(
        "| scenario | requests | output tok/s | vs one LoRA | TTFT p50 (s) | vs one LoRA | TTFT max (s) | "
        "decode tok/s per request (p50) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    labels = {
        "base": "base model",
        "lora": "one original LoRA (`add`)",
        "cached": f"cached merge `{merge}`",
        "cold": "never-seen merge per request (compose + load)",
        "pinned": f"pinned merge `{pinned}`",
        "subsets": f"a different subset per request, {args.max_loras} LoRA slots",
    }
    for key in ("base", "lora", "cached", "cold", "pinned", "subsets"):
        print(row(labels[key], res[key], ref))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="requests per scenario and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; --requests × --rounds ≤ 28 (distinct subsets)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=4, help="LoRA slots of the server (configs/default.yaml: 4)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="knots-serve-bench-") as tmp:
        root = Path(tmp)
        cfg = server_config(root / "cache", root / "state") | {"max_loras": args.max_loras}
        t0 = time.perf_counter()
        with start_server(root, cfg, {"KNOTS_ADMIN_KEY": KEY}, timeout=900) as srv:
            print(f"# server up in {time.perf_counter() - t0:.0f} s", flush=True)
            asyncio.run(run(srv.url, cfg["served_model_name"], args))


if __name__ == "__main__":
    main()
