"""How many never-seen merges one client may start: a token bucket per client (`new_merge_rate` per second,
bursts of `new_merge_burst`). Each new merge costs a compose (CPU or GPU seconds and cache bytes); cached
merges, the base and the adapters are never limited. Past the rate: HTTP 429 with Retry-After."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

from ..errors import TooManyRequests


class RateLimit:
    def __init__(self, rate: float, burst: int, max_clients: int = 10_000):
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str, now: float | None = None) -> None:
        """Spend one token of `client`'s bucket, or raise TooManyRequests naming when to retry."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                wait = max(1, math.ceil((1 - tokens) / self.rate))
                raise TooManyRequests(
                    f"too many new merges from this client: at most {self.burst} at once, then "
                    f"{self.rate:g} per second (new_merge_rate); cached merges are not limited; "
                    f"retry in {wait} s",
                    retry_after=wait,
                )
            self._buckets[client] = (tokens - 1, now)
            while len(self._buckets) > self.max_clients:  # the least recently seen client starts afresh
                self._buckets.popitem(last=False)
