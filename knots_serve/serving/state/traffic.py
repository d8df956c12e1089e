"""How often each merge is asked for, kept in the store, so that a server that starts, restarts or joins can
prewarm what was popular (server/prewarm.py). Counts are forward-decayed (Cormode et al., ICDE 2009): a
request at time t adds 2^((t − EPOCH) / HALF_LIFE_S), so ranking the sums ranks the counts decayed to any
one time, with a week's half-life, and a store only ever adds — one ZINCRBY, one upsert, one JSON merge,
whichever the backend. Requests are counted in memory and added to the store at each poll (sync.py)."""

from __future__ import annotations

import threading
import time
from collections import Counter

from .store import Store, StoreUnavailable

HALF_LIFE_S = 7 * 24 * 3600
EPOCH = 1_790_000_000  # 2026-09; weights reach float64's limit after 1024 half-lives (~19 years): move it before


def weight(now: float | None = None) -> float:
    return 2.0 ** (((time.time() if now is None else now) - EPOCH) / HALF_LIFE_S)


class Traffic:
    def __init__(self):
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()

    def count(self, model: str, now: float | None = None) -> None:
        with self._lock:
            self._pending[model] += weight(now)

    def flush(self, store: Store) -> None:
        """Add what was counted since the last flush to the store; kept for the next one if it is away."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return
        try:
            store.add_traffic(dict(pending))
        except StoreUnavailable:
            with self._lock:
                self._pending.update(pending)
            raise
