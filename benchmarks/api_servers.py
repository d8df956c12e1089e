"""Several API server processes against one, on the real server (SmolLM2-135M-Instruct + the 8 demo adapters).

    .venv/bin/python benchmarks/api_servers.py [--servers 1,2] [--merges 6] [--requests 16] [--concurrency 8]

For each API server count, `knots-serve serve` with configs/default.yaml plus `--api-server-count N` (its own
port, merge cache and state), then, through kept-alive connections that each reach one process:

- register: POST /admin/tasks of a copy of a demo adapter, until it returns (with N > 1: until every process
  serves it, group.py), and DELETE of it;
- new merge: the first request for a never-seen 3-task knots-ties merge on the process that composes it and,
  with N > 1, right after on the other one (which links the files instead of composing: adapter_cache.py);
- pin: POST /admin/pin (compose, prepare in the worker, drain every process, write) and DELETE;
- load: a cached merge under `--concurrency` streamed requests (benchmarks/serve_load.py's client), new
  connections spread over the processes by the kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve_load import KEY, scenario, server_config, summary
from server_process import start_server

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sentiment", "last_word", "reverse_words", "add", "max_number", "sort_numbers", "to_digits", "pick_category"]


@contextlib.contextmanager
def connections(url: str, count: int):
    """{API server index: a client with one kept-alive connection to that process}."""
    got: dict[int, httpx.Client] = {}
    try:
        while len(got) < count:
            c = httpx.Client(
                base_url=url,
                headers={"authorization": f"Bearer {KEY}"},
                limits=httpx.Limits(max_connections=1),
                timeout=600,
            )
            index = c.get("/admin/store").json()["api_server"]["index"]
            if index in got:
                c.close()
            else:
                got[index] = c
        yield got
    finally:
        for c in got.values():
            c.close()


def timed(fn, *args, **kw) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    r = fn(*args, **kw)
    assert r.status_code < 300, r.text
    return time.perf_counter() - t0, r


def chat(client, model: str) -> tuple[float, httpx.Response]:
    body = {"model": model, "messages": [{"role": "user", "content": "1 + 2"}], "max_tokens": 4, "temperature": 0}
    return timed(client.post, "/v1/chat/completions", json=body)


def measure(url: str, count: int, extra: Path, args) -> dict:
    out: dict = {"api_servers": count}
    with connections(url, count) as c:
        shutil.copytree(ROOT / "adapters" / "sentiment", extra / "sentiment2")
        out["register_s"], _ = timed(
            c[0].post, "/admin/tasks", json={"name": "sentiment2", "path": str(extra / "sentiment2")}
        )
        out["unregister_s"], _ = timed(c[count - 1].delete, "/admin/tasks/sentiment2")
        composed, linked = [], []
        for k in range(args.merges):
            merge = f"tasks:{TASKS[k % 8]}+{TASKS[(k + 1) % 8]}+{TASKS[(k + 3) % 8]}@knots-ties?top_k=0.{k + 2}"
            composed.append(chat(c[k % count], merge)[0])
            if count > 1:
                linked.append(chat(c[(k + 1) % count], merge)[0])
        out["new_merge_composed_s"] = statistics.median(composed)
        out["new_merge_linked_s"] = statistics.median(linked) if linked else None
        out["pin_s"], r = timed(c[count - 1].post, "/admin/pin", json={"model": "tasks:sentiment+add@knots-ties"})
        out["pin"] = {k: v for k, v in r.json()["pinned"].items() if k.endswith("_s")}
        out["unpin_s"], _ = timed(c[0].delete, "/admin/pin")
        cached = "tasks:sentiment+add@knots-ties"
        chat(c[0], cached)
    from openai import AsyncOpenAI

    async def load():
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        await scenario(client, [cached] * 2, 2, 4)  # warm
        return [await scenario(client, [cached] * args.requests, args.concurrency, args.max_tokens)]

    out["load"] = summary(asyncio.run(load()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="1,2", help="API server counts to compare")
    ap.add_argument("--merges", type=int, default=6, help="new merges timed per count")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = ap.parse_args()
    results = []
    for count in map(int, args.servers.split(",")):
        with tempfile.TemporaryDirectory(prefix="knots-bench-") as tmp:
            tmp = Path(tmp)
            cfg = server_config(tmp / "cache", tmp / "state")
            cfg["vllm_args"] = [*cfg["vllm_args"], "--api-server-count", str(count)]
            cfg["adapter_dirs"] = [*cfg["adapter_dirs"], str(tmp / "extra")]
            cfg["admin_key_env"] = "KNOTS_BENCH_ADMIN_KEY"
            with start_server(tmp, cfg, {"KNOTS_BENCH_ADMIN_KEY": KEY}, timeout=900) as server:
                results.append(measure(server.url, count, tmp / "extra", args))
        print(json.dumps(results[-1]), file=sys.stderr)
    one = results[0]
    date, ref = time.strftime("%Y-%m-%d"), one["api_servers"]
    print(f"\n# {date}, configs/default.yaml + --api-server-count N (ratios: to N={ref})")
    print(
        "| N | register s | unregister s | new merge: composing process s | the other process s | "
        "pin s (drain, swap) | cached merge tok/s | TTFT p50 s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        linked = f"{r['new_merge_linked_s']:.2f}" if r["new_merge_linked_s"] is not None else "–"
        pin = f"{r['pin_s']:.2f} ({r['pin']['drain_s']:.3f}, {r['pin']['swap_s']:.3f})"
        load = r["load"]
        print(
            f"| {r['api_servers']} | {r['register_s']:.2f} | {r['unregister_s']:.2f} | "
            f"{r['new_merge_composed_s']:.2f} | "
            f"{linked} | {pin} | {load['tok_s']:.1f} ({load['tok_s'] / one['load']['tok_s']:.2f}×) | "
            f"{load['ttft_p50']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
