"""The SQLite store (`store: sqlite`, sqlite_store.py): the Store contract on a real database, several processes writing
it at once without a lost update, a write refused while another connection holds the lock (503, nothing
changed), a database it cannot read or whose schema is newer, the config value, and two engine-free
KnotsServers on one state_dir, as two API server processes of one host would be."""

import asyncio
import multiprocessing
import sqlite3

import pytest
import yaml
from asgi_edge import Engine, admin, call, make_server

from knots_serve.compose import MergeError
from knots_serve.recipes import Recipe
from knots_serve.serving.http.middleware import KnotsMiddleware
from knots_serve.serving.server.config import load_config
from knots_serve.serving.state.backends import open_store
from knots_serve.serving.state.sqlite_store import SCHEMA_VERSION, SqliteStore
from knots_serve.serving.state.store import StoreUnavailable

KEY = "sqlite-test-admin-key"
ARMS = {"ta": {"model": "tasks:alpha+beta@knots-ta?alpha=0.5", "weight": 1}, "ties": {"model": "alpha", "weight": 1}}


@pytest.fixture
def store(tmp_path):
    store = SqliteStore(tmp_path / "state")  # the state dir does not exist yet
    yield store
    store.close()


def test_tables_keep_additions_and_tombstones_and_each_write_changes_only_its_kinds_version(store, tmp_path):
    assert (tmp_path / "state/knots.sqlite3").is_file() and store.where("tasks").startswith(store.location)
    assert store.versions() == {} and store.overlay("tasks") == ({}, set())
    store.put("tasks", "a", "/adapters/a")
    store.put("experiments", "ab", {"arms": {"x": {"model": "a", "weight": 1}}})
    store.delete("tasks", "config-entry", tombstone=True)
    assert store.overlay("tasks") == ({"a": "/adapters/a"}, {"config-entry"})
    assert store.overlay("experiments") == ({"ab": {"arms": {"x": {"model": "a", "weight": 1}}}}, set())
    store.put("tasks", "config-entry", "/adapters/new")  # registered again: no longer removed
    store.delete("tasks", "a", tombstone=False)
    assert store.overlay("tasks") == ({"config-entry": "/adapters/new"}, set())

    for kind, write in (
        ("tasks", lambda: store.put("tasks", "b", "/adapters/b")),
        ("tasks", lambda: store.delete("tasks", "b", tombstone=False)),
        ("experiments", lambda: store.delete("experiments", "ab", tombstone=False)),
        ("recipes", lambda: store.put_recipes([Recipe(("a", "b"), "ta")])),
    ):
        before = store.versions()
        write()
        after = store.versions()
        assert after[kind] != before.get(kind) and {k: v for k, v in after.items() if k != kind} == {
            k: v for k, v in before.items() if k != kind
        }, kind
    before = store.versions()
    store.remember("resp-1", "ab", "x")
    store.record("resp-1", 1.0)
    assert store.versions() == before  # feedback is read directly, never polled


def test_recipes_round_trip_one_per_subset_and_unreadable_rows_name_the_database(store):
    store.put_recipes([Recipe(("a", "b"), "knots-ta", {"alpha": 0.5}, score=0.9), Recipe(("a", "c"), "ta")])
    promoted = Recipe(("b", "a"), "knots-ties", {"top_k": 0.3}, source="ab:e")
    book = store.put_recipes([promoted])
    assert {k: r.method for k, r in book.recipes.items()} == {"a+b": "knots-ties", "a+c": "ta"}
    assert book.recipes["a+b"] == Recipe(("a", "b"), "knots-ties", {"top_k": 0.3}, source="ab:e")
    assert SqliteStore(store.path.parent).recipes().recipes == book.recipes  # another connection reads the same
    with sqlite3.connect(store.path) as other:
        other.execute("""INSERT INTO recipes VALUES ('c+d', '{"tasks": ["c", "d"], "method": "nope"}')""")
    with pytest.raises(MergeError, match=f"unreadable recipes in {store.location}.*unknown merge method"):
        store.recipes()


def test_a_response_is_scored_once_and_an_unknown_one_is_a_key_error(store):
    store.remember("resp-1", "ab", "ta")
    store.remember("resp-2", "ab", "ta")
    store.remember("resp-3", "ab", "ties")
    assert store.record("resp-1", 1.0) == ("ab", "ta", None)
    assert store.record("resp-2", 0.5) == ("ab", "ta", None)
    assert store.record("resp-3", 0) == ("ab", "ties", None)
    assert store.record("resp-1", 0.0) == ("ab", "ta", 1.0)  # a later score changes nothing: the first is said
    assert store.feedback("ab") == {"ta": [2, 1.5, 1.25], "ties": [1, 0.0, 0.0]}
    assert store.feedback("other") == {}
    with pytest.raises(KeyError):
        store.record("resp-unknown", 1.0)
    assert store.feedback("ab") == {"ta": [2, 1.5, 1.25], "ties": [1, 0.0, 0.0]}


def write_concurrently(state_dir, i, response_ids, start, results):
    """One process: 50 table entries and 50 scores, begun with the other processes (the barrier)."""
    store = SqliteStore(state_dir)
    start.wait()
    first = []
    for j, rid in enumerate(response_ids):
        store.put("tasks", f"{i}-{j}", f"/adapters/{i}/{j}")
        if store.record(rid, 1.0)[2] is None:
            first.append(rid)
    results.put(first)
    store.close()


def test_processes_writing_at_once_lose_no_update(tmp_path):
    """4 processes, each 50 puts and 50 scores, every response scored by two of them: all 200 entries are there,
    each response counted once (n = 100), and each process saw the other's score as the earlier one."""
    store = SqliteStore(tmp_path)
    ids = [f"resp-{k}" for k in range(100)]
    for rid in ids:
        store.remember(rid, "ab", "ta")
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=write_concurrently, args=(tmp_path, i, (ids[i * 25 :] + ids[: i * 25])[:50], start, results))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    firsts = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    added, removed = store.overlay("tasks")
    assert added == {f"{i}-{j}": f"/adapters/{i}/{j}" for i in range(4) for j in range(50)} and removed == set()
    assert store.versions() == {"tasks": 200}
    assert sorted(rid for first in firsts for rid in first) == sorted(ids)  # each response first scored once
    assert store.feedback("ab") == {"ta": [100, 100.0, 100.0]}
    store.close()


def open_and_write(state_dir, start, results):
    start.wait()
    try:
        store = SqliteStore(state_dir)
        store.put("tasks", str(multiprocessing.current_process().pid), "/adapters/x")
        results.put(sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0])
    except StoreUnavailable as e:
        results.put(str(e))


def test_processes_opening_a_new_database_at_once_all_open_it_in_wal_mode(tmp_path):
    """8 processes start on a state dir without a database, 20 times (each can be refused the switch to WAL
    while another makes it): every one opens it, in WAL mode, and writes."""
    ctx = multiprocessing.get_context("fork")  # started at once and fast: nothing of SQLite is open here yet
    for attempt in range(20):
        start, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=open_and_write, args=(tmp_path / str(attempt), start, results)) for _ in range(8)]
        for p in procs:
            p.start()
        assert [results.get(timeout=30) for _ in procs] == ["wal"] * 8
        for p in procs:
            p.join(timeout=10)
        assert len(SqliteStore(tmp_path / str(attempt)).overlay("tasks")[0]) == 8


def test_a_write_that_cannot_take_the_lock_is_a_503_naming_the_database_and_changes_nothing(tmp_path):
    store = SqliteStore(tmp_path, busy_timeout_s=0.1)
    store.put("tasks", "a", "/adapters/a")
    store.remember("resp-1", "ab", "ta")
    before = store.versions(), store.overlay("tasks"), store.recipes().recipes, store.feedback("ab")
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process mid-write, past the busy timeout
    for write in (
        lambda: store.put("tasks", "b", "/adapters/b"),
        lambda: store.delete("tasks", "a", tombstone=True),
        lambda: store.put_recipes([Recipe(("a", "b"), "ta")]),
        lambda: store.remember("resp-2", "ab", "ties"),
        lambda: store.record("resp-1", 1.0),
    ):
        with pytest.raises(StoreUnavailable, match=f"store {store.location}: cannot .*: database is locked"):
            write()
    assert (store.versions(), store.overlay("tasks"), store.recipes().recipes, store.feedback("ab")) == before
    holder.execute("ROLLBACK")
    holder.close()
    assert store.record("resp-1", 1.0) == ("ab", "ta", None)  # the refused score was not half-recorded
    with pytest.raises(KeyError):
        store.record("resp-2", 1.0)  # the refused remember left nothing
    store.close()


def test_a_file_that_is_not_a_database_or_has_a_newer_schema_is_refused_with_its_name(tmp_path):
    (tmp_path / "knots.sqlite3").write_text("not a database " * 100)
    with pytest.raises(StoreUnavailable, match=f"store {tmp_path / 'knots.sqlite3'}: cannot .*not a database"):
        SqliteStore(tmp_path)
    (tmp_path / "knots.sqlite3").unlink()
    SqliteStore(tmp_path).close()
    with sqlite3.connect(tmp_path / "knots.sqlite3") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(MergeError, match=f"schema version {SCHEMA_VERSION + 1}, newer than .*: upgrade knots-serve"):
        SqliteStore(tmp_path)


def test_the_config_names_the_sqlite_store_and_a_bad_value_lists_it(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "store": "sqlite", "state_dir": "st"}))
    cfg = load_config(path)
    assert cfg.store == "sqlite"
    store = open_store(cfg.store, cfg.state_dir)
    assert isinstance(store, SqliteStore) and store.location == str(tmp_path / "st/knots.sqlite3")
    store.close()
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "store": "sqlite3"}))
    with pytest.raises(MergeError, match="store 'sqlite3': use 'files' .*'sqlite' .*redis://"):
        load_config(path)


def test_two_servers_on_one_state_dir_share_experiments_and_feedback(tmp_path, tiny_adapters, monkeypatch):
    """Two engine-free KnotsServers on one state_dir (two API server processes of one host): an experiment
    created through one is served by the other once it syncs; feedback for a response served by one is
    recorded, once, through the other."""
    monkeypatch.setenv("KNOTS_ADMIN_KEY", KEY)
    engine = Engine()  # one engine behind both: response ids unique across the servers, as vLLM's are

    async def on(server, model, headers=(), **body):
        KnotsMiddleware.server = server
        body = {"model": model, "messages": [{"role": "user", "content": "one"}]} | body
        return await call(KnotsMiddleware(engine), body=body, headers=headers)

    async def main():
        settings = {"store": "sqlite", "state_dir": str(tmp_path / "state"), "store_poll_s": 3600}
        for n in ("a", "b"):
            (tmp_path / n).mkdir()
        a, b = (make_server(tmp_path / n, tiny_adapters, **settings) for n in ("a", "b"))
        try:
            assert a.store.location == b.store.location == str(tmp_path / "state/knots.sqlite3")
            assert (await admin(a, "POST", "/admin/experiments", {"name": "ab", "arms": ARMS}, KEY))[0] == 201
            assert "ab" not in b.experiments
            await b.store_sync.apply()
            assert "ab" in b.experiments and (await on(b, "ab", user="u1"))[0] == 200

            status, _, body = await on(a, "ab", headers=[(b"x-knots-arm", b"ta")])
            assert status == 200 and body["knots"] == {"experiment": "ab", "arm": "ta"}
            a.outcomes.flush()  # A writes which arm served the response off the event loop
            first = await admin(b, "POST", "/v1/feedback", {"id": body["id"], "score": 1.0}, KEY)
            assert first == (200, {"id": body["id"], "experiment": "ab", "arm": "ta", "recorded": True})
            again = await admin(a, "POST", "/v1/feedback", {"id": body["id"], "score": 1.0}, KEY)
            assert again[0] == 200 and again[1]["recorded"] is False
            status, error = await admin(b, "POST", "/v1/feedback", {"id": body["id"], "score": 0.5}, KEY)
            assert status == 409 and "one score per response" in error["error"]["message"]
            assert (await admin(b, "POST", "/v1/feedback", {"id": "resp-unknown", "score": 1.0}, KEY))[0] == 404
            for server in (a, b):
                report = (await admin(server, "GET", "/admin/experiments/ab/report", None, KEY))[1]
                assert report["arms"]["ta"]["feedback"]["n"] == 1 and report["arms"]["ta"]["feedback"]["mean"] == 1.0
        finally:
            KnotsMiddleware.server = None
            a.close()
            b.close()

    asyncio.run(main())
