"""The store backends by the config's `store` value: `files`, `sqlite`, or a Redis URL (store.py says what each
is). A factory apart from the contract, so the contract imports none of its implementations."""

from __future__ import annotations

from pathlib import Path

from .store import FileStore, Store

REMOTE = ("redis://", "rediss://", "unix://")


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
    if spec == "sqlite":
        from .sqlite_store import SqliteStore

        return SqliteStore(state_dir)
    from .redis_store import RedisStore

    return RedisStore(spec)
