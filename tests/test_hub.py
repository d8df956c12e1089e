"""Adapters on the Hugging Face Hub (hf://OWNER/NAME[@REVISION][/SUBFOLDER]), offline: every test fills a Hub
cache in a tmp dir itself, in huggingface_hub's documented layout (models--OWNER--NAME/refs/REF holding a
commit hash, snapshots/COMMIT/FILE linking into blobs/), with the tiny PEFT adapters, and sets HF_HUB_OFFLINE=1
and HF_HUB_CACHE. Nothing is mocked and nothing goes to the network: huggingface_hub's own snapshot_download
reads the cache."""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from knots_serve.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    HubRef,
    is_hub_ref,
    load_adapter,
    parse_hub_ref,
)
from knots_serve.compose import MergeError
from knots_serve.serving.errors import ERRORS, error_parts
from knots_serve.serving.server.config import load_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEWER = "89abcdef0123456789abcdef0123456789abcdef"
CLI = str(Path(sys.executable).parent / "knots-serve")


def cache_repo(cache: Path, repo_id: str, adapter: Path, commit=COMMIT, refs=("main",), subfolder="") -> Path:
    """Put `adapter`'s two files into the Hub cache as repo_id at `commit` (under `subfolder`), with each ref in
    `refs` pointing there, the way `hf download` leaves them. Returns the snapshot's adapter dir."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit / subfolder
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        data = (adapter / fname).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / fname).unlink(missing_ok=True)
        (snapshot / fname).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline. The environment is for subprocesses (the CLI); huggingface_hub reads both
    variables into huggingface_hub.constants once, when it is first imported (constants.py), and
    snapshot_download reads them from there at every call: this process imported it long ago, so they are
    set there too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def same_adapter(a, b) -> bool:
    return a.modules.keys() == b.modules.keys() and all(
        torch.equal(a.modules[m].A, b.modules[m].A)
        and torch.equal(a.modules[m].B, b.modules[m].B)
        and a.modules[m].scale == b.modules[m].scale
        for m in a.modules
    )


@pytest.mark.parametrize(
    "ref, parsed",
    [
        ("hf://acme/alpha-lora", HubRef("acme/alpha-lora")),
        ("hf://models/acme/alpha-lora", HubRef("acme/alpha-lora")),  # huggingface_hub's explicit type prefix
        ("hf://acme/alpha-lora@v1.0", HubRef("acme/alpha-lora", "v1.0")),
        (f"hf://acme/pool@{COMMIT}/tasks/beta", HubRef("acme/pool", COMMIT, "tasks/beta")),
        ("hf://acme/pool/beta", HubRef("acme/pool", None, "beta")),
        ("hf://acme/pool@feature%2Fx/beta", HubRef("acme/pool", "feature/x", "beta")),
        ("hf://acme/pool@refs/pr/3/beta", HubRef("acme/pool", "refs/pr/3", "beta")),
    ],
)
def test_hub_references_parse(ref, parsed):
    assert parse_hub_ref(ref) == parsed
    assert parse_hub_ref(str(parsed)) == parsed  # str() writes a reference that means the same


@pytest.mark.parametrize(
    "ref, message",
    [
        ("hf://acme", "use hf://OWNER/NAME"),
        ("hf://datasets/acme/data", "model repos, not datasets"),
        ("hf://acme/..", "repo name '..'"),
        ("hf://ac--me/x", "owner 'ac--me'"),
        ("hf://acme/x@", "revision ''"),
        ("hf://acme/x@..%2F..%2Fetc", "revision '../../etc'"),
        ("hf://acme/x/../../etc", "subfolder '../../etc'"),
        ("hf://acme/x//y", "subfolder '/y'"),
        ("hf://acme/x y", "repo name 'x y'"),
    ],
)
def test_bad_hub_references_are_refused_naming_the_part(ref, message):
    with pytest.raises(AdapterError, match="invalid Hub reference") as e:
        parse_hub_ref(ref)
    assert message in str(e.value)


def test_only_an_hf_string_is_a_hub_reference():
    assert is_hub_ref("hf://acme/x") and not is_hub_ref("acme/x") and not is_hub_ref("./hf:/acme/x")
    assert not is_hub_ref(Path("hf://acme/x"))  # a Path has lost the '//': it is a local path


def test_a_hub_adapter_is_the_same_adapter_as_its_local_dir(hub_cache, tiny_adapters):
    cache_repo(hub_cache, "acme/alpha-lora", tiny_adapters["alpha"], refs=("main", "v1"))
    cache_repo(hub_cache, "acme/pool", tiny_adapters["beta"], subfolder="tasks/beta")
    local = load_adapter(tiny_adapters["alpha"], "alpha")
    for ref in ("hf://acme/alpha-lora", "hf://acme/alpha-lora@v1", f"hf://acme/alpha-lora@{COMMIT}"):
        hub = load_adapter(ref, "alpha")
        assert same_adapter(hub, local) and hub.config == local.config, ref
        assert Path(hub.path) == hub_cache / "models--acme--alpha-lora" / "snapshots" / COMMIT  # what vLLM gets
    assert load_adapter("hf://acme/alpha-lora").name == "alpha-lora"  # the default name: the repo's
    beta = load_adapter("hf://acme/pool/tasks/beta")
    assert beta.name == "beta" and same_adapter(beta, load_adapter(tiny_adapters["beta"]))


def test_what_is_not_in_the_cache_is_a_clear_error_naming_the_repo(hub_cache, tiny_adapters):
    cache_repo(hub_cache, "acme/alpha-lora", tiny_adapters["alpha"])
    for ref, revision in (
        ("hf://acme/alpha-lora@v2", "v2"),  # a revision that is not cached
        (f"hf://acme/alpha-lora@{NEWER}", NEWER),  # a commit that is not cached
        ("hf://acme/nope", "main"),  # a repo that is not cached
    ):
        with pytest.raises(AdapterError) as e:
            load_adapter(ref)
        repo = ref.split("@")[0].removeprefix("hf://")
        message = str(e.value)
        assert f"'{repo}' (revision '{revision}') is not in the Hugging Face cache {hub_cache}" in message, message
        assert "HF_HUB_OFFLINE is set" in message and f"hf download {repo} --revision {revision}" in message
    with pytest.raises(AdapterError, match=r"'acme/alpha-lora' \(revision 'main'\) has no beta/adapter_config.json"):
        load_adapter("hf://acme/alpha-lora/beta")  # cached, but no adapter in that subfolder


def test_the_cli_merges_hub_and_local_adapters_alike(hub_cache, tiny_adapters, tmp_path):
    """A real `knots-serve` process, configured by the environment alone (HF_HUB_OFFLINE, HF_HUB_CACHE)."""
    cache_repo(hub_cache, "acme/alpha-lora", tiny_adapters["alpha"])
    beta = f"--adapter=beta={tiny_adapters['beta']}"

    def run(*args):
        return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300)

    flags = ("--method", "knots-ties", "--top-k", "0.3")
    r = run("merge", "--adapter=alpha=hf://acme/alpha-lora", beta, *flags, "--out", tmp_path / "hub")
    assert r.returncode == 0, r.stderr
    r = run("merge", f"--adapter=alpha={tiny_adapters['alpha']}", beta, *flags, "--out", tmp_path / "local")
    assert r.returncode == 0, r.stderr
    assert same_adapter(load_adapter(tmp_path / "hub"), load_adapter(tmp_path / "local"))

    for ref, message in (
        ("hf://acme/nope", "hf://acme/nope: 'acme/nope' (revision 'main') is not in the Hugging Face cache"),
        ("hf://acme", "invalid Hub reference 'hf://acme'"),
    ):
        r = run("basis", f"--adapter=alpha={ref}", beta, "--out", tmp_path / "pool.safetensors")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert message in lines[0] and "Traceback" not in r.stderr

    # `serve` resolves the config's hf:// tasks before vLLM starts: one that is not cached stops it there
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"model": str(tmp_path), "tasks": {"alpha": "hf://acme/nope@v2"}}))
    r = run("serve", "--config", config)
    assert r.returncode == 2 and r.stderr.startswith("error: hf://acme/nope@v2: 'acme/nope' (revision 'v2')"), r.stderr
    assert "Traceback" not in r.stderr


def test_the_serve_config_takes_hub_tasks_as_given_and_checks_them(tmp_path, tiny_adapters):
    def config(**fields):
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({"model": str(tmp_path)} | fields))
        return load_config(path)

    cfg = config(tasks={"alpha": "hf://acme/alpha-lora@v1", "beta": "beta-dir"}, adapter_repos=["acme", "org/one"])
    assert cfg.tasks == {"alpha": "hf://acme/alpha-lora@v1", "beta": str(tmp_path / "beta-dir")}
    assert cfg.allows_repo("acme/anything") and cfg.allows_repo("org/one")
    assert not cfg.allows_repo("acme-evil/x") and not cfg.allows_repo("org/two") and not cfg.allows_repo("o/acme")
    assert not config().allows_repo("acme/x")  # none by default
    with pytest.raises(MergeError, match="task 'alpha': invalid Hub reference 'hf://acme'"):
        config(tasks={"alpha": "hf://acme"})
    with pytest.raises(MergeError, match="adapter_repos entry 'a/b/c'"):
        config(adapter_repos=["a/b/c"])
    with pytest.raises(MergeError, match="repo name ''"):
        config(adapter_repos=["acme/"])


def test_the_server_serves_and_registers_hub_adapters_and_keeps_the_reference(edge, hub_cache, tiny_adapters):
    """A config task from the Hub, an admin registration from an allowed repo (persisted as the hf://
    reference, so a restart resolves it again from the cache), and the refusals: a repo outside
    adapter_repos, a repo that is not cached."""
    cache_repo(hub_cache, "acme/alpha-lora", tiny_adapters["alpha"])
    cache_repo(hub_cache, "acme/beta-lora", tiny_adapters["beta"])
    cache_repo(hub_cache, "other/alpha-lora", tiny_adapters["alpha"])
    tasks = {"beta": "hf://acme/beta-lora", "gamma": str(tiny_adapters["gamma"])}

    async def test(server, mw, engine):
        from asgi_edge import make_server

        assert same_adapter(server.bases.adapters["beta"], load_adapter(tiny_adapters["beta"]))
        assert server.describe("beta")["source"] == "hf://acme/beta-lora"
        loaded = []
        plain = server.models.load_lora_adapter

        async def load_lora_adapter(request):  # what vLLM is asked to load
            loaded.append((request.lora_name, request.lora_path))
            return await plain(request)

        server.models.load_lora_adapter = load_lora_adapter

        for ref, status, message in (
            ("hf://other/alpha-lora", 400, "the repo 'other/alpha-lora' is not in the configured adapter_repos"),
            ("hf://acme/missing", 400, "'acme/missing' (revision 'main') is not in the Hugging Face cache"),
            ("hf://acme", 400, "invalid Hub reference"),
        ):
            with pytest.raises(ERRORS) as e:
                await server.register("delta", ref)
            code, body, _ = error_parts(e.value)
            assert code == status and message in json.loads(body)["error"]["message"], (ref, body)
        assert "delta" not in server.bases.adapters and loaded == []

        info = await server.register("delta", "hf://acme/alpha-lora")
        snapshot = str(hub_cache / "models--acme--alpha-lora" / "snapshots" / COMMIT)
        assert info["source"] == "hf://acme/alpha-lora" and info["path"] == snapshot
        assert loaded == [("delta", snapshot)]  # vLLM gets the local directory
        assert same_adapter(server.bases.adapters["delta"], load_adapter(tiny_adapters["alpha"]))
        state = json.loads((server.cfg.state_dir / "tasks.json").read_text())
        assert state["added"] == {"delta": "hf://acme/alpha-lora"}

        server.cache.close()  # a restart, offline: the registered task comes back from the cache
        again = make_server(server.cfg.state_dir.parent, tiny_adapters, tasks=tasks, adapter_repos=["acme"])
        try:
            assert again.describe("delta") == info
        finally:
            again.cache.close()

    edge(test, tasks=tasks, adapter_repos=["acme"])


def test_at_start_a_hub_task_is_read_from_where_vllm_was_started_with_it(hub_cache, tiny_adapters, tmp_path):
    """`knots-serve serve` resolves hf:// tasks for vLLM's --lora-modules; if the branch moves before the plugin
    starts, the merge layer still reads the snapshot vLLM serves, never another one."""
    from knots_serve.serving.server.hub import KnotsServer

    started = cache_repo(hub_cache, "acme/lora", tiny_adapters["alpha"])  # main at COMMIT when serve resolved it
    cache_repo(hub_cache, "acme/lora", tiny_adapters["beta"], commit=NEWER)  # main moved on since
    path = tmp_path / "c.yaml"
    path.write_text(
        json.dumps(
            {
                "model": str(tmp_path),
                "tasks": {"a": "hf://acme/lora", "gamma": str(tiny_adapters["gamma"])},
                "cache_dir": str(tmp_path / "cache"),
                "state_dir": str(tmp_path / "state"),
                "compose_device": "cpu",
            }
        )
    )
    vllm_table = {"a": types.SimpleNamespace(lora_path=str(started))}  # vLLM's static LoRAs (--lora-modules)

    async def main():
        server = KnotsServer(load_config(path), types.SimpleNamespace(lora_requests=vllm_table))
        try:
            assert server.bases.adapters["a"].path == str(started)
            assert same_adapter(server.bases.adapters["a"], load_adapter(tiny_adapters["alpha"]))
        finally:
            server.cache.close()

    asyncio.run(main())
    assert load_adapter("hf://acme/lora").path.endswith(NEWER)  # what resolving again would have read
