"""Which cached merge to drop first: GreedyDual-Size-Frequency (Cherkasova 1998), for caches whose entries
differ in what a miss costs and in what they take. Each entry's priority is

    H = L + frequency × cost / size

with `cost` the seconds its miss takes again (its compose, or its basis build), `size` its bytes, and `L` a
clock that rises to the priority of each entry evicted. A popular merge stays; one expensive to compose
stays longer than a cheap one used as often; a big one goes before a small one of the same worth; and an
entry hit long ago ages out, since every later entry starts from a higher L. Plain LRU (what the server had
before) keeps a merge asked for once over one asked for a hundred times if it came later.

Pure bookkeeping, no locks: the caches call it under their own lock."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

MIN_COST_S = 1e-3  # a cost measured as ~0 (a cached file linked) still counts: frequency must matter


@dataclass
class Entry:
    cost: float  # seconds a miss of this entry costs
    size: int  # bytes
    hits: int = 1
    priority: float = 0.0
    last_used: float = 0.0  # wall-clock time of the last add or hit (shown to operators, not used to evict)


class GreedyDualSizeFrequency:
    def __init__(self):
        self.clock = 0.0  # L: the priority of the last entry evicted
        self.entries: dict[Hashable, Entry] = {}

    def __contains__(self, key) -> bool:
        return key in self.entries

    def add(self, key, cost: float, size: int, hits: int = 1) -> None:
        """A new entry; hits=0 for one nobody asked for yet (composed speculatively): priority L, the first to go."""
        e = self.entries[key] = Entry(max(cost, MIN_COST_S), max(size, 1), hits, last_used=time.time())
        e.priority = self._priority(e)

    def hit(self, key) -> None:
        e = self.entries[key]
        e.hits += 1
        e.last_used = time.time()
        e.priority = self._priority(e)

    def remove(self, key) -> None:
        self.entries.pop(key, None)

    def victims(self, limit: int, evictable: Callable[[Hashable], bool]) -> list:
        """Keys to evict, lowest priority first, until the entries' bytes fit `limit`; entries for which
        `evictable(key)` is false (in use, just added) are passed over. Removes them and advances the clock."""
        size = sum(e.size for e in self.entries.values())
        out = []
        for key, e in sorted(self.entries.items(), key=lambda kv: kv[1].priority):
            if size <= limit:
                break
            if evictable(key):
                out.append(key)
                size -= e.size
                self.clock = max(self.clock, e.priority)
                del self.entries[key]
        return out

    def _priority(self, e: Entry) -> float:
        return self.clock + e.hits * e.cost / e.size
