"""The API server processes of one vLLM server kept in step (`--api-server-count N`, or vLLM's default of one per
data-parallel engine). Each process runs its own KnotsServer: its own LoRA table, merge cache and drain gate.
What one of them changes through the admin API, every other one serves before that call answers; a weight
swap drains them all (docs/DEPLOY.md, "Several API servers").

They meet in a directory (launch.py sets GROUP_ENV): each listens on a unix socket there, `<index>.sock`. The
process that takes an admin call tells the others, over their sockets, one JSON line a message:

- `sync`: apply what changed in the store now (sync.py: tasks, experiments, recipes); answered once applied.
- `drain`: close your gate and answer once your requests are done; stay closed until `release` (which carries
  the pin state after the swap) or until the caller's connection drops, so a caller that dies never leaves the
  others closed.

One pin at a time in the group (`swap_lock`, a flock on `swap.lock`; pins.py): a pin prepares its merge in the
workers, then writes it; another pin in between would change what is written (and two drains at once would
each wait for the other's gate).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path

from ..errors import Unavailable

log = logging.getLogger("vllm.knots_serve")
JOIN_TIMEOUT_S = 600  # the other API servers start with this one; vLLM stops them all if one fails


class StripedIds:
    """vLLM's LoRA id counter (OpenAIServingModels.lora_id_counter) for API server `index` of `count`: ids after
    `start` taken in turns, so two processes never give one id to two different adapters (the engine keys its
    LoRAs by id). The tasks loaded at start keep the ids every process gave them alike (same order, same
    ids)."""

    def __init__(self, start: int, index: int, count: int):
        self._next, self._stride = start + 1 + index, count

    def inc(self, num: int = 1) -> int:  # the event loop's thread only: no lock needed
        value = self._next
        self._next += self._stride * num
        return value


class Group:
    def __init__(self, path: Path, index: int, count: int, server):
        self.path, self.index, self.count, self.server = Path(path), index, count, server
        self._listener: asyncio.AbstractServer | None = None

    def socket(self, index: int) -> Path:
        return self.path / f"{index}.sock"

    async def join(self) -> None:
        """Listen, then wait until every other API server listens too: from then on no change misses one."""
        self._listener = await asyncio.start_unix_server(self._serve, path=str(self.socket(self.index)))
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for i in self.peers():
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_unix_connection(str(self.socket(i)))
                    writer.close()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"API server {i} did not join the group in {self.path}")
                await asyncio.sleep(0.05)
        log.info("knots_serve: API server %d of %d, in step with the others (%s)", self.index, self.count, self.path)

    def peers(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self.socket(self.index).unlink(missing_ok=True)

    # --- the caller's side --------------------------------------------------------------------------------
    async def sync(self, timeout: float) -> None:
        """Every other API server has applied the store's state (after a change this one wrote)."""
        conns = await self._connect()
        try:
            await self._ask(conns, {"op": "sync"}, timeout)
        finally:
            _close(conns)

    @contextlib.asynccontextmanager
    async def drained(self, timeout: float, pinned):
        """Every other API server drained and closed for the block; released with `pinned()` (the pin state
        the block leaves), also when the block fails. Under swap_lock."""
        conns = await self._connect()
        try:
            await self._ask(conns, {"op": "drain", "timeout": timeout}, timeout + 5)
            try:
                yield
            finally:
                await self._ask(conns, {"op": "release", "pinned": pinned()}, 60)
        finally:
            _close(conns)

    @contextlib.asynccontextmanager
    async def swap_lock(self, timeout: float):
        fd = os.open(self.path / "swap.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Unavailable(
                            f"another API server's pin did not end within {timeout:g} s; try again",
                            retry_after=1,
                            param=None,
                        ) from None
                    await asyncio.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def _connect(self) -> dict:
        conns = {}
        try:
            for i in self.peers():
                conns[i] = await asyncio.open_unix_connection(str(self.socket(i)))
        except OSError as e:
            _close(conns)
            raise Unavailable(f"API server {i} cannot be reached ({e}); nothing changed", param=None) from None
        return conns

    async def _ask(self, conns: dict, message: dict, timeout: float) -> None:
        """Send `message` to every peer at once; every one must answer ok."""

        async def ask(i, reader, writer):
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
            answer = json.loads(line) if line else {"error": "the process closed the connection"}
            if "error" in answer:
                raise Unavailable(f"API server {i}: {answer['error']}", param=None)

        try:
            await asyncio.wait_for(asyncio.gather(*(ask(i, *c) for i, c in conns.items())), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(
                f"the other API servers did not answer {message['op']!r} in {timeout:g} s", param=None
            ) from None

    # --- the other side -------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if message["op"] == "sync":
                    await self._answer(writer, self.server.store_sync.apply())
                elif message["op"] == "drain":
                    await self._hold_drained(reader, writer, message["timeout"])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the caller went away: a drain held for it has ended with the block below
        finally:
            writer.close()

    async def _answer(self, writer, work) -> None:
        try:
            await work
            answer = {"ok": True}
        except Exception as e:  # the caller reports it (its admin call answers with this process's error)
            answer = {"error": str(e)}
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()

    async def _hold_drained(self, reader, writer, timeout: float) -> None:
        try:
            async with self.server.gate.exclusive(timeout):
                writer.write(b'{"ok": true}\n')
                await writer.drain()
                line = await reader.readline()  # release, or b"" when the caller is gone
                if line:
                    self.server.pinned = json.loads(line)["pinned"]
        except Unavailable as e:  # this process's requests did not finish in time
            writer.write(json.dumps({"error": str(e)}).encode() + b"\n")
            await writer.drain()
            return
        writer.write(b'{"ok": true}\n')
        await writer.drain()


def _close(conns: dict) -> None:
    for _, writer in conns.values():
        writer.close()
