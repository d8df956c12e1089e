"""vllm 0.32's shared-memory message queue, told to stop spinning sooner.

The engine core and its worker pass every step through a shared-memory ring buffer whose readers busy-loop
(`sched_yield()`) for `busy_loop_s` = 1 s after each read before they wait on a socket
(`SpinCondition`, vllm/distributed/device_communicators/shm_broadcast.py; no setting exposes it). On a CPU
host the engine's processes then hold the cores for a second after every step, and a merge composed in that
second (a client's next request) shares them: measured, the single-client compose stage took 0.55–0.86 s
in the server against 0.40–0.47 s with a 0.1 s spin (docs/BENCHMARKS.md, "First request for a never-seen
merge"). A spin of 0 is not an option: readers then depend on the socket alone and requests stalled for
seconds. The plugin applies this in every vLLM process.
"""

from __future__ import annotations

import functools
import inspect

SPIN_S = 0.1


def apply() -> str:
    """Shorten the readers' spin where vLLM's SpinCondition has the 1 s default; returns what was done."""
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return "vLLM has no shared-memory queue here: nothing changed"
    cls = getattr(shm_broadcast, "SpinCondition", None)
    param = inspect.signature(cls.__init__).parameters.get("busy_loop_s") if cls else None
    if param is None or param.default != 1:
        return f"vLLM's shared-memory readers: spin {param.default if param else 'unknown'} s kept"
    cls.__init__ = functools.partialmethod(cls.__init__, busy_loop_s=SPIN_S)
    return f"vLLM's shared-memory readers spin {SPIN_S} s after a read instead of 1 s"
