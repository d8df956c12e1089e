"""A large task pool under skewed traffic, against the same requests served as pre-merged plain LoRAs.

    .venv/bin/python benchmarks/pool_traffic.py --pools 32,128 --rate 1.0 --duration 150 --restart 60

Per pool size P (the 8 demo adapters plus P − 8 generated ones: perturbed copies, for speed only):
- traffic: requests at a fixed Poisson rate (--rate, fixed seed), each for a 2–4-task subset drawn from a
  Zipf law over all such subsets (s = --zipf; subset rank k → a seeded subset), streamed through the
  `openai` client, greedy, `ignore_eos`, --max-tokens each;
- knots-serve: `tasks:A+B+…` (the default method, knots-ties, `basis: auto`) on configs/default.yaml with
  this pool, same LoRA slots; then restarted on the same store (its traffic counts: prewarm) and driven
  --restart more seconds of the same traffic;
- the reference: every subset the trace asks for merged offline (the same merge, the server's compose path)
  and served by vLLM multi-LoRA (its filesystem LoRA resolver) on the same engine: `knots-serve serve` with
  an empty pool, so the same flags, LoRA slots and CPU LoRA-op fix, and no merge layer in the way.
Measured after --warmup seconds (steady state): output tokens/s, TTFT p50/p99, knots' merge hit rate (its
cache's hits over lookups), compose queue depth (max sampled), LoRA loads (vLLM's "loaded LoRA" log lines),
the server process tree's peak RSS. Writes benchmarks/results/pool_traffic.json (a pool size run again
replaces its entry) and pool_traffic_P.png per pool size; with --dump DIR, every request of every phase too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import serve_load  # noqa: E402
from serve_load import server_config  # noqa: E402
from server_process import start_server  # noqa: E402

from knots_serve.adapters import load_adapter, save_adapter  # noqa: E402
from knots_serve.serving.merges.basis_store import BasisStore  # noqa: E402
from knots_serve.serving.merges.names import parse_model  # noqa: E402
from knots_serve.serving.server.config import load_config  # noqa: E402

KEY = "bench-key"
STAGES = ("plan", "compose", "write")
DEMO = ["add", "sentiment", "reverse_words", "to_digits", "sort_numbers", "max_number", "last_word", "pick_category"]


def make_pool(root: Path, size: int) -> dict[str, str]:
    """The 8 demo adapters and size − 8 perturbed copies of them, as PEFT adapter dirs."""
    pool = {n: str(ROOT / "adapters" / n) for n in DEMO}
    g = torch.Generator().manual_seed(size)
    for j in range(size - len(DEMO)):
        src = load_adapter(pool[DEMO[j % len(DEMO)]])
        modules = {
            m: (
                lora.scale * lora.B * (0.5 + torch.rand(1, generator=g)),
                lora.A + 0.01 * torch.randn(lora.A.shape, generator=g),
            )
            for m, lora in src.modules.items()
        }
        out = root / "pool" / f"gen{j:03d}"
        save_adapter(modules, out, src.base_model)
        pool[out.name] = str(out)
    return pool


def subset_count(tasks: int) -> int:
    return sum(math.comb(tasks, k) for k in (2, 3, 4))


def trace(tasks: list[str], rate: float, seconds: float, zipf: float, seed: int) -> list[tuple[float, tuple]]:
    """(send time, subset) per request: Poisson arrivals; subset rank ~ Zipf(s) over all 2–4-task subsets."""
    rng, n = np.random.default_rng(seed), subset_count(len(tasks))
    out, t = [], 0.0
    while True:
        t += rng.exponential(1 / rate)
        if t >= seconds:
            return out
        rank = int(rng.zipf(zipf))
        while rank > n:
            rank = int(rng.zipf(zipf))
        pick = random.Random(f"{seed // 1000}:{rank}")  # the subset of a rank: the same in every phase
        out.append((t, tuple(sorted(pick.sample(tasks, pick.choice((2, 3, 4)))))))


async def one(client, model: str, i: int, max_tokens: int) -> tuple[float | None, float, int]:
    """serve_load's streamed request; an error is a result (TTFT None), counted, never retried."""
    t0 = time.perf_counter()
    try:
        return await serve_load.one(client, model, i, max_tokens)
    except Exception as e:
        print(f"  request {i} ({model}): {type(e).__name__}: {e}", flush=True)
        return None, time.perf_counter() - t0, 0


async def drive(url: str, requests: list[tuple[float, str]], max_tokens: int) -> list[dict]:
    """Send each request at its time (open loop); the results with their send times."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()

    async def at(i, when, model):
        await asyncio.sleep(max(0.0, when - (time.perf_counter() - t0)))
        ttft, latency, tokens = await one(client, model, i, max_tokens)
        return {"sent": when, "model": model, "ttft": ttft, "latency": latency, "tokens": tokens}

    results = await asyncio.gather(*(at(i, w, m) for i, (w, m) in enumerate(requests)))
    wall = time.perf_counter() - t0
    await client.close()
    seen = set()
    for r in results:  # in send order: was this the first request for its model?
        r["first"], r["wall"] = r["model"] not in seen, wall
        seen.add(r["model"])
    return results


class Sampler:
    """Peak RSS of a process tree and the max of a /metrics gauge, sampled every second in a thread."""

    def __init__(self, pid: int, url: str | None):
        self.pid, self.url, self.rss, self.queue = pid, url, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(1.0):
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                self.rss = max(self.rss, sum(p.memory_info().rss for p in procs if p.is_running()))
            if self.url:
                self.queue = max(self.queue, metric(self.url, "knots_compose_queue_depth"))

    def stop(self):
        self._stop.set()
        self._thread.join()


def metric(url: str, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    pat = re.compile(rf"^{re.escape(name)}(\{{[^}}]*{re.escape(labels)}[^}}]*\}})? ([0-9.e+-]+)$", re.M)
    return sum(float(v) for _, v in pat.findall(text))


def cache_counts(url: str) -> dict[str, float]:
    return {k: metric(url, "knots_compose_cache_total", f'result="{k}"') for k in ("hit", "miss", "wait", "linked")}


def lora_loads(log: Path) -> int:
    return log.read_text(errors="replace").count("loaded LoRA adapter") if log.exists() else 0


def stats(results: list[dict], warmup: float, ref: dict | None = None) -> dict:
    steady = [r for r in results if r["sent"] >= warmup]
    ok = [r for r in steady if r["ttft"] is not None]
    wall = results[0]["wall"] - warmup if results else 1.0
    ttfts = np.array([r["ttft"] for r in ok]) if ok else np.array([float("nan")])
    out = {
        "requests": len(steady),
        "errors": len(steady) - len(ok),
        "throughput_tok_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_s": float(np.percentile(ttfts, 50)),
        "ttft_p99_s": float(np.percentile(ttfts, 99)),
    }
    for kind, first in (("first_request", True), ("repeat", False)):  # a subset's first request, and the rest
        picked = [r["ttft"] for r in ok if r["first"] == first]
        out[f"ttft_p50_{kind}_s"] = float(np.percentile(picked, 50)) if picked else float("nan")
    if ref:
        out |= {
            "throughput_ratio": out["throughput_tok_s"] / ref["throughput_tok_s"],
            "ttft_p50_ratio": out["ttft_p50_s"] / ref["ttft_p50_s"],
            "ttft_p99_ratio": out["ttft_p99_s"] / ref["ttft_p99_s"],
        }
    return out


def knots_phase(root: Path, cfg: dict, requests, args, label: str) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    with start_server(root, cfg, {"KNOTS_ADMIN_KEY": KEY}, timeout=1800) as srv:
        print(f"# {label}: knots-serve up in {time.perf_counter() - t0:.0f} s", flush=True)
        before, sampler = cache_counts(srv.url), Sampler(srv.pid, srv.url)
        results = asyncio.run(drive(srv.url, requests, args.max_tokens))
        sampler.stop()
        after = cache_counts(srv.url)
        stage = {k: metric(srv.url, "knots_new_merge_stage_seconds_sum", f'stage="{k}"') for k in STAGES}
        composed = metric(srv.url, "knots_new_merge_stage_seconds_count", 'stage="compose"')
        lookups = {k: after[k] - before[k] for k in after}
        seen = sum(lookups.values())
        info = {
            "start_s": time.perf_counter() - t0 - results[0]["wall"],
            "hit_rate": (lookups["hit"] / seen) if seen else float("nan"),
            "cache_lookups": lookups,
            "compose_queue_max": sampler.queue,
            "new_merge_stage_mean_s": {k: v / max(composed, 1) for k, v in stage.items()},
            "lora_loads": lora_loads(srv.log),
            "max_rss_bytes": sampler.rss,
        }
    return results, info


def reference_config(root: Path, cfg: dict):
    """The reference server's config: knots-serve's own with no tasks, merges or experiments — the same engine,
    flags and LoRA slots (and the CPU LoRA-op fix the plugin applies to any LoRA), nothing to merge."""
    ref = cfg | {"tasks": {}, "merges": {}, "experiments": {}, "prewarm": 0, "state_dir": str(root / "ref-state")}
    config_path = root / "ref.yaml"
    config_path.write_text(json.dumps(ref))
    return ref, load_config(config_path)


def reference_phase(root: Path, ref: dict, premerged: Path, requests, args) -> tuple[list[dict], dict]:
    """Pre-merged adapters served by vLLM multi-LoRA: each subset's adapter found by vLLM's own filesystem LoRA
    resolver, on the same engine as knots-serve (`knots-serve serve` with an empty pool)."""
    env = {"VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(premerged)}
    (root / "ref").mkdir()
    t0 = time.perf_counter()
    with start_server(root / "ref", ref, env, timeout=1800) as srv:
        print(f"# reference: up in {time.perf_counter() - t0:.0f} s", flush=True)
        sampler = Sampler(srv.pid, None)
        results = asyncio.run(drive(srv.url, requests, args.max_tokens))
        sampler.stop()
        info = {"lora_loads": lora_loads(srv.log), "max_rss_bytes": sampler.rss}
    return results, info


def first_seen(requests, warmup: float) -> float:
    seen, first, steady = set(), 0, 0
    for t, subset in requests:
        if t >= warmup:
            steady += 1
            first += subset not in seen
        seen.add(subset)
    return first / max(steady, 1)


def as_merges(requests) -> list[tuple[float, str]]:
    return [(t, f"tasks:{'+'.join(s)}") for t, s in requests]


def premerge(pool: dict[str, str], subsets: set[tuple], out: Path, base_model: str) -> dict[tuple, str]:
    """Each subset merged as the server would (knots-ties, basis auto) and saved as a plain adapter whose
    base_model_name_or_path is the model vLLM serves (what its filesystem resolver checks)."""
    store = BasisStore({n: load_adapter(p, n) for n, p in pool.items()}, "cpu")
    names = {}
    t0 = time.perf_counter()
    for i, s in enumerate(sorted(subsets)):
        name = f"m{i:05d}"
        save_adapter(store.merge(parse_model(f"tasks:{'+'.join(s)}", "knots-ties")), out / name, base_model)
        names[s] = name
    print(f"# reference: {len(subsets)} subsets pre-merged offline in {time.perf_counter() - t0:.0f} s", flush=True)
    return names


def plot(pool: int, phases: dict, path: Path) -> None:
    """TTFT over time, one point per request: knots-serve, the pre-merged reference, knots-serve restarted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, results in phases.items():
        pts = [(r["sent"], r["ttft"]) for r in results if r["ttft"] is not None]
        ax.scatter(*zip(*pts), s=10, label=label, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("request sent at (s)")
    ax.set_ylabel("TTFT (s)")
    ax.set_title(f"pool of {pool} adapters: Zipf traffic over 2-4-task subsets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", default="32,128")
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    ap.add_argument("--duration", type=float, default=150, help="seconds of traffic per phase")
    ap.add_argument("--warmup", type=float, default=30, help="seconds not counted (the steady state after)")
    ap.add_argument("--restart", type=float, default=60, help="seconds of traffic after the restart")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--dump", type=Path, help="also write every request (phase, send time, model, TTFT) here")
    args = ap.parse_args()
    meta = vars(args) | {
        "out": str(args.out),
        "dump": args.dump and str(args.dump),
        "machine": os.uname().machine,
        "cpus": os.cpu_count(),
    }
    meta["date"] = time.strftime("%Y-%m-%d")
    path = args.out / "pool_traffic.json"  # pool sizes of earlier runs are kept; this run's replace theirs
    report = json.loads(path.read_text()) if path.exists() else {}
    shared = report.pop("meta", None)  # (older files: one meta for all their pool sizes)
    for entry in report.values():
        entry.setdefault("meta", shared)
    for P in (int(p) for p in args.pools.split(",")):
        with tempfile.TemporaryDirectory(prefix="knots-pool-", dir="/dev/shm") as tmp:
            root = Path(tmp)
            pool = make_pool(root, P)
            tasks = sorted(pool)
            steady = trace(tasks, args.rate, args.duration, args.zipf, args.seed * 1000)
            after = trace(tasks, args.rate, args.restart, args.zipf, args.seed * 1000 + 1)
            distinct = {s for _, s in steady}
            print(
                f"# pool {P}: {subset_count(P)} subsets; {len(steady)} requests over {len(distinct)} subsets",
                flush=True,
            )
            cfg = server_config(root / "cache", root / "state") | {
                "tasks": pool,
                "adapter_dirs": [str(ROOT / "adapters"), str(root / "pool")],
                "basis_file": str(root / "state" / "basis.safetensors"),
                # the trace stands for many clients: no per-client bound on new merges (new_merge_rate)
                "new_merge_rate": 1e6,
                "new_merge_burst": 1_000_000,
            }
            (root / "knots").mkdir()
            k_results, k_info = knots_phase(root / "knots", cfg, as_merges(steady), args, "steady")
            r_results, r_info = knots_phase(root / "knots", cfg, as_merges(after), args, "restart")
            ref_cfg, loaded = reference_config(root, cfg)
            names = premerge(pool, distinct, root / "premerged", str(loaded.model))
            premerged = [(t, names[s]) for t, s in steady]
            ref_results, ref_info = reference_phase(root, ref_cfg, root / "premerged", premerged, args)
            ref = stats(ref_results, args.warmup) | ref_info
            ours = stats(k_results, args.warmup, ref) | k_info
            restarted = stats(r_results, 0.0)
            report[str(P)] = {
                "hit_rate": ours["hit_rate"],
                "throughput_ratio": ours["throughput_ratio"],
                "ttft_p50_ratio": ours["ttft_p50_ratio"],
                "ttft_p99_ratio": ours["ttft_p99_ratio"],
                "restart_p99_ratio": restarted["ttft_p99_s"] / ref["ttft_p99_s"],
                "max_rss_bytes": ours["max_rss_bytes"],
                "meta": meta,
                "requests": len(steady),
                "distinct_subsets": len(distinct),
                # steady requests whose subset no earlier request named: misses no cache avoids (hit rate ≤ 1 − this)
                "compulsory_miss_share": first_seen(steady, args.warmup),
                "knots": ours,
                "knots_restart": restarted | r_info,
                "reference": ref,
            }
            print(json.dumps(report[str(P)], indent=1, default=float), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1, default=float))
            phases = {"knots-serve": k_results, "pre-merged (vLLM)": ref_results, "knots-serve, restarted": r_results}
            plot(P, phases, args.out / f"pool_traffic_{P}.png")
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / f"pool_traffic_{P}_requests.json").write_text(json.dumps(phases))


if __name__ == "__main__":
    main()
