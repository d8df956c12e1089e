"""The drain gate: every inference request holds it shared for its whole life; a weight swap or a pool
change holds it exclusively, so every response is computed on one set of weights."""

import asyncio
import contextlib

from ..errors import Unavailable


class Gate:
    """Requests hold the gate shared for their whole life; a weight swap holds it exclusively: it stops
    new requests at the door, waits for those inside to finish, swaps, and reopens. So every response
    is computed on one consistent set of weights and routed by the state that matches them."""

    def __init__(self):
        self._cond = asyncio.Condition()
        self._inside, self._closed = 0, False

    @property
    def inside(self) -> int:
        """Requests holding the gate now (those a drain waits for)."""
        return self._inside

    @contextlib.asynccontextmanager
    async def shared(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._closed)
            self._inside += 1
        try:
            yield
        finally:
            async with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self, timeout: float):
        """Raises Unavailable, reopened and with nothing changed, if the requests inside are not done in
        `timeout` s (a client that never reads its stream must not hold a swap, and the door, forever)."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._closed)
            self._closed = True
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self._inside == 0), timeout)
            except asyncio.TimeoutError:
                self._closed = False
                self._cond.notify_all()
                raise Unavailable(
                    f"{self._inside} request(s) still in flight after the drain timeout "
                    f"({timeout:g} s, drain_timeout_s); nothing changed, try again",
                    retry_after=1,
                    param=None,
                ) from None
        try:
            yield
        finally:
            async with self._cond:
                self._closed = False
                self._cond.notify_all()
