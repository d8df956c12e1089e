"""Runtime tables that survive restarts and are shared by replicas: the task table and the experiments, kept in
the server's store (store.py).

Each is the config's entries plus the runtime changes, and the store records only the changes
({"added": {name: value}, "removed": [name]}), so the table is always `config - removed + added`, and
editing the config later still means what it says.
"""

from __future__ import annotations

from .store import Store


class Overlay:
    """A name -> JSON value table: config entries overlaid by the runtime changes in the store. Blocking (the
    store may be remote): call it off the event loop."""

    def __init__(self, config: dict, store: Store, kind: str):
        self.config, self.store, self.kind = dict(config), store, kind
        self.reload()

    def reload(self) -> None:
        """Read the changes again (another replica's included)."""
        self.added, self.removed = self.store.overlay(self.kind)

    def items(self) -> dict:
        return {n: v for n, v in self.config.items() if n not in self.removed} | self.added

    def put(self, name: str, value) -> None:
        """Write first, then change the table: a failed write (disk full, store away) leaves both as they were."""
        self.store.put(self.kind, name, value)
        self.added, self.removed = self.added | {name: value}, self.removed - {name}

    def delete(self, name: str) -> None:
        tombstone = name in self.config
        self.store.delete(self.kind, name, tombstone)
        self.added = {n: v for n, v in self.added.items() if n != name}
        self.removed = self.removed | ({name} if tombstone else set())


def task_table(config_tasks: dict, store: Store) -> Overlay:
    return Overlay({n: str(p) for n, p in config_tasks.items()}, store, "tasks")


def experiment_table(config_experiments: dict, store: Store) -> Overlay:
    return Overlay({n: e.model_dump() for n, e in config_experiments.items()}, store, "experiments")
