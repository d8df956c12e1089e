"""The task registry: the config's tasks plus runtime registrations, persisted atomically.

The state file records only runtime changes ({"added": {name: path}, "removed": [name]}), so the pool is
always `config tasks - removed + added`, and editing the config later still means what it says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..adapters import AdapterError

STATE_NAME = "tasks.json"


class TaskRegistry:
    def __init__(self, config_tasks: dict[str, Path], state_dir: Path):
        self.config_tasks = dict(config_tasks)
        self.path = state_dir / STATE_NAME
        self.added: dict[str, Path] = {}
        self.removed: set[str] = set()
        if self.path.exists():
            try:
                state = json.loads(self.path.read_text())
                self.added = {n: Path(p) for n, p in state.get("added", {}).items()}
                self.removed = set(state.get("removed", []))
            except (OSError, ValueError, AttributeError) as e:
                raise AdapterError(f"unreadable task registry {self.path}: {e}") from None

    def tasks(self) -> dict[str, Path]:
        pool = {n: p for n, p in self.config_tasks.items() if n not in self.removed}
        return pool | self.added

    def add(self, name: str, path: Path) -> None:
        self.added[name] = path
        self.removed.discard(name)
        self._save()

    def remove(self, name: str) -> None:
        self.added.pop(name, None)
        if name in self.config_tasks:
            self.removed.add(name)
        self._save()

    def _save(self) -> None:
        """Write to a temporary file, fsync, rename: after a crash the file is the old or the new state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        doc = {"added": {n: str(p) for n, p in self.added.items()}, "removed": sorted(self.removed)}
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
