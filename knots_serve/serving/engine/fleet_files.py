"""Files that the workers on other nodes must read (docs/DEPLOY.md, "Engines on several hosts"): the adapter
directory of a merge vLLM's LoRA manager loads, the factors file of a pin. The API server, on the first node,
writes them on its own disk and publishes them to the fleet (merges/fleet.py) before vLLM is told of them,
under the key their name starts with (`KEY-SERIAL`, `KEY-SERIAL.safetensors`). A worker that does not find such
a path fetches the files from the fleet into a temporary directory, reads them there, and deletes them: its node
keeps no copy (vLLM keeps the loaded LoRA in memory, and asks again if it evicts it).

`apply(fleet)` runs in every vLLM process of a multi-node engine (plugin.py); on the first node the paths exist
and nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("vllm.knots_serve")
_fleet: Callable | None = None  # makes the Fleet, on the first path this node lacks
_made = None


def key_of(path: Path) -> str:
    """A published file's fleet key: its name without the serial and the suffix."""
    return path.name.partition(".")[0].rpartition("-")[0]


@contextlib.contextmanager
def local(path: str):
    """The path itself if this node has it (or no fleet is set), else a copy fetched from the fleet, deleted
    after the block. A path the fleet does not hold either is given back as it is: the reader's own error."""
    global _made
    p = Path(path)
    if p.exists() or _fleet is None:
        yield p
        return
    _made = _made or _fleet()
    files = _made.fetch(key_of(p))
    if files is None:
        yield p
        return
    log.info("knots_serve: %s is not on this node: fetched from the fleet", p.name)
    with tempfile.TemporaryDirectory(prefix="knots-fleet-") as tmp:
        out = Path(tmp) / p.name
        if p.name in files and len(files) == 1:  # a file
            out.write_bytes(files[p.name])
        else:  # an adapter directory
            out.mkdir()
            for name, data in files.items():
                (out / name).write_bytes(data)
        yield out


def apply(fleet: Callable) -> str:
    """Load merges and pins this node lacks from the fleet that fleet() makes."""
    global _fleet
    import msgspec
    from vllm.lora.worker_manager import WorkerLoRAManager

    _fleet = fleet
    if getattr(WorkerLoRAManager._load_adapter, "_knots", False):
        return "merges from the fleet: already applied"
    load = WorkerLoRAManager._load_adapter

    def _load_adapter(self, lora_request):
        with local(lora_request.lora_path) as path:
            if str(path) != lora_request.lora_path:
                lora_request = msgspec.structs.replace(lora_request, lora_path=str(path))
            return load(self, lora_request)

    _load_adapter._knots = True
    WorkerLoRAManager._load_adapter = _load_adapter
    return "a merge or pin this node lacks is loaded from the fleet (several nodes)"
