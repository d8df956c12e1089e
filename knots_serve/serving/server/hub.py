"""The merge layer's state inside vLLM's API server process, one `KnotsServer` per process, made by the endpoint
plugin. The hub holds what its parts share and the parts, each with one job:

- `pool` (pool.py): the task registry and every pool change;
- `router` (routing.py): a completion request to the model vLLM serves, composing merges;
- `ab` (ab.py): experiments and the promotion of winners to recipes;
- `store_sync` (sync.py): what other replicas write to the store, applied here;
- `prewarm` (prewarm.py): at start, the merges likely to be asked for first, composed in the background;
- `speculate` (speculate.py): while idle, the merges likely to be asked for next, composed ahead;
- pins (pins.py): merges written into the engine's weights.

The HTTP edge calls the hub's methods only; each is its part's."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import torch

from ...recipes import Choice
from .. import metrics
from ..errors import Unavailable
from ..merges.adapter_cache import AdapterCache
from ..merges.basis_store import BasisStore, compose_device
from ..merges.fleet import Fleet
from ..merges.names import PREFIX
from ..state.backends import open_store
from ..state.experiments import Experiment, Outcomes, check_experiment
from ..state.registry import experiment_table, task_table
from ..state.traffic import Traffic
from .ab import ABTests
from .config import ServeConfig, other_hosts
from .gate import Gate
from .pool import Pool
from .prewarm import Prewarm
from .routing import Route, Router, check_model
from .speculate import Speculate
from .sync import StoreSync

SYNC_S = 600  # beyond the drain: what another API server may take to apply a change (a pool's basis build)


def lora_dtype(engine) -> torch.dtype:
    """The dtype vLLM converts a LoRA to when it loads it (its LoRA config's, the model's by default): merges
    are written in it, so a bfloat16 model's take half the bytes of float32 (in the cache, the write, the load)
    and hold the same values in the engine. float32 without an engine (tests that drive the server alone)."""
    dtype = getattr(getattr(getattr(engine, "vllm_config", None), "lora_config", None), "lora_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class KnotsServer:
    def __init__(self, cfg: ServeConfig, models, engine=None):
        self.cfg, self.models, self.engine = cfg, models, engine  # vllm OpenAIServingModels, EngineClient
        self.loop = asyncio.get_running_loop()
        self.gate = Gate()  # drains requests for a pin or a pool change
        self.api_keys: list[bytes] = []  # digests of vLLM's API keys (auth.py); set by the endpoint plugin
        self.group = None  # with several API server processes, the others (group.py; set by the endpoint plugin)
        self.store = open_store(cfg.store, cfg.state_dir)
        self.store_sync = StoreSync(self)  # reads the store's versions first: what changes from here is applied
        # the pool
        self.tasks = task_table(cfg.tasks, self.store)
        self.pool = Pool(self)
        device = compose_device(cfg.compose_device)
        self.bases = BasisStore(self.pool.load(), device, cfg.basis_file, cfg.basis_cache_bytes, cfg.stats_dir)
        if self.bases.device.type == "cpu":
            from ...kernels import cpu

            cpu.warm_up()  # compile the CPU compose kernels now (or load them from disk), not on a request
        self.cache = AdapterCache(
            self.bases,
            cfg.cache_dir,
            cfg.cache_bytes,
            cfg.max_lora_rank,
            cfg.compose_workers,
            cfg.compose_pending,
            cfg.compose_memory_bytes,
            fleet=Fleet(
                self.store, cfg.fleet_dir, cfg.fleet_inline(), cfg.fleet_ttl_s, other_hosts(cfg.vllm_args) is not None
            ),
            dtype=lora_dtype(engine),
        )
        self.router = Router(self)
        self.cache.on_evict = self.router.forget
        # experiments and recipes, as served: swapped whole by ab.py and sync.py
        self.ab = ABTests(self)
        self.book, self.recipes_error = self.store.recipes(), None  # `knots-serve serve` has checked they read
        self.experiment_store = experiment_table(cfg.experiments, self.store)
        self.experiments = {n: Experiment.model_validate(e) for n, e in self.experiment_store.items().items()}
        for name, exp in self.experiments.items():
            check_experiment(name, exp, self.check_model)
        self.outcomes = Outcomes(self.store)
        # pins.py
        self.pinned: dict | None = None  # {"model": canonical name, ...} while a merge is in the weights
        self.pin_pending: dict | None = None  # the pin or unpin under way and its phase (pins.stage)
        metrics.PINNED.set_function(lambda: self.pinned is not None)  # however it changes (pins.py, group.py)
        self.pin_serial = itertools.count()  # a new factors file per pin
        self.pin_lock = asyncio.Lock()  # one pin or unpin at a time
        self.traffic = Traffic()  # merges requested here, added to the store's counts at each poll
        self.prewarm = Prewarm(self)
        self.speculate = Speculate(self)
        self.store_sync.start()
        self.prewarm.start()  # in the background: readiness is not delayed
        self.speculate.start()

    async def join(self, group) -> None:
        """Become one of several API server processes (group.py): what one of them composes or builds, the
        others reuse (a new merge's files, a new pool's basis), and they wait for each other to listen."""
        self.group, self.cache.group, self.bases.shared_root = group, group.path, self.cache.root
        self.bases.save_dir = self.cache.cache_dir  # the shared basis it builds, for the others to load
        await group.join()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.store_sync.stop()
        self.prewarm.stop()
        self.speculate.stop()
        self.cache.close()
        self.store.close()

    async def in_step(self) -> None:
        """After an admin change this process wrote to the store: with several API server processes, answer
        only once every other one serves it too (group.py)."""
        try:
            if self.group is not None:
                await self.group.sync(self.cfg.drain_timeout_s + SYNC_S)
        except Unavailable as e:
            raise Unavailable(
                f"the change is saved and served by this API server, but not yet by every other one: {e}; "
                f"they apply it from the store within store_poll_s ({self.cfg.store_poll_s:g} s) once they can",
                param=None,
            ) from None

    # --- what the HTTP edge and the vLLM resolver call --------------------------------------------------
    def selects_merge(self, body: dict) -> bool:
        return self.router.selects_merge(body)

    def selection(self, body: dict):
        return self.router.selection(body)

    async def route(
        self, body: dict, user: str | None = None, forced_arm: str | None = None, client: str = ""
    ) -> Route:
        return await self.router.route(body, user, forced_arm, client)

    def resolve(self, name: str) -> Path | None:
        return self.router.resolve(name)

    def choose(self, tasks) -> Choice:
        return self.ab.choose(tasks)

    def check_model(self, model: str) -> None:
        check_model(model, self.cfg, self.bases.adapters, self.choose)

    async def register(self, name: str, path: str, stats: str | None = None) -> dict:
        return await self.pool.register(name, path, stats)

    async def unregister(self, name: str) -> None:
        await self.pool.unregister(name)

    def describe(self, name: str) -> dict:
        return self.pool.describe(name)

    async def put_experiment(self, name: str, exp: Experiment) -> None:
        await self.ab.put(name, exp)

    async def set_weights(self, name: str, weights: dict[str, float]) -> Experiment:
        return await self.ab.set_weights(name, weights)

    async def promote(self, name: str) -> dict:
        return await self.ab.promote(name)

    async def delete_experiment(self, name: str) -> None:
        await self.ab.delete(name)

    def model_ids(self) -> list[str]:
        """What /v1/models adds to vLLM's list: every task as tasks:NAME, the named merges, the experiments."""
        tasks = [f"{PREFIX}{n}" for n in sorted(self.bases.adapters)]
        return tasks + list(self.cfg.merges) + list(self.experiments)
