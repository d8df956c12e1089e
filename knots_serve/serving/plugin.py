"""vLLM glue, loaded through entry points (pyproject.toml) when VLLM_PLUGINS names `knots_serve`:

- `register` (vllm.general_plugins, every vLLM process): the LoRA resolver; the CPU LoRA-op fix where
  vLLM's ops are the buggy ones; the engine's shared-memory queue spinning 0.1 s, not 1 s, after each read
  (spin.py); W0 kept for pins where pinning is on (config `pinning`).
- `KnotsEndpoint` (vllm.endpoint_plugins, API server): the admin and /v1/models routes, the request
  middleware (middleware.py), and the KnotsServer state.
- `KnotsPrometheus` (vllm.stat_logger_plugins, API server): vLLM's own Prometheus metrics, with every LoRA in
  `vllm:lora_requests_info` also listed under the names clients sent for it (server/client_names.py).

Request path: the middleware reads the JSON body of /v1/chat/completions and /v1/completions; if it
selects a merge (`tasks:…`, a named merge, an experiment arm, or a `knots` field) it composes it (once)
and rewrites `model` to the merge's canonical name; vLLM then finds no such LoRA and asks the resolver,
which returns the composed adapter's path; vLLM loads it and serves the request — streaming,
templates, logprobs and all — as for any LoRA.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from vllm.v1.metrics.loggers import PrometheusStatLogger

from .cluster.group import Group, StripedIds
from .engine import fleet_files, heap, launch, lora_fix, pinning, spin
from .engine.launch import GROUP_ENV
from .http.middleware import KnotsMiddleware
from .server import pins
from .server.config import CONFIG_ENV, config_spans_hosts, load_config, pinning_enabled

log = logging.getLogger("vllm.knots_serve")  # under vLLM's logger: its handler and level apply


def register() -> None:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class KnotsResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str):
            server = KnotsMiddleware.server  # None outside the API server process
            path = server.resolve(lora_name) if server else None
            # lora_int_id is a placeholder: vLLM assigns the real id
            return LoRARequest(lora_name, 1, str(path)) if path else None

    LoRAResolverRegistry.register_resolver("knots_serve", KnotsResolver())
    if pinning_enabled():
        pinning.keep_cpu_weights()
    else:
        log.info("knots_serve: pinning is off (pinning: false): vLLM's CPU weight packing left as it is")
    log.info("knots_serve: %s", lora_fix.apply())
    log.info("knots_serve: %s", spin.apply())
    if os.environ.get(CONFIG_ENV) and config_spans_hosts():
        log.info("knots_serve: %s", fleet_files.apply(workers_fleet))


def workers_fleet():
    """The fleet the workers of a multi-node engine fetch merges and pins from (engine/fleet_files.py)."""
    from .merges.fleet import Fleet
    from .state.backends import open_store

    cfg = load_config(os.environ[CONFIG_ENV], prepare_model=False)
    return Fleet(open_store(cfg.store, cfg.state_dir), cfg.fleet_dir, cfg.fleet_inline(), cfg.fleet_ttl_s)


class KnotsPrometheus(PrometheusStatLogger):
    """vLLM's Prometheus stat logger (it replaces vLLM's: one logger, one set of metrics), with the running and
    waiting LoRAs of `vllm:lora_requests_info` each followed by the names clients sent for it, so that a router
    with LoRA affinity (docs/DEPLOY.md, "Behind a router") matches a request's `model` to the server serving it."""

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        server = KnotsMiddleware.server  # None outside the API server process (an in-process engine)
        if scheduler_stats is not None and server is not None:
            names = server.router.client_names
            scheduler_stats = dataclasses.replace(
                scheduler_stats,
                running_lora_adapters=names.expand(scheduler_stats.running_lora_adapters),
                waiting_lora_adapters=names.expand(scheduler_stats.waiting_lora_adapters),
            )
        super().record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)


async def join_group(server, models, engine_client, args) -> None:
    """Several API server processes (group.py): LoRA ids taken in turns, runtime LoRA loading on for this
    process (launch.py turned it off for vLLM's check), then in step with the others."""
    count, index = launch.api_servers(args), engine_client.engine_core.client_index
    models.lora_id_counter = StripedIds(models.lora_id_counter.value, index, count)
    os.environ[launch.RUNTIME_LORA] = "1"  # read per request by vLLM's API server (never cached there)
    await server.join(Group(Path(os.environ[GROUP_ENV]), index, count, server))


class KnotsEndpoint:
    name = "knots_serve"
    required_tasks = None

    def attach_router(self, app) -> None:
        from .http import api, console

        app.include_router(api.router)
        app.include_router(console.router)
        app.add_middleware(KnotsMiddleware)

    async def init_state(self, engine_client, state, args) -> None:
        import torch
        from vllm import envs

        from .http.auth import digest
        from .server.hub import KnotsServer

        cfg = load_config(os.environ[CONFIG_ENV])
        torch.set_num_threads(cfg.compose_threads)  # before any compose thread starts (config.py says why)
        if heap.reserve(cfg.compose_heap_bytes):
            log.info("knots_serve: %d MiB of heap touched for composes", cfg.compose_heap_bytes >> 20)
        server = KnotsServer(cfg, state.openai_serving_models, engine_client)
        # the API keys vLLM checks on /v1/* (its --api-key wins over VLLM_API_KEY); auth.py checks them everywhere
        server.api_keys = [digest(k) for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]
        state.knots = KnotsMiddleware.server = server
        if os.environ.get(GROUP_ENV):  # one of several API server processes (launch.py)
            await join_group(server, state.openai_serving_models, engine_client, args)
        if server.cfg.pin and (server.group is None or server.group.index == 0):  # one pin writes every engine
            log.info("knots_serve: pinned %s", await pins.pin(server, server.cfg.pin))
        log.info(
            "knots_serve: %d tasks, basis ready on %s (%.1f MiB resident)",
            len(server.bases.adapters),
            server.bases.device,
            server.bases.nbytes() / 2**20,
        )
