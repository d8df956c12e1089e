"""The `redis://` store (store.py): every replica of a deployment on one Redis."""

from __future__ import annotations

import json
import re

from ...compose import MergeError
from .store import MAX_TRAFFIC, RESPONSE_TTL_S, Store, StoreUnavailable, book_of_rows, recipe_rows

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
# a lease given back only by its holder: KEYS[1] the lease, ARGV[1] the holder's token
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""


class RedisStore(Store):
    """Keys under `knots:`: {kind}:added (hash name -> JSON), {kind}:removed (set), recipes (hash subset ->
    JSON), versions (hash kind -> counter, bumped in the transaction of every write), response:{id} (hash
    experiment, arm, score), feedback:{experiment} (hash ARM:n|s|ss), traffic (sorted set model -> decayed count),
    merge:{key} (hash file name -> bytes, expiring), merge-lease:{key} (the composing replica's token, expiring)."""

    shares_merges = True

    def __init__(self, url: str, prefix: str = "knots:"):
        self.location = re.sub(r"//[^/@]*@", "//", url)  # without user and password
        try:
            import redis
        except ImportError:
            raise MergeError(f"store {self.location}: needs the redis client: pip install knots-serve[redis]") from None
        self.prefix, self._errors = prefix, redis.RedisError
        self.db = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2)
        self._record = self.db.register_script(RECORD)
        self.raw = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=2)  # merges' bytes, as bytes
        self._release = self.raw.register_script(RELEASE)

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

    def add_traffic(self, weights):
        def run():
            key = self._key("traffic")
            with self.db.pipeline(transaction=True) as p:
                for model, w in weights.items():
                    p.zincrby(key, w, model)
                p.zremrangebyrank(key, 0, -MAX_TRAFFIC - 1).execute()

        self._run("count the traffic", run)

    def popular(self, n):
        rows = self._run("read the traffic", lambda: self.db.zrevrange(self._key("traffic"), 0, n - 1, withscores=True))
        return [(model, float(score)) for model, score in rows]

    def get_merge(self, key, ttl_s):
        name, ttl = self._key("merge", key), max(1, int(ttl_s))  # EXPIRE takes whole seconds; 0 would delete

        def run():
            with self.raw.pipeline(transaction=True) as p:
                return p.hgetall(name).expire(name, ttl).execute()[0]

        files = self._run("read a shared merge", run)
        return {name.decode(): data for name, data in files.items()} or None

    def put_merge(self, key, files, ttl_s):
        name, ttl = self._key("merge", key), max(1, int(ttl_s))

        def run():
            with self.raw.pipeline(transaction=True) as p:
                p.delete(name).hset(name, mapping=files).expire(name, ttl).execute()

        self._run("share a merge", run)

    def claim_merge(self, key, token, ttl_s):
        claim = lambda: self.db.set(self._key("merge-lease", key), token, nx=True, px=int(ttl_s * 1000))  # noqa: E731
        return bool(self._run("take a compose lease", claim))

    def release_merge(self, key, token):
        self._run("give a compose lease back", lambda: self._release([self._key("merge-lease", key)], [token]))

    def close(self):
        self.db.close()
        self.raw.close()
