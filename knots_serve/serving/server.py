"""The merge layer's state inside vLLM's API server process: config, task registry, composer, and the
link to vLLM's LoRA table (`OpenAIServingModels`). One instance per server, made by the endpoint plugin."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..adapters import AdapterError, load_adapter
from ..compose import MergeError
from . import metrics
from .composer import Composer, UnknownTask
from .config import ServeConfig
from .names import PREFIX, Selection, check_task_name, parse_field, parse_model
from .registry import TaskRegistry

log = logging.getLogger("knots_serve")


class KnotsServer:
    def __init__(self, cfg: ServeConfig, models):
        self.cfg, self.models = cfg, models  # models: vllm OpenAIServingModels
        self.registry = TaskRegistry(cfg.tasks, cfg.state_dir)
        adapters = {n: load_adapter(p, n) for n, p in self.registry.tasks().items()}
        self.composer = Composer(adapters, cfg.cache_dir, cfg.cache_bytes, cfg.max_lora_rank, cfg.basis_file)
        self.loop = asyncio.get_running_loop()
        self.composer.on_evict = lambda name: self.loop.call_soon_threadsafe(self.models.lora_requests.pop, name, None)
        self._registry_lock = asyncio.Lock()

    # --- request routing (called by the middleware for every completion request) ------------------------
    def selection(self, body: dict) -> Selection | None:
        """The merge a request body asks for, or None when it names a plain model (base, adapter)."""
        if "knots" in body:
            return parse_field(body["knots"], self.cfg.default_method)
        model = body.get("model")
        if not isinstance(model, str):
            return None
        if model in self.cfg.merges:
            return parse_model(self.cfg.merges[model], self.cfg.default_method)
        if model.startswith(PREFIX):
            return parse_model(model, self.cfg.default_method)
        return None

    async def route(self, body: dict) -> str | None:
        """The LoRA name vLLM should serve the request with (composing it first if needed), or None to
        leave the request as it is. Raises MergeError (400) / UnknownTask (404)."""
        sel = self.selection(body)
        if sel is None:
            return None
        if sel.spec is None:  # tasks:A is A's own adapter, served under its plain name
            if sel.tasks[0] not in self.composer.adapters:
                raise UnknownTask(f"unknown task {sel.tasks[0]!r}; known: {', '.join(sorted(self.composer.adapters))}")
            name = sel.tasks[0]
        else:
            name = (await asyncio.to_thread(self.composer.get, sel)).name
        metrics.REQUESTS.labels(body.get("model") if body.get("model") in self.cfg.merges else name).inc()
        return name

    def resolve(self, name: str) -> Path | None:
        """For the vLLM resolver: where a routed merge's adapter is."""
        composed = self.composer.lookup(name)
        return composed.path if composed else None

    # --- task registry (admin API) ----------------------------------------------------------------------
    async def register(self, name: str, path: str) -> dict:
        check_task_name(name)
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(d) for d in self.cfg.adapter_dirs):
            raise MergeError(f"adapter path {path!r} is outside the configured adapter_dirs")
        async with self._registry_lock:
            if name in self.composer.adapters:
                raise MergeError(f"task {name!r} is already registered; unregister it first")
            adapter = await asyncio.to_thread(load_adapter, resolved, name)
            pool = self.composer.adapters | {name: adapter}
            await asyncio.to_thread(self.composer.set_pool, pool)  # validates compatibility, rebuilds the basis
            await self._load_plain(name, resolved)
            self.registry.add(name, resolved)
        return self.describe(name)

    async def unregister(self, name: str) -> None:
        async with self._registry_lock:
            if name not in self.composer.adapters:
                raise UnknownTask(f"unknown task {name!r}")
            pool = {n: a for n, a in self.composer.adapters.items() if n != name}
            await asyncio.to_thread(self.composer.set_pool, pool)
            self.models.lora_requests.pop(name, None)
            self.registry.remove(name)

    async def _load_plain(self, name: str, path: Path) -> None:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        result = await self.models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path)))
        if not isinstance(result, str):  # an ErrorResponse
            raise AdapterError(f"vLLM could not load {name!r}: {result.error.message}")

    def describe(self, name: str) -> dict:
        a = self.composer.adapters[name]
        return {"name": name, "model": f"{PREFIX}{name}", "path": a.path, "modules": len(a.modules),
                "ranks": sorted({m.rank for m in a.modules.values()})}

    def model_ids(self) -> list[str]:
        """What /v1/models adds to vLLM's list: every task as tasks:NAME, and the named merges."""
        return [f"{PREFIX}{n}" for n in sorted(self.composer.adapters)] + list(self.cfg.merges)


def error_status(e: Exception) -> int:
    return 404 if isinstance(e, UnknownTask) else 400
