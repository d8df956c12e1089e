"""The `sqlite` store (store.py): one database in state_dir, shared by the server processes of one host."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ...compose import MergeError
from .store import MAX_TRAFFIC, RESPONSE_TTL_S, Store, StoreUnavailable, book_of_rows, recipe_rows

SCHEMA_VERSION = 3  # PRAGMA user_version of the databases this code writes; a change migrates the older ones
SCHEMA = (  # version 1
    "CREATE TABLE versions (kind TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    "CREATE TABLE added (kind TEXT, name TEXT, value TEXT NOT NULL, PRIMARY KEY (kind, name))",
    "CREATE TABLE removed (kind TEXT, name TEXT, PRIMARY KEY (kind, name))",
    "CREATE TABLE recipes (subset TEXT PRIMARY KEY, recipe TEXT NOT NULL)",
    "CREATE TABLE responses (id TEXT PRIMARY KEY, experiment TEXT NOT NULL, arm TEXT NOT NULL, score REAL,"
    " at REAL NOT NULL)",
    "CREATE INDEX responses_at ON responses (at)",  # pruning old ids: a range of the index, most often empty
    "CREATE TABLE feedback (experiment TEXT, arm TEXT, n INTEGER NOT NULL, s REAL NOT NULL, ss REAL NOT NULL,"
    " PRIMARY KEY (experiment, arm))",
)
MIGRATIONS = {  # version -> what brings a database of the version before to it
    1: SCHEMA,
    2: ("CREATE TABLE traffic (model TEXT PRIMARY KEY, score REAL NOT NULL)",),  # traffic.py
    3: (  # merges/fleet.py
        "CREATE TABLE merges (key TEXT, name TEXT, data BLOB NOT NULL, at REAL NOT NULL, PRIMARY KEY (key, name))",
        "CREATE INDEX merges_at ON merges (at)",
        "CREATE TABLE merge_leases (key TEXT PRIMARY KEY, token TEXT NOT NULL, until REAL NOT NULL)",
    ),
}


class SqliteStore(Store):
    """state_dir/knots.sqlite3, shared by the server processes of one host. Tables: versions (kind -> counter,
    bumped in the transaction of every write), added (kind, name -> JSON), removed (kind, name), recipes
    (subset -> JSON), responses (id -> experiment, arm, score, time), feedback ((experiment, arm) -> n, s, ss),
    traffic (model -> decayed request count), merges ((key, file name) -> bytes, last read), merge_leases (key ->
    the composing process's token, until when)."""

    shares_merges = True

    def __init__(self, state_dir: Path, busy_timeout_s: float = 5.0):
        self.path = Path(state_dir) / "knots.sqlite3"
        self.location = str(self.path)
        self._lock = threading.Lock()  # one connection, taken in turn by the server's worker threads
        with self._errors("open the database"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level None: no transaction opened behind our back; each write opens its own
            self.db = sqlite3.connect(self.path, busy_timeout_s, isolation_level=None, check_same_thread=False)
            self._wal(time.monotonic() + busy_timeout_s)
        with self._transaction("create the tables") as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                for statement in (st for v in range(version + 1, SCHEMA_VERSION + 1) for st in MIGRATIONS[v]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if version > SCHEMA_VERSION:
            self.db.close()
            raise MergeError(
                f"store {self.location}: schema version {version}, newer than this knots-serve's "
                f"({SCHEMA_VERSION}): upgrade knots-serve"
            )

    def _wal(self, deadline: float) -> None:
        """WAL: readers wait neither for the writer nor it for them. Processes opening a new database at once
        can be refused the switch without SQLite waiting on the lock (it would deadlock): try again."""
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _errors(self, what: str):
        try:
            yield
        except (sqlite3.Error, OSError) as e:  # locked past the busy timeout, disk full, not a database
            raise StoreUnavailable(f"store {self.location}: cannot {what}: {e}") from None

    @contextmanager
    def _transaction(self, what: str):
        """BEGIN IMMEDIATE takes the write lock before the first read, so no other process writes between what
        a transaction reads and what it writes; an error rolls all of it back."""
        with self._lock, self._errors(what):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.rollback()
                raise

    @contextmanager
    def _write(self, what: str, kind: str):
        """A transaction that bumps the kind's version with what it writes: the polls see every write."""
        with self._transaction(what) as db:
            yield db
            bump = "INSERT INTO versions VALUES (?, 1) ON CONFLICT (kind) DO UPDATE SET version = version + 1"
            db.execute(bump, (kind,))

    def _read(self, what: str, query: str, *args) -> list:
        with self._lock, self._errors(what):
            return self.db.execute(query, args).fetchall()

    def versions(self):
        return dict(self._read("read the versions", "SELECT kind, version FROM versions"))

    def overlay(self, kind):
        # one statement, so one snapshot of both tables; a removed name comes with the value NULL
        query = "SELECT name, value FROM added WHERE kind = ?1 UNION ALL SELECT name, NULL FROM removed WHERE kind = ?1"
        rows = self._read(f"read the {kind}", query, kind)
        return {n: json.loads(v) for n, v in rows if v is not None}, {n for n, v in rows if v is None}

    def put(self, kind, name, value):
        with self._write(f"save {kind} {name!r}", kind) as db:
            db.execute("INSERT OR REPLACE INTO added VALUES (?, ?, ?)", (kind, name, json.dumps(value)))
            db.execute("DELETE FROM removed WHERE kind = ? AND name = ?", (kind, name))

    def delete(self, kind, name, tombstone):
        with self._write(f"remove {kind} {name!r}", kind) as db:
            db.execute("DELETE FROM added WHERE kind = ? AND name = ?", (kind, name))
            if tombstone:
                db.execute("INSERT OR IGNORE INTO removed VALUES (?, ?)", (kind, name))

    def recipes(self):
        rows = self._read("read the recipes", "SELECT recipe FROM recipes")
        return book_of_rows([recipe for (recipe,) in rows], self.where("recipes"))

    def put_recipes(self, recipes):
        with self._write("save the recipes", "recipes") as db:
            db.executemany("INSERT OR REPLACE INTO recipes VALUES (?, ?)", recipe_rows(recipes).items())
        return self.recipes()

    def remember(self, response_id, experiment, arm):
        now = time.time()
        with self._transaction("remember the response") as db:
            db.execute(
                "INSERT INTO responses VALUES (?, ?, ?, NULL, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                (response_id, experiment, arm, now),
            )
            db.execute("DELETE FROM responses WHERE at < ?", (now - RESPONSE_TTL_S,))

    def record(self, response_id, score):
        score = float(score)
        with self._transaction("save the feedback") as db:
            row = db.execute("SELECT experiment, arm, score FROM responses WHERE id = ?", (response_id,)).fetchone()
            if row is None:
                raise KeyError(response_id)
            experiment, arm, before = row
            if before is None:
                db.execute("UPDATE responses SET score = ? WHERE id = ?", (score, response_id))
                db.execute(
                    "INSERT INTO feedback VALUES (?, ?, 1, ?, ?) ON CONFLICT (experiment, arm) DO UPDATE"
                    " SET n = n + 1, s = s + excluded.s, ss = ss + excluded.ss",
                    (experiment, arm, score, score * score),
                )
        return experiment, arm, before

    def feedback(self, experiment):
        query = "SELECT arm, n, s, ss FROM feedback WHERE experiment = ?"
        return {arm: [n, s, ss] for arm, n, s, ss in self._read("read the feedback", query, experiment)}

    def add_traffic(self, weights):
        with self._transaction("count the traffic") as db:
            db.executemany(
                "INSERT INTO traffic VALUES (?, ?) ON CONFLICT (model) DO UPDATE SET score = score + excluded.score",
                weights.items(),
            )
            db.execute(
                "DELETE FROM traffic WHERE model NOT IN (SELECT model FROM traffic ORDER BY score DESC LIMIT ?)",
                (MAX_TRAFFIC,),
            )

    def popular(self, n):
        query = "SELECT model, score FROM traffic ORDER BY score DESC LIMIT ?"
        return [tuple(row) for row in self._read("read the traffic", query, n)]

    def get_merge(self, key, ttl_s):
        now = time.time()
        with self._transaction("read a shared merge") as db:
            db.execute("DELETE FROM merges WHERE at < ?", (now - ttl_s,))
            rows = db.execute("SELECT name, data FROM merges WHERE key = ?", (key,)).fetchall()
            db.execute("UPDATE merges SET at = ? WHERE key = ?", (now, key))
        return {name: bytes(data) for name, data in rows} or None

    def put_merge(self, key, files, ttl_s):
        now = time.time()
        with self._transaction("share a merge") as db:
            db.execute("DELETE FROM merges WHERE key = ? OR at < ?", (key, now - ttl_s))
            db.executemany("INSERT INTO merges VALUES (?, ?, ?, ?)", [(key, n, d, now) for n, d in files.items()])

    def claim_merge(self, key, token, ttl_s):
        now = time.time()
        with self._transaction("take a compose lease") as db:
            db.execute("DELETE FROM merge_leases WHERE key = ? AND until < ?", (key, now))
            taken = db.execute("INSERT OR IGNORE INTO merge_leases VALUES (?, ?, ?)", (key, token, now + ttl_s))
            return taken.rowcount == 1

    def release_merge(self, key, token):
        with self._transaction("give a compose lease back") as db:
            db.execute("DELETE FROM merge_leases WHERE key = ? AND token = ?", (key, token))

    def close(self):
        with self._lock:
            self.db.close()
