"""What the replicas of one deployment share (docs/DEPLOY.md, "Several hosts"): the runtime changes of the task
table and of the experiments, the recipes, and A/B feedback (per (experiment, arm) n, Σ, Σ²; one score per
response; which arm served each response id, so feedback sent to any replica finds its arm).

A tiny abstract class and its backends, chosen by the config's `store`:

- `files` (the default, one host): JSON files in state_dir (tasks.json, experiments.json, recipes.json,
  feedback.json), each written atomically (atomic.py); response ids in this process's memory (the last
  MAX_IDS).
- `sqlite` (one host, several server processes): one SQLite database, state_dir/knots.sqlite3 (WAL); each
  write is one transaction; response ids kept RESPONSE_TTL_S.
- `redis://HOST:PORT/DB` (`rediss://`, `unix:///PATH?db=N`), many hosts: every replica on one Redis (not a
  Cluster); each write is one transaction (MULTI/EXEC or a Lua script); response ids expire after
  RESPONSE_TTL_S.

Each write changes all of what it writes or nothing; a store that cannot be reached is a StoreUnavailable
(503) and changes nothing. `versions()` changes whenever a kind changes: servers poll it (`store_poll_s`) and
apply what changed (KnotsServer.sync).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..atomic import atomic_write_json
from ..compose import MergeError
from ..recipes import VERSION, RecipeBook, load_recipes, save_recipes
from .errors import Unavailable

KINDS = ("tasks", "experiments", "recipes")  # what servers poll for, in the order they apply it
REMOTE = ("redis://", "rediss://", "unix://")
MAX_IDS = 100_000  # response ids a file store remembers for feedback
RESPONSE_TTL_S = 7 * 24 * 3600  # how long a Redis or SQLite store accepts feedback for a response


class StoreUnavailable(Unavailable):
    """The store cannot be read or written (HTTP 503); nothing was changed."""


class Store(ABC):
    location: str  # where the state is, for messages (no password)

    @abstractmethod
    def versions(self) -> dict:
        """kind -> a value that changes whenever that kind changes (KINDS)."""

    @abstractmethod
    def overlay(self, kind: str) -> tuple[dict, set[str]]:
        """The runtime changes of a table ("tasks", "experiments"): (added name -> value, removed names)."""

    @abstractmethod
    def put(self, kind: str, name: str, value) -> None:
        """Add or replace an entry (and un-remove it)."""

    @abstractmethod
    def delete(self, kind: str, name: str, tombstone: bool) -> None:
        """Drop an added entry; `tombstone`: also record the name as removed (a config entry)."""

    @abstractmethod
    def recipes(self) -> RecipeBook:
        """MergeError for recipes that do not parse (naming where they are)."""

    @abstractmethod
    def put_recipes(self, recipes) -> RecipeBook:
        """Add or replace recipes (one per subset); the book after the write."""

    @abstractmethod
    def remember(self, response_id: str, experiment: str, arm: str) -> None:
        """Which arm served a response, for its feedback."""

    @abstractmethod
    def record(self, response_id: str, score: float) -> tuple[str, str, float | None]:
        """(experiment, arm, the score the response had before or None): a response's first score is added to
        its arm's aggregates, a later one changes nothing. KeyError for an id not remembered."""

    @abstractmethod
    def feedback(self, experiment: str) -> dict[str, list[float]]:
        """arm -> [n, Σ score, Σ score²]."""

    def where(self, kind: str) -> str:
        return f"{self.location} ({kind})"

    def close(self) -> None:  # noqa: B027 (a store without connections has nothing to close)
        """Let go of connections."""


def check_store(spec: str) -> str:
    if spec not in ("files", "sqlite") and not spec.startswith(REMOTE):
        raise ValueError(
            f"store {spec!r}: use 'files' (JSON in state_dir, one process), 'sqlite' (state_dir/knots.sqlite3, "
            "the processes of one host) or redis://HOST:PORT/DB"
        )
    return spec


def open_store(spec: str, state_dir: Path) -> Store:
    if check_store(spec) == "files":
        return FileStore(state_dir)
    return SqliteStore(state_dir) if spec == "sqlite" else RedisStore(spec)


def recipe_rows(recipes) -> dict[str, str]:
    """A database's rows for recipes: subset key -> JSON of the recipe."""
    return {r.key: json.dumps(asdict(r)) for r in recipes}


def book_of_rows(rows, where: str) -> RecipeBook:
    try:
        return RecipeBook.from_json({"version": VERSION, "recipes": [json.loads(v) for v in rows]})
    except ValueError as e:  # MergeError is a ValueError
        raise MergeError(f"unreadable recipes in {where}: {e}") from None


def read_json(path: Path, default):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MergeError(f"unreadable state file {path}: {e}") from None


class FileStore(Store):
    def __init__(self, state_dir: Path, max_ids: int = MAX_IDS):
        self.dir, self.location, self.max_ids = Path(state_dir), str(state_dir), max_ids
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, tuple[str, str, float | None]] = OrderedDict()
        self._feedback: dict = read_json(self.path("feedback"), {})  # exp -> arm -> [n, Σ, Σ²]

    def path(self, kind: str) -> Path:
        return self.dir / f"{kind}.json"

    def where(self, kind: str) -> str:
        return str(self.path(kind))

    def versions(self) -> dict:
        return {k: _stamp(self.path(k)) for k in KINDS}

    def overlay(self, kind):
        state = read_json(self.path(kind), {})
        if not isinstance(state, dict):
            raise MergeError(f"unreadable state file {self.path(kind)}: not an object")
        return dict(state.get("added", {})), set(state.get("removed", []))

    def put(self, kind, name, value):
        with self._lock:
            added, removed = self.overlay(kind)
            self._write(kind, {"added": added | {name: value}, "removed": sorted(removed - {name})})

    def delete(self, kind, name, tombstone):
        with self._lock:
            added, removed = self.overlay(kind)
            added.pop(name, None)
            self._write(kind, {"added": added, "removed": sorted(removed | ({name} if tombstone else set()))})

    def recipes(self):
        return load_recipes(self.path("recipes"))

    def put_recipes(self, recipes):
        with self._lock:
            book = self.recipes().with_recipes(recipes)  # never replaces a file it cannot read
            self._write("recipes", book, save_recipes)
            return book

    def remember(self, response_id, experiment, arm):
        with self._lock:
            self._ids[response_id] = (experiment, arm, None)
            while len(self._ids) > self.max_ids:
                self._ids.popitem(last=False)

    def record(self, response_id, score):
        with self._lock:
            experiment, arm, before = self._ids[response_id]  # KeyError: not served here (or forgotten)
            if before is None:
                n, s, ss = self._feedback.get(experiment, {}).get(arm, [0, 0.0, 0.0])
                new = {e: dict(arms) for e, arms in self._feedback.items()}
                new.setdefault(experiment, {})[arm] = [n + 1, s + score, ss + score * score]
                self._write("feedback", new)
                self._feedback, self._ids[response_id] = new, (experiment, arm, score)
        return experiment, arm, before

    def feedback(self, experiment):
        with self._lock:
            return {arm: list(v) for arm, v in self._feedback.get(experiment, {}).items()}

    def _write(self, kind, doc, write=atomic_write_json):
        """Write first, then change anything in memory: a failed write (disk full) leaves all as it was."""
        try:
            write(self.path(kind), doc)
        except OSError as e:
            raise StoreUnavailable(f"cannot save to {self.path(kind)}: {e.strerror or e}") from None


# one score per response, atomically: KEYS[1] the response's hash, ARGV: feedback key prefix, score, score²
RECORD = """
local r = redis.call('HMGET', KEYS[1], 'experiment', 'arm', 'score')
if not r[1] then return nil end
if r[3] then return {r[1], r[2], r[3]} end
redis.call('HSET', KEYS[1], 'score', ARGV[2])
local f = ARGV[1] .. r[1]
redis.call('HINCRBY', f, r[2] .. ':n', 1)
redis.call('HINCRBYFLOAT', f, r[2] .. ':s', ARGV[2])
redis.call('HINCRBYFLOAT', f, r[2] .. ':ss', ARGV[3])
return {r[1], r[2]}
"""


class RedisStore(Store):
    """Keys under `knots:`: {kind}:added (hash name -> JSON), {kind}:removed (set), recipes (hash subset ->
    JSON), versions (hash kind -> counter, bumped in the transaction of every write), response:{id} (hash
    experiment, arm, score), feedback:{experiment} (hash ARM:n|s|ss)."""

    def __init__(self, url: str, prefix: str = "knots:"):
        self.location = re.sub(r"//[^/@]*@", "//", url)  # without user and password
        try:
            import redis
        except ImportError:
            raise MergeError(f"store {self.location}: needs the redis client: pip install knots-serve[redis]") from None
        self.prefix, self._errors = prefix, redis.RedisError
        self.db = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2)
        self._record = self.db.register_script(RECORD)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _run(self, what: str, fn):
        try:
            return fn()
        except self._errors as e:
            raise StoreUnavailable(f"store {self.location}: cannot {what}: {e}") from None

    def _write(self, what: str, kind: str, ops) -> None:
        """ops(pipeline) queues the writes; they and the kind's version bump are one MULTI/EXEC."""

        def run():
            with self.db.pipeline(transaction=True) as p:
                ops(p)
                p.hincrby(self._key("versions"), kind, 1)
                p.execute()

        self._run(what, run)

    def versions(self):
        return self._run("read the versions", lambda: self.db.hgetall(self._key("versions")))

    def overlay(self, kind):
        def run():
            with self.db.pipeline(transaction=True) as p:
                return p.hgetall(self._key(kind, "added")).smembers(self._key(kind, "removed")).execute()

        added, removed = self._run(f"read the {kind}", run)
        return {n: json.loads(v) for n, v in added.items()}, set(removed)

    def put(self, kind, name, value):
        def ops(p):
            p.hset(self._key(kind, "added"), name, json.dumps(value)).srem(self._key(kind, "removed"), name)

        self._write(f"save {kind} {name!r}", kind, ops)

    def delete(self, kind, name, tombstone):
        def ops(p):
            p.hdel(self._key(kind, "added"), name)
            if tombstone:
                p.sadd(self._key(kind, "removed"), name)

        self._write(f"remove {kind} {name!r}", kind, ops)

    def recipes(self):
        rows = self._run("read the recipes", lambda: self.db.hgetall(self._key("recipes")))
        return book_of_rows(rows.values(), self.where("recipes"))

    def put_recipes(self, recipes):
        docs = recipe_rows(recipes)
        self._write("save the recipes", "recipes", lambda p: p.hset(self._key("recipes"), mapping=docs))
        return self.recipes()

    def remember(self, response_id, experiment, arm):
        def run():
            key = self._key("response", response_id)
            with self.db.pipeline(transaction=True) as p:
                p.hsetnx(key, "experiment", experiment).hsetnx(key, "arm", arm).expire(key, RESPONSE_TTL_S).execute()

        self._run("remember the response", run)

    def record(self, response_id, score):
        args = [self._key("feedback", ""), repr(float(score)), repr(float(score) * float(score))]
        got = self._run("save the feedback", lambda: self._record([self._key("response", response_id)], args))
        if got is None:
            raise KeyError(response_id)
        return got[0], got[1], float(got[2]) if len(got) > 2 else None

    def feedback(self, experiment):
        rows = self._run("read the feedback", lambda: self.db.hgetall(self._key("feedback", experiment)))
        out: dict[str, list[float]] = {}
        for field, value in rows.items():
            arm, _, stat = field.rpartition(":")
            out.setdefault(arm, [0, 0.0, 0.0])[("n", "s", "ss").index(stat)] = float(value)
        return {arm: [int(n), s, ss] for arm, (n, s, ss) in out.items()}

    def close(self):
        self.db.close()


SCHEMA_VERSION = 1  # PRAGMA user_version of the databases this code writes; a change migrates the older ones
SCHEMA = (
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


class SqliteStore(Store):
    """state_dir/knots.sqlite3, shared by the server processes of one host. Tables: versions (kind -> counter,
    bumped in the transaction of every write), added (kind, name -> JSON), removed (kind, name), recipes
    (subset -> JSON), responses (id -> experiment, arm, score, time), feedback ((experiment, arm) -> n, s, ss)."""

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
            if version == 0:
                for statement in SCHEMA:
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

    def close(self):
        with self._lock:
            self.db.close()


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns  # an atomic write is a new inode, even within one mtime tick
