"""What the replicas of one deployment share (docs/DEPLOY.md, "Several hosts"): the runtime changes of the task
table and of the experiments, the recipes, and A/B feedback (per (experiment, arm) n, Σ, Σ²; one score per
response; which arm served each response id, so feedback sent to any replica finds its arm).

A tiny abstract class (this module) and its backends, chosen by the config's `store` (backends.py):

- `files` (the default, one host): JSON files in state_dir (tasks.json, experiments.json, recipes.json,
  feedback.json), each written atomically (atomic.py); response ids in this process's memory (the last
  MAX_IDS).
- `sqlite` (sqlite_store.py; one host, several server processes): one SQLite database,
  state_dir/knots.sqlite3 (WAL); each write is one transaction; response ids kept RESPONSE_TTL_S.
- `redis://HOST:PORT/DB` (redis_store.py; `rediss://`, `unix:///PATH?db=N`), many hosts: every replica on one
  Redis (not a Cluster); each write is one transaction (MULTI/EXEC or a Lua script); response ids expire
  after RESPONSE_TTL_S.

Each write changes all of what it writes or nothing; a store that cannot be reached is a StoreUnavailable
(503) and changes nothing. `versions()` changes whenever a kind changes: servers poll it (`store_poll_s`) and
apply what changed (server/sync.py). A shared store (sqlite, redis) also holds composed merges' files for the
other replicas, with a lease on composing each one (merges/fleet.py).
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

from ...atomic import atomic_write_json
from ...compose import MergeError
from ...recipes import VERSION, RecipeBook, load_recipes, save_recipes
from ..errors import Unavailable

KINDS = ("tasks", "experiments", "recipes")  # what servers poll for, in the order they apply it
MAX_IDS = 100_000  # response ids a file store remembers for feedback
RESPONSE_TTL_S = 7 * 24 * 3600  # how long a Redis or SQLite store accepts feedback for a response
MAX_TRAFFIC = 10_000  # merges whose request counts a store keeps (the most requested; traffic.py)


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

    @abstractmethod
    def add_traffic(self, weights: dict[str, float]) -> None:
        """Add to each merge's (forward-decayed) request count (traffic.py); keeps the MAX_TRAFFIC highest."""

    @abstractmethod
    def popular(self, n: int) -> list[tuple[str, float]]:
        """The n merges with the highest counts, with their counts, highest first."""

    # --- composed merges shared by the fleet (merges/fleet.py); a store that shares none keeps these ---------
    shares_merges = False  # can hold merges' files for the other replicas

    def get_merge(self, key: str, ttl_s: float) -> dict[str, bytes] | None:
        """A shared merge's files (file name -> bytes), kept another ttl_s; None if none is shared."""
        return None

    def put_merge(self, key: str, files: dict[str, bytes], ttl_s: float) -> None:  # noqa: B027 (shares nothing)
        """Share a merge's files for ttl_s after their last read."""

    def claim_merge(self, key: str, token: str, ttl_s: float) -> bool:
        """Take the lease on composing a merge for ttl_s; False while another replica holds it."""
        return True

    def release_merge(self, key: str, token: str) -> None:  # noqa: B027 (no lease to give back)
        """Give the lease back, if still held with this token."""

    def close(self) -> None:  # noqa: B027 (a store without connections has nothing to close)
        """Let go of connections."""


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

    def add_traffic(self, weights):
        with self._lock:
            counts = read_json(self.path("traffic"), {})
            for model, w in weights.items():
                counts[model] = counts.get(model, 0.0) + w
            kept = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:MAX_TRAFFIC])
            self._write("traffic", kept)

    def popular(self, n):
        counts = read_json(self.path("traffic"), {})
        return sorted(counts.items(), key=lambda kv: -kv[1])[:n]

    def _write(self, kind, doc, write=atomic_write_json):
        """Write first, then change anything in memory: a failed write (disk full) leaves all as it was."""
        try:
            write(self.path(kind), doc)
        except OSError as e:
            raise StoreUnavailable(f"cannot save to {self.path(kind)}: {e.strerror or e}") from None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns  # an atomic write is a new inode, even within one mtime tick
