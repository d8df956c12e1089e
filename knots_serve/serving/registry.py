"""Runtime state that survives restarts: the task table and the experiments, persisted atomically (atomic.py).

Each is the config's entries plus the runtime changes, and the state file records only the changes
({"added": {name: value}, "removed": [name]}), so the table is always `config - removed + added`, and
editing the config later still means what it says.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_json
from ..compose import MergeError


def read_json(path: Path, default):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MergeError(f"unreadable state file {path}: {e}") from None


class Overlay:
    """A name -> JSON value table: config entries overlaid by persisted runtime changes."""

    def __init__(self, config: dict, path: Path):
        self.config, self.path = dict(config), path
        state = read_json(path, {})
        if not isinstance(state, dict):
            raise MergeError(f"unreadable state file {path}: not an object")
        self.added: dict = dict(state.get("added", {}))
        self.removed: set[str] = set(state.get("removed", []))

    def items(self) -> dict:
        return {n: v for n, v in self.config.items() if n not in self.removed} | self.added

    def put(self, name: str, value) -> None:
        self._save(self.added | {name: value}, self.removed - {name})

    def delete(self, name: str) -> None:
        added = {n: v for n, v in self.added.items() if n != name}
        self._save(added, self.removed | ({name} if name in self.config else set()))

    def _save(self, added: dict, removed: set[str]) -> None:
        """Write first, then change the table: a failed write (disk full) leaves both as they were."""
        atomic_write_json(self.path, {"added": added, "removed": sorted(removed)})
        self.added, self.removed = added, removed


def task_table(config_tasks: dict[str, Path], state_dir: Path) -> Overlay:
    return Overlay({n: str(p) for n, p in config_tasks.items()}, state_dir / "tasks.json")


def experiment_table(config_experiments: dict, state_dir: Path) -> Overlay:
    return Overlay({n: e.model_dump() for n, e in config_experiments.items()}, state_dir / "experiments.json")
