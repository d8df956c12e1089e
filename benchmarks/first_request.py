"""The first request for a never-seen merge vs the same request once the merge is cached (real server).

    .venv/bin/python benchmarks/first_request.py [--single 6] [--burst 8] [--max-tokens 16]

`knots-serve serve` with configs/default.yaml (SmolLM2-135M-Instruct + the 8 demo adapters; its own port,
cache and state), driven by the async `openai` client, greedy, `ignore_eos` (every request generates exactly
--max-tokens tokens), non-streaming latency at the client. Every merge is a 2-task `tasks:A+B` (the default
method, knots-ties) of a pair no earlier request named, so its first request composes it (basis, merge,
write) and vLLM loads it; the second request for it is served from the cache.

- single client: --single pairs one after another, each asked twice: first / again;
- burst: --burst other pairs at once (all never seen), then the same --burst at once again.
Reported: medians and the ratio first / cached (the issue-12 targets: ≤ 1.5 single, ≤ 2 burst), what the
server's /metrics says the composes took, and the same single-client merges composed again in this process
once the server is down (`BasisStore.merge`, each subset basis dropped first: never seen) — the server's
compose stage against the standalone compose of the same merges, in one run. Speculative compose is off.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_load import ROOT, one, scenario, server_config, start_server, tmpfs_dir

TASKS = ["add", "sentiment", "reverse_words", "to_digits", "sort_numbers", "max_number", "last_word", "pick_category"]
WARM = "tasks:last_word+pick_category"  # the last pair: --single + --burst <= 27 never reach it


def stages(url: str) -> dict[str, float]:
    """Seconds spent so far in each stage of new merges on the server (knots_new_merge_stage_seconds)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=60).read().decode()
    found = re.findall(r'^knots_new_merge_stage_seconds_sum\{stage="(\w+)"\} (\S+)', text, re.M)
    return {stage: float(v) for stage, v in found}


def compose_seconds(url: str) -> tuple[float, int]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=60).read().decode()
    total = float(re.search(r"^knots_compose_seconds_sum (\S+)", text, re.M).group(1))
    count = int(float(re.search(r"^knots_compose_seconds_count (\S+)", text, re.M).group(1)))
    return total, count


def standalone(models: list[str]) -> float:
    """Mean seconds of `BasisStore.merge` for these merges in this process, each never seen (its subset basis
    dropped first), after the warm-up merge the server composed first."""
    from knots_serve.adapters import load_adapter
    from knots_serve.serving.merges.basis_store import BasisStore
    from knots_serve.serving.merges.names import parse_model

    store = BasisStore({n: load_adapter(ROOT / "adapters" / n, n) for n in TASKS}, "cpu")
    store.merge(parse_model(WARM, "knots-ties"))
    times = []
    for m in models:
        store.clear_subsets()
        t0 = time.perf_counter()
        store.merge(parse_model(m, "knots-ties"))
        times.append(time.perf_counter() - t0)
    return statistics.mean(times)


async def run(url: str, args) -> tuple[list[str], float]:
    """Drive the server; returns the single client's merges and the server's mean compose stage for them."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900)
    pairs = [f"tasks:{a}+{b}" for a, b in itertools.combinations(TASKS, 2)]
    single, burst = pairs[: args.single], pairs[args.single : args.single + args.burst]
    t = args.max_tokens
    await scenario(client, ["add", "sentiment"], 2, t)  # warm: engine paths, LoRA code paths
    await one(client, WARM, 0, t)  # and a first compose, of a pair no scenario below asks for
    c0, s0 = compose_seconds(url), stages(url)
    first, again = [], []
    for i, m in enumerate(single):
        first.append((await one(client, m, i, t))[1])
        again.append((await one(client, m, i, t))[1])
    c1, s1 = compose_seconds(url), stages(url)
    wall_first, res_first = await scenario(client, burst, len(burst), t)
    wall_again, res_again = await scenario(client, burst, len(burst), t)
    c2 = compose_seconds(url)
    med = statistics.median
    print(
        f"\n# SmolLM2-135M-Instruct + 8 demo adapters, configs/default.yaml; 2-task knots-ties merges of pairs "
        f"never asked before; {t} output tokens per request; latency at the client (s)"
    )
    print("| scenario | merges | first request (s) | cached (s) | first / cached | compose, server (s, mean) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| single client, one after another (median latency) | {len(single)} | {med(first):.2f} | {med(again):.2f} | "
        f"**{med(first) / med(again):.2f}** | {(c1[0] - c0[0]) / max(c1[1] - c0[1], 1):.3f} |"
    )
    lat_f, lat_a = med(r[1] for r in res_first), med(r[1] for r in res_again)
    print(
        f"| {len(burst)} at once (wall of the burst) | {len(burst)} | {wall_first:.2f} | {wall_again:.2f} | "
        f"**{wall_first / wall_again:.2f}** | {(c2[0] - c1[0]) / max(c2[1] - c1[1], 1):.3f} |"
    )
    print(
        f"| {len(burst)} at once (median latency) | {len(burst)} | {lat_f:.2f} | {lat_a:.2f} | {lat_f / lat_a:.2f} | |"
    )
    extra = med(f - a for f, a in zip(first, again))
    per = {k: (s1.get(k, 0.0) - s0.get(k, 0.0)) / len(single) for k in ("plan", "compose", "write")}
    print(
        f"\nwhere a first request's extra {extra:.3f} s goes (single client, per merge, mean): "
        + ", ".join(f"{k} {v:.3f} s" for k, v in per.items())
        + f"; the rest, vLLM loading the adapter and its first step with it: {extra - sum(per.values()):.3f} s"
    )
    print(
        "\nper pair, single client (first, cached): "
        + ", ".join(f"{m.removeprefix('tasks:')} {f:.2f}/{a:.2f}" for m, f, a in zip(single, first, again))
    )
    return single, per["compose"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--single", type=int, default=6, help="pairs asked one after another by one client")
    ap.add_argument("--burst", type=int, default=8, help="pairs asked all at once (--single + --burst <= 27)")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="knots-serve-bench-") as tmp, tmpfs_dir() as cache:
        root = Path(tmp)
        cfg = server_config(Path(cache), root / "state")  # the merge cache on tmpfs, as configs/default.yaml has it
        t0 = time.perf_counter()
        with start_server(root, cfg, {"KNOTS_ADMIN_KEY": "bench-key"}, timeout=900) as srv:
            print(f"# server up in {time.perf_counter() - t0:.0f} s", flush=True)
            single, in_server = asyncio.run(run(srv.url, args))
    alone = standalone(single)
    print(
        f"\ncompose of the single client's {len(single)} merges (mean): in the server {in_server:.3f} s, standalone "
        f"(this process, the server down) {alone:.3f} s: **{in_server / alone:.2f}×** (target ≤ 1.2)"
    )


if __name__ == "__main__":
    main()
