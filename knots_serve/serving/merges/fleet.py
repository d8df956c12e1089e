"""Composed merges shared by the replicas of a deployment, so that the fleet composes each merge once
(docs/DEPLOY.md, "A fleet composes each merge once").

A replica that composes a merge publishes its adapter files under a key of what they are made of: the merge's
canonical name, the pool's fingerprint (a hash of every task's factors, the same on every host that serves the
same adapters) and, for a data-aware merge, the statistics files' names (which hold their adapter and data
digests). A merge of at most `fleet_inline_bytes` goes into the store itself (a shared one: sqlite or redis); a
larger one into `fleet_dir`, a directory every replica mounts. Another replica's miss for the merge loads those
files instead of composing. Shared merges expire `fleet_ttl_s` after their last read.

While a replica composes a merge it holds a lease in the store (LEASE_S): a replica that misses the same merge
meanwhile waits for the publication instead of composing it too, until the lease is given back (the compose
failed, or the merge was too large to share: it composes then) or runs out (a replica that died composing).

Between replicas the fleet is an optimisation, never a dependency: a store or a directory that cannot be reached,
or files that do not read back, mean the merge is composed here, as with no fleet (counted, and logged once per
kind). Where one engine's workers span hosts (`required`, engine/fleet_files.py) it is how they get the merge: a
merge is published before vLLM is told of it, and one that cannot be is an error (503).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ...atomic import atomic_write_dir
from .. import metrics
from ..errors import Unavailable

log = logging.getLogger("vllm.knots_serve")  # under vLLM's logger: its handler and level apply
LEASE_S = 30.0  # the longest a replica waits for another's compose of the same merge (one that died composing)
POLL_S = 0.05  # how often a waiting replica looks for the publication


def fleet_key(canonical: str, pool: str, stats: tuple[str, ...]) -> str:
    """What a merge's shared files are named by. A statistics tag is `name@mtime`; the name alone holds the
    digests, and mtimes differ between hosts."""
    names = tuple(s.partition("@")[0] for s in stats)
    return hashlib.sha256(f"{canonical}\0{pool}\0{names}".encode()).hexdigest()[:32]


class Fleet:
    def __init__(
        self,
        store,
        fleet_dir: Path | None = None,
        inline_bytes: int = 32 << 20,
        ttl_s: float = 86400,
        required: bool = False,
    ):
        """store: the deployment's (state/store.py), or None: no fleet. required: the workers of other nodes
        load the merges from the fleet (engine/fleet_files.py), so each is published before it is served, and
        one that cannot be is an error (503), never a merge those workers cannot find."""
        self.store, self.dir, self.inline_bytes, self.ttl_s = store, fleet_dir, inline_bytes, ttl_s
        self.shared = store is not None and store.shares_merges and inline_bytes > 0  # merges in the store itself
        self.on, self.required = self.shared or fleet_dir is not None, required
        self._warned: set[str] = set()

    def load_or_make(self, key: str, path: Path, make: Callable[[], None]) -> str:
        """The merge's files at `path`: loaded from the fleet ("fleet"), or made here by make() and published
        ("composed")."""
        if self.on:
            source = self._load_or_make(key, path, make)
        else:
            make()
            source = "composed"
        metrics.FLEET.labels("loaded" if source == "fleet" else "composed").inc()
        return source

    def _load_or_make(self, key: str, path: Path, make: Callable[[], None]) -> str:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + LEASE_S
        while True:
            if self._load(key, path):
                return "fleet"
            if self._claim(key, token) or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)  # another replica composes it: wait for its files (a compose thread; no loop blocked)
        if self._load(key, path):  # published between the look and the lease
            self._release(key, token)
            return "fleet"
        try:
            make()
            files = {f.name: f.read_bytes() for f in path.iterdir()}  # now: the cache may evict `path` after
        except BaseException:
            self._release(key, token)
            raise
        if self.required:  # before vLLM is told of it: the other nodes' workers read it from the fleet
            try:
                self._publish(key, files, token)
            except Unavailable:
                shutil.rmtree(path, ignore_errors=True)
                raise
        else:  # beside the response
            threading.Thread(target=self._publish, args=(key, files, token), daemon=True, name="knots-fleet").start()
        return "composed"

    # --- the two places a merge is shared ---------------------------------------------------------------
    def fetch(self, key: str) -> dict[str, bytes] | None:
        """The files shared under `key` (file name -> bytes), or None. Unavailable or OSError if the store or
        the directory cannot be read."""
        if self.shared and (files := self.store.get_merge(key, self.ttl_s)) is not None:
            return files
        entry = self.dir / key if self.dir is not None else None
        if entry is not None and entry.is_dir():
            os.utime(entry)  # read now: kept another ttl_s
            return {f.name: f.read_bytes() for f in entry.iterdir()}
        return None

    def publish(self, key: str, files: dict[str, bytes]) -> bool:
        """Share files under `key`: in the store up to inline_bytes, else in fleet_dir; False if neither takes
        them. Unavailable if the store or the directory cannot be written."""
        size = sum(map(len, files.values()))
        try:
            if self.shared and size <= self.inline_bytes:
                self.store.put_merge(key, files, self.ttl_s)
            elif self.dir is not None:
                atomic_write_dir(self.dir / key, lambda tmp: [(tmp / n).write_bytes(d) for n, d in files.items()])
                self._prune()
            else:
                metrics.FLEET.labels("unshared").inc()
                return False
        except OSError as e:
            raise Unavailable(f"cannot write the fleet directory {self.dir}: {e.strerror or e}") from None
        metrics.FLEET.labels("published").inc()
        return True

    def _load(self, key: str, path: Path) -> bool:
        try:
            files = self.fetch(key)
            if files is not None:
                atomic_write_dir(path, lambda tmp: [(tmp / n).write_bytes(d) for n, d in files.items()])
                return True
        except (Unavailable, OSError) as e:  # the store or the volume away, the entry pruned meanwhile
            self._warn("read", e)
        return False

    def _publish(self, key: str, files: dict[str, bytes], token: str) -> None:
        """Publish, then give the lease back. With `required`, a merge that is not published is an error."""
        try:
            shared = self.publish(key, files)
        except Unavailable as e:
            self._warn("publish", e)
            if self.required:
                raise Unavailable(f"the merge cannot be sent to the other nodes: {e}") from None
            return
        finally:
            self._release(key, token)
        if not shared and self.required:
            size = sum(map(len, files.values()))
            raise Unavailable(
                f"the merge ({size / 2**20:.1f} MiB) cannot be sent to the other nodes: it is above "
                f"fleet_inline_bytes ({self.inline_bytes}) and no fleet_dir is set"
            )

    def _prune(self) -> None:
        """Drop the directory's merges unread for ttl_s (any replica may: each is a whole directory)."""
        cutoff = time.time() - self.ttl_s
        for entry in self.dir.iterdir():
            try:
                if not entry.name.startswith(".") and entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry)
            except OSError:  # pruned by another replica meanwhile
                continue

    # --- the lease ------------------------------------------------------------------------------------------
    def _claim(self, key: str, token: str) -> bool:
        try:
            return self.store.claim_merge(key, token, LEASE_S)
        except Unavailable as e:
            self._warn("lease", e)
            return True  # nobody to coordinate with: compose here

    def _release(self, key: str, token: str) -> None:
        try:
            self.store.release_merge(key, token)
        except Unavailable as e:  # the lease runs out by itself
            self._warn("lease", e)

    def _warn(self, what: str, e: Exception) -> None:
        metrics.FLEET.labels("error").inc()
        if what not in self._warned:
            self._warned.add(what)
            log.warning("the fleet's shared merges: cannot %s (%s); merges are composed here meanwhile", what, e)
