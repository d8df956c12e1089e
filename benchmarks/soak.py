"""Soak: many concurrent OpenAI clients for minutes, each asking for random merges (more distinct merges than
LoRA slots and than the compose cache holds), while a side loop registers/unregisters a task and
pins/unpins a merge. Every greedy answer is checked against the same model's answer computed alone, when
the server was idle (with the base weights, or with the merge pinned: a response may come from either).

    .venv/bin/python benchmarks/soak.py --config configs/default.yaml --minutes 5      # starts the server
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --pid PID ...     # a running one

Prints a table: requests, failures, mismatches, latency p50/p99, peak RSS of the server's process tree,
peak bytes of the compose cache, distinct merges served. Needs KNOTS_ADMIN_KEY (or --admin-key-env) for
the side loop and the cache gauge; --api-key if the server wants one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from openai import AsyncOpenAI

METHODS = (
    "knots-ta",
    "knots-ties?top_k=0.2",
    "knots-ties?top_k=0.5",
    "knots-ties?top_k=0.8",
    "core-ties",
    "knots-dare-ties?density=0.7&seed=1",
)


def merge_models(tasks: list[str], limit: int = 40) -> list[str]:
    """Merges of 2 and 3 tasks, each in its own subset basis, so that a task registered or unregistered
    meanwhile (which changes the shared basis) changes none of them."""
    subsets = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]] + [tuple(tasks[:3])]
    models = []
    for method in METHODS:
        for s in subsets:
            sep = "&" if "?" in method else "?"
            models.append(f"tasks:{'+'.join(s)}@{method}{sep}basis=subset")
    return models[:limit]


class Soak:
    def __init__(
        self,
        url: str,
        models: list[str],
        prompts: list[str],
        api_key: str = "none",
        admin_key: str | None = None,
        pid: int | None = None,
        max_tokens: int = 8,
    ):
        self.url, self.models, self.prompts, self.max_tokens = url, models, prompts, max_tokens
        self.client = AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=300)
        self.admin = httpx.AsyncClient(
            base_url=url, timeout=300, headers={"x-admin-key": admin_key or "", "authorization": f"Bearer {api_key}"}
        )
        self.pid = pid
        self.expected: dict[tuple[str, str], set[str]] = {}
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.served: set[str] = set()
        self.peak_rss = self.peak_cache = 0
        self.side = {"pins": 0, "registrations": 0}

    async def ask(self, model: str, prompt: str, stream: bool = False) -> tuple[str, str]:
        kw = dict(model=model, prompt=prompt, max_tokens=self.max_tokens, temperature=0)
        if not stream:
            r = await self.client.completions.create(**kw)
            return r.choices[0].text, r.model
        text, served = "", model
        async for chunk in await self.client.completions.create(**kw, stream=True):
            text += "".join(c.text for c in chunk.choices)
            served = chunk.model
        return text, served

    async def references(self, pin: str | None) -> None:
        """Each model's answer to each prompt, alone on an idle server (and again with `pin` pinned)."""
        for state in (None, pin) if pin else (None,):
            if state:
                await self.admin_call("POST", "/admin/pin", {"model": state})
            for m in self.models:
                for p in self.prompts:
                    self.expected.setdefault((m, p), set()).add((await self.ask(m, p))[0])
            if state:
                await self.admin_call("DELETE", "/admin/pin")

    async def admin_call(self, method: str, path: str, body=None):
        r = await self.admin.request(method, path, json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    async def client_loop(self, rng: random.Random, until: float) -> None:
        while time.monotonic() < until:
            model, prompt = rng.choice(self.models), rng.choice(self.prompts)
            t0 = time.perf_counter()
            try:
                text, served = await self.ask(model, prompt, stream=rng.random() < 0.3)
            except Exception as e:  # every failure is a finding
                self.failures.append(f"{model}: {type(e).__name__}: {e}")
                continue
            self.latencies.append(time.perf_counter() - t0)
            self.served.add(served)
            if text not in self.expected[(model, prompt)]:
                self.failures.append(f"{model} {prompt!r}: {text!r} not in {self.expected[(model, prompt)]}")

    async def side_loop(self, until: float, pin: str | None, task: tuple[str, Path] | None, check: str) -> None:
        """Pin/unpin `pin` and register/unregister `task` (a copy of the adapter behind `check`) in turns."""
        while time.monotonic() < until:
            try:
                if pin:
                    await self.admin_call("POST", "/admin/pin", {"model": pin})
                    await asyncio.sleep(1)
                    await self.admin_call("DELETE", "/admin/pin")
                    self.side["pins"] += 1
                if task:
                    await self.admin_call("POST", "/admin/tasks", {"name": task[0], "path": str(task[1])})
                    text, _ = await self.ask(f"tasks:{task[0]}", self.prompts[0])
                    if text not in self.expected[(check, self.prompts[0])]:
                        self.failures.append(f"registered {task[0]}: {text!r} differs from {check}")
                    await self.admin_call("DELETE", f"/admin/tasks/{task[0]}")
                    self.side["registrations"] += 1
            except Exception as e:
                self.failures.append(f"side loop: {type(e).__name__}: {e}")
            await asyncio.sleep(1)

    async def sample(self, until: float) -> None:
        while time.monotonic() < until:
            if self.pid:
                procs = [psutil.Process(self.pid)] + psutil.Process(self.pid).children(recursive=True)
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in procs if p.is_running()))
            try:
                self.peak_cache = max(self.peak_cache, (await self.admin_call("GET", "/admin/merges"))["cache_bytes"])
            except Exception:  # no admin key: no cache gauge
                pass
            await asyncio.sleep(0.5)

    async def run(
        self, seconds: float, clients: int, pin: str | None = None, task=None, check: str = "", seed: int = 0
    ) -> dict:
        await self.references(pin)
        until = time.monotonic() + seconds
        rngs = [random.Random(seed * 1000 + i) for i in range(clients)]
        t0 = time.perf_counter()
        await asyncio.gather(
            self.sample(until), self.side_loop(until, pin, task, check), *(self.client_loop(r, until) for r in rngs)
        )
        wall = time.perf_counter() - t0
        lat = sorted(self.latencies) or [float("nan")]
        return {
            "seconds": round(wall, 1),
            "clients": clients,
            "requests": len(self.latencies) + len(self.failures),
            "failures": len(self.failures),
            "req_per_s": round(len(self.latencies) / wall, 2),
            "p50_s": round(lat[len(lat) // 2], 3),
            "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3),
            "peak_rss_mib": self.peak_rss >> 20,
            "peak_cache_kib": self.peak_cache >> 10,
            "distinct_models": len(self.served),
            "pins": self.side["pins"],
            "registrations": self.side["registrations"],
            "first_failures": self.failures[:5],
        }


def table(stats: dict) -> str:
    return "\n".join(f"{k:<16} {v}" for k, v in stats.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="start `knots-serve serve --config CONFIG` (else --url)")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--pid", type=int, help="the server's pid, for the RSS of its process tree")
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tasks", help="comma-separated task names to merge (default: the first 4 the server lists)")
    ap.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY", "none"))
    ap.add_argument("--admin-key-env", default="KNOTS_ADMIN_KEY")
    ap.add_argument(
        "--register",
        help="NAME=DIR: a copy of the first task's adapter, inside adapter_dirs, to "
        "register and unregister during the soak (its answers must equal the first task's)",
    )
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    server = None
    if args.config:
        import yaml

        cfg = yaml.safe_load(Path(args.config).read_text())
        args.url = f"http://{cfg.get('host', '127.0.0.1')}:{cfg.get('port', 8000)}"
        cli = Path(sys.executable).parent / "knots-serve"
        server = subprocess.Popen([str(cli), "serve", "--config", args.config], start_new_session=True)
        args.pid = server.pid
        while not _up(args.url):
            if server.poll() is not None:
                sys.exit(f"the server exited ({server.returncode})")
            time.sleep(2)
    try:
        stats = asyncio.run(_soak(args))
    finally:
        if server:
            os.killpg(server.pid, 15)
            server.wait()
    print(table(stats))
    sys.exit(1 if stats["failures"] else 0)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def _soak(args) -> dict:
    admin_key = os.environ.get(args.admin_key_env)
    headers = {"authorization": f"Bearer {args.api_key}"}
    listed = httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"]
    tasks = args.tasks.split(",") if args.tasks else [m["id"][6:] for m in listed if m["id"].startswith("tasks:")][:4]
    models = merge_models(tasks) + [listed[0]["id"], tasks[0]]
    task = None
    if args.register:
        name, path = args.register.split("=", 1)
        task = (name, Path(path))
    soak = Soak(
        args.url,
        models,
        ["Add the two numbers and give only the sum.\n10 + 99", "one two three"],
        args.api_key,
        admin_key,
        args.pid,
    )
    pin = None if args.no_pin or not admin_key else models[0]
    return await soak.run(args.minutes * 60, args.clients, pin, task, tasks[0])


if __name__ == "__main__":
    main()
