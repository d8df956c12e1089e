"""The merge layer's state inside vLLM's API server process: config, task registry, the basis store and
the composed-adapter cache, and the link to vLLM's LoRA table (`OpenAIServingModels`). One instance per
server, made by the endpoint plugin."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..adapters import WEIGHTS_NAME, AdapterError, adapter_dir, is_hub_ref, load_adapter, parse_hub_ref
from ..compose import MergeError
from ..recipes import Choice
from . import metrics
from .adapter_cache import AdapterCache, Composed
from .basis_store import BasisStore, UnknownTask, compose_device
from .config import ServeConfig
from .errors import BadRequest, Conflict, NotFound, Unavailable
from .experiments import Experiment, Outcomes, assign, check_experiment, promotion
from .gate import Gate
from .limits import RateLimit
from .names import (
    PREFIX,
    TASK_NAME,
    Selection,
    check_per_request,
    check_task_name,
    parse_field,
    parse_model,
    recipe_model,
)
from .registry import experiment_table, task_table
from .store import open_store
from .sync import StoreSync

SYNC_S = 600  # beyond the drain: what another API server may take to apply a change (a pool's basis build)


@dataclass(frozen=True)
class Route:
    """Where a request goes: `model` replaces the body's model (None: leave it); for an experiment,
    which one and which arm."""

    model: str | None
    experiment: str | None = None
    arm: str | None = None
    held: Composed | None = None  # the composed merge this request uses: release it when the response is done


class KnotsServer:
    def __init__(self, cfg: ServeConfig, models, engine=None):
        self.cfg, self.models, self.engine = cfg, models, engine  # vllm OpenAIServingModels, EngineClient
        self.gate = Gate()
        self.api_keys: list[bytes] = []  # digests of vLLM's API keys (auth.py); set by the endpoint plugin
        self.pinned: dict | None = None  # {"model": canonical name, ...} while a merge is in the weights
        self.store = open_store(cfg.store, cfg.state_dir)
        self.store_sync = StoreSync(self)  # what other replicas change (sync.py), polled from the end of __init__
        self.tasks = task_table(cfg.tasks, self.store)
        self.sources = self.tasks.items()  # name -> path or hf:// reference, of the tasks in the pool
        adapters = {n: load_adapter(self._started_with(n, p), n) for n, p in self.tasks.items().items()}
        self._stamps = {n: _stamp(Path(a.path) / WEIGHTS_NAME) for n, a in adapters.items()}
        self.bases = BasisStore(adapters, compose_device(cfg.compose_device), cfg.basis_file)
        if self.bases.device.type == "cpu":
            from ..kernels import cpu

            cpu.warm_up()  # compile the CPU compose kernels now (or load them from disk), not on a request
        self.cache = AdapterCache(
            self.bases,
            cfg.cache_dir,
            cfg.cache_bytes,
            cfg.max_lora_rank,
            cfg.compose_workers,
            cfg.compose_pending,
            cfg.compose_memory_bytes,
        )
        # composes run here, never in the event loop's default executor: a queue of composes must not
        # hold up cache hits or anything else the server runs in threads
        self.compose_pool = ThreadPoolExecutor(cfg.compose_workers + cfg.compose_pending, "knots-compose")
        self.loop = asyncio.get_running_loop()
        self.cache.on_evict = self._forget
        self.registry_lock = asyncio.Lock()
        self.book, self.recipes_error = self.store.recipes(), None  # `knots-serve serve` has checked they read
        self.state_lock = asyncio.Lock()  # experiment writes and their sync from the store, one at a time
        self.experiment_store = experiment_table(cfg.experiments, self.store)
        self.experiments = {n: Experiment.model_validate(e) for n, e in self.experiment_store.items().items()}
        for name, exp in self.experiments.items():
            check_experiment(name, exp, self.check_model)
        self.outcomes = Outcomes(self.store)
        self.new_merges = RateLimit(cfg.new_merge_rate, cfg.new_merge_burst)
        self.pin_serial = itertools.count()  # pins.py: a new factors file per pin
        self.pin_lock = asyncio.Lock()  # pins.py: one pin or unpin at a time
        self.group = None  # with several API server processes, the others (group.py; set by the endpoint plugin)
        self.store_sync.start()

    async def join(self, group) -> None:
        """Become one of several API server processes (group.py): what one of them composes or builds, the
        others reuse (a new merge's files, a new pool's basis), and they wait for each other to listen."""
        self.group, self.cache.group, self.bases.shared_root = group, group.path, self.cache.root
        await group.join()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.store_sync.stop()
        self.cache.close()
        self.store.close()

    def _started_with(self, name: str, ref: str) -> str:
        """Where to read a task's adapter at start: an hf:// task from the directory vLLM was started with
        (`knots-serve serve` resolved it for --lora-modules), so the merges and the plain adapter are the
        same files even if the repo's branch moved meanwhile; anything else as configured."""
        known = self.models.lora_requests.get(name) if is_hub_ref(ref) else None
        return known.lora_path if known is not None else ref

    # --- request routing (called by the middleware for every completion request) ------------------------
    def choose(self, tasks) -> Choice:
        """How to merge a subset requested without a method (recipes.py); the recipes are read again from the
        store when they change (sync.py), so `knots-serve tune` and `ab promote` apply without a restart."""
        return self.book.choose(tasks, self.cfg.default_method)

    def selection(self, body: dict) -> Selection | None:
        """The merge a request body asks for, or None when it names a plain model (base, adapter)."""
        if "knots" in body:
            return parse_field(body["knots"], self.choose)
        model = body.get("model")
        if not isinstance(model, str):
            return None
        if model in self.cfg.merges:
            return parse_model(self.cfg.merges[model], self.choose)
        if model.startswith(PREFIX):
            return parse_model(model, self.choose)
        return None

    def selects_merge(self, body: dict) -> bool:
        """Does a request body name something only the merge routing serves (a merge, an experiment, a task
        as tasks:NAME, a `knots` field)? Such bodies never reach vLLM unrouted (middleware.py)."""
        model = body.get("model")
        return "knots" in body or (
            isinstance(model, str)
            and (model.startswith(PREFIX) or model in self.cfg.merges or model in self.experiments)
        )

    async def route(
        self, body: dict, user: str | None = None, forced_arm: str | None = None, client: str = ""
    ) -> Route:
        """Where vLLM should serve the request (composing a merge first if needed; `client` is who
        asks, for the rate of new merges). Raises a ServeError (errors.py)."""
        model, experiment, arm, held = body.get("model"), None, None, None
        if "knots" not in body and isinstance(model, str) and model in self.experiments:
            experiment, exp = model, self.experiments[model]
            if forced_arm is not None and forced_arm not in exp.arms:
                raise BadRequest(f"experiment {experiment!r} has no arm {forced_arm!r}: {', '.join(sorted(exp.arms))}")
            user = body.get("user") if isinstance(body.get("user"), str) else user
            arm = forced_arm or assign(experiment, exp, user)
            model = exp.arms[arm].model
            body = {"model": model}
        sel = self.selection(body)
        if sel is None:
            name = model if experiment else None  # the base or a plain adapter: vLLM's own names
            if model in self.bases.adapters:
                self._check_files(model)
        elif sel.spec is None:  # tasks:A is A's own adapter, served under its plain name
            if sel.tasks[0] not in self.bases.adapters:
                raise UnknownTask(f"unknown task {sel.tasks[0]!r}; known: {', '.join(sorted(self.bases.adapters))}")
            name = sel.tasks[0]
            self._check_files(name)
        elif self.pinned and sel.canonical == self.pinned["model"]:
            name = self.cfg.base_name  # the merge is in the base weights: no LoRA
        else:
            held = await self._hold(sel, client)
            name = held.name
            known = self.models.lora_requests.get(name)
            if known is not None and known.lora_path != str(held.path):  # an older compose of this merge:
                del self.models.lora_requests[name]  # vLLM asks the resolver, which gives this request's files
        # a bounded label set: per-request merges by method and subset size, never by their parameters
        label = experiment or (
            model if model in self.cfg.merges else f"merge/{len(sel.tasks)}/{sel.spec.method}" if held else name
        )
        if label:
            metrics.REQUESTS.labels(label).inc()
        return Route(name, experiment, arm, held)

    async def _hold(self, sel: Selection, client: str):
        """cache.get(sel, hold=True): a cached merge at once, a new one in the compose pool (within the
        client's rate of new merges); if this request is cancelled meanwhile, the hold taken by the pool's
        thread is released when it ends (never leaked)."""
        cached = self.cache.hold_cached(sel)
        if cached is not None:
            return cached
        if not self.cache.composing(sel):  # joining a compose under way costs nothing new
            self.new_merges.take(client)
        job = asyncio.ensure_future(self.loop.run_in_executor(self.compose_pool, self.cache.get, sel, True))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda j: j.cancelled() or j.exception() or self.cache.release(j.result()))
            raise

    def _check_files(self, task: str) -> None:
        """vLLM reads a task's own adapter from its files whenever it (re)loads it, and a failed load inside
        a batch kills vLLM's engine. So a request for the plain adapter is refused (503) when the weights
        file is gone or changed since it was loaded; merges are composed from the copy in memory."""
        path = Path(self.bases.adapters[task].path) / "adapter_model.safetensors"
        if _stamp(path) != self._stamps.get(task):
            raise FilesChanged(
                f"task {task!r}: its adapter file {path} is gone or changed on disk since it was "
                f"loaded; merges with it still work (from memory); re-register it to serve it alone"
            )

    def _forget(self, c) -> None:
        """Before a composed merge's files are deleted: drop its name from vLLM's LoRA table if it points
        there, so vLLM never tries to load a deleted path (a failed load kills vLLM's engine). On the event
        loop, which is where vLLM reads the table; the caller waits."""

        def forget():
            known = self.models.lora_requests.get(c.name)
            if known is not None and known.lora_path == str(c.path):
                del self.models.lora_requests[c.name]

        async def on_the_loop():
            forget()

        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            forget()
        else:
            asyncio.run_coroutine_threadsafe(on_the_loop(), self.loop).result(60)

    def check_model(self, model: str) -> None:
        check_model(model, self.cfg, self.bases.adapters, self.choose)

    async def in_step(self, shared_basis: Path | None = None) -> None:
        """After an admin change this process wrote to the store: with several API server processes, answer
        only once every other one serves it too (group.py). `shared_basis`: the new pool's basis this process
        saved for them (change_pool), deleted once they have applied the change."""
        try:
            if self.group is not None:
                await self.group.sync(self.cfg.drain_timeout_s + SYNC_S)
        except Unavailable as e:
            raise Unavailable(
                f"the change is saved and served by this API server, but not yet by every other one: {e}; "
                f"they apply it from the store within store_poll_s ({self.cfg.store_poll_s:g} s) once they can",
                param=None,
            ) from None
        finally:
            if shared_basis is not None:
                shared_basis.unlink(missing_ok=True)

    # --- experiments (admin API) ------------------------------------------------------------------------
    async def put_experiment(self, name: str, exp: Experiment) -> None:
        if not TASK_NAME.match(name):
            raise BadRequest(f"invalid experiment name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        taken = (
            name == self.cfg.base_name
            or name.startswith(PREFIX)
            or name in self.bases.adapters
            or name in self.cfg.merges
        )
        if taken:
            raise Conflict(f"experiment name {name!r} clashes with the base model, a task or a merge")
        check_experiment(name, exp, self.check_model)
        async with self.state_lock:
            await asyncio.to_thread(self.experiment_store.put, name, exp.model_dump())
            self.store_sync.written("experiments")
            self.experiments = self.experiments | {name: exp}  # swap, never mutate: requests in flight keep theirs
        await self.in_step()

    async def set_weights(self, name: str, weights: dict[str, float]) -> Experiment:
        if name not in self.experiments:
            raise NotFound(f"unknown experiment {name!r}")
        exp = self.experiments[name]
        unknown = set(weights) - set(exp.arms)
        if unknown:
            raise BadRequest(f"experiment {name!r} has no arm(s) {', '.join(sorted(unknown))}")
        arms = {a: arm.model_copy(update={"weight": weights.get(a, arm.weight)}) for a, arm in exp.arms.items()}
        new = Experiment.model_validate({"arms": {a: arm.model_dump() for a, arm in arms.items()}})
        await self.put_experiment(name, new)
        return new

    async def promote(self, name: str) -> dict:
        """The experiment's winning arm, once it separates, as its subset's recipe (experiments.promotion)."""
        if name not in self.experiments:
            raise NotFound(f"unknown experiment {name!r}")
        exp = self.experiments[name]
        report = await asyncio.to_thread(self.outcomes.report, name, sorted(exp.arms))
        recipe = promotion(name, exp, report, self.selection)
        try:
            self.book = await asyncio.to_thread(self.store.put_recipes, [recipe])
            self.store_sync.written("recipes")
        except MergeError as e:  # unreadable recipes, a full disk, the store away: nothing written
            raise Unavailable(f"cannot save the recipe to {self.store.where('recipes')}: {e}") from None
        await self.in_step()
        return {"recipe": dataclasses.asdict(recipe), "model": recipe_model(recipe)}

    async def delete_experiment(self, name: str) -> None:
        if name not in self.experiments:
            raise NotFound(f"unknown experiment {name!r}")
        async with self.state_lock:
            await asyncio.to_thread(self.experiment_store.delete, name)
            self.store_sync.written("experiments")
            self.experiments = {n: e for n, e in self.experiments.items() if n != name}
        await self.in_step()

    def resolve(self, name: str) -> Path | None:
        """For the vLLM resolver: where a routed merge's adapter is — only while a request holds it, so
        vLLM never loads a merge the middleware has not routed (and held) for that request."""
        composed = self.cache.held(name)
        return composed.path if composed else None

    # --- task registry (admin API) ----------------------------------------------------------------------
    async def register(self, name: str, path: str) -> dict:
        """A local adapter inside adapter_dirs, or an hf:// one from a repo adapter_repos allows (a Hub
        registration downloads: only from repos the operator named). The table keeps an hf:// reference as
        given, so a restart resolves it again (from the HF cache when offline)."""
        check_task_name(name)
        source = self.admitted(path)
        async with self.registry_lock:
            if name in self.bases.adapters:
                raise Conflict(f"task {name!r} is already registered; unregister it first")
            shared_basis = await self.change_pool({name: source}, set(), lambda: self.tasks.put(name, source))
        await self.in_step(shared_basis)
        return self.describe(name)

    def admitted(self, path: str) -> str:
        """The source a registration may come from (a local path resolved, an hf:// reference as given), or
        BadRequest; also checked for registrations made through other replicas (sync.py)."""
        if is_hub_ref(path):
            repo = parse_hub_ref(path).repo_id  # AdapterError (400) naming what is wrong
            if not self.cfg.allows_repo(repo):
                raise BadRequest(f"Hub adapter {path!r}: the repo {repo!r} is not in the configured adapter_repos")
            return path
        try:
            resolved = Path(path).expanduser().resolve()
        except (ValueError, OSError, RuntimeError) as e:  # a NUL byte, a symlink loop
            raise BadRequest(f"invalid adapter path {path!r}: {e}") from None
        if not any(resolved.is_relative_to(d) for d in self.cfg.adapter_dirs):
            raise BadRequest(f"adapter path {path!r} is outside the configured adapter_dirs")
        return str(resolved)

    async def unregister(self, name: str) -> None:
        async with self.registry_lock:
            if name not in self.bases.adapters:
                raise UnknownTask(f"unknown task {name!r}")
            shared_basis = await self.change_pool({}, {name}, lambda: self.tasks.delete(name))
        await self.in_step(shared_basis)

    async def change_pool(self, add: dict[str, str], remove: set[str], write=None) -> Path | None:
        """Every pool change, under the registry lock. While requests are served: the new adapters fetched (a
        Hub download) and loaded, the new pool's basis built. Then drained: the new adapters loaded into vLLM,
        the change written to the store (`write`; one applied from another replica is there already), the new
        pool installed. A failure anywhere changes nothing. With several API servers, a change this process
        writes saves the new basis for the others to load before the write, and returns its path (in_step
        deletes it)."""
        local = {n: await asyncio.to_thread(adapter_dir, s) for n, s in add.items()}
        stamps = {n: _stamp(p / WEIGHTS_NAME) for n, p in local.items()}
        loaded = {n: await asyncio.to_thread(load_adapter, p, n) for n, p in local.items()}
        pool = {n: a for n, a in self.bases.adapters.items() if n not in remove} | loaded
        prepared = await asyncio.to_thread(self.bases.prepare, pool)
        share = self.group is not None and write is not None
        shared_basis = await asyncio.to_thread(self.bases.save_basis, prepared, self.cache.cache_dir) if share else None
        with contextlib.ExitStack() as undo:
            if shared_basis is not None:
                undo.callback(shared_basis.unlink, missing_ok=True)  # deleted if the change fails
            async with self.gate.exclusive(self.cfg.drain_timeout_s):  # drained, like a pin: docs/RELIABILITY.md
                table = self.models.lora_requests
                dropped = {n: table.pop(n) for n in remove if n in table}
                try:
                    for n, path in local.items():
                        await self._load_plain(n, path)
                    if write is not None:
                        await asyncio.to_thread(write)
                        self.store_sync.written("tasks")
                except BaseException:
                    for n in local:
                        table.pop(n, None)
                    table.update(dropped)
                    raise
                self._install(prepared)
            undo.pop_all()
        self.sources = {n: s for n, s in self.sources.items() if n not in remove} | add
        self._stamps = {n: s for n, s in self._stamps.items() if n not in remove} | stamps
        return shared_basis

    def _install(self, prepared: dict) -> None:
        self.bases.install(prepared)
        self.cache.clear()  # in a new shared basis every non-TA merge changes

    async def _load_plain(self, name: str, path: Path) -> None:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        result = await self.models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path)))
        if not isinstance(result, str):  # an ErrorResponse
            raise AdapterError(f"vLLM could not load {name!r}: {result.error.message}")

    def describe(self, name: str) -> dict:
        a = self.bases.adapters[name]
        return {
            "name": name,
            "model": f"{PREFIX}{name}",
            "path": a.path,
            "source": self.sources.get(name, a.path),  # as configured or registered: a path or hf://…
            "modules": len(a.modules),
            "ranks": sorted({m.rank for m in a.modules.values()}),
        }

    def model_ids(self) -> list[str]:
        """What /v1/models adds to vLLM's list: every task as tasks:NAME, the named merges, the experiments."""
        return [f"{PREFIX}{n}" for n in sorted(self.bases.adapters)] + list(self.cfg.merges) + list(self.experiments)


def check_model(model: str, cfg: ServeConfig, tasks, choose) -> None:
    """Can a server with this config, these tasks and this chooser (names.Chooser) serve `model`? (For
    experiment arms; composes nothing.) Raises BadRequest / NotFound."""
    if model == cfg.base_name or model in tasks or model in cfg.merges:
        return
    if not model.startswith(PREFIX):
        raise UnknownTask(f"unknown model {model!r}")
    sel = parse_model(model, choose)
    unknown = [t for t in sel.tasks if t not in tasks]
    if unknown:
        raise UnknownTask(f"unknown task(s): {', '.join(unknown)}")
    check_per_request(sel)  # an arm is served per request


class FilesChanged(Unavailable):
    """A task's adapter files changed on disk after they were loaded (HTTP 503)."""


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
