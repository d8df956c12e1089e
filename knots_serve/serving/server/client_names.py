"""The model names clients send for each LoRA vLLM serves, for routers that place requests by the LoRAs a server
reports (the Gateway API inference extension, llm-d: vLLM's `vllm:lora_requests_info`).

vLLM knows a merge by its canonical name (`tasks:A+B@knots-ties`), but a client may ask for it as `tasks:B+A`,
`tasks:A+B` (its recipe's method), a named merge or an experiment; a router that matches the request's `model`
against the server's LoRAs would find none of those. The router (routing.py) records each name a request was
sent with beside the LoRA it was served by; plugin.py's stat logger lists a running or waiting LoRA under its
own name and these (the most recent first, a bounded number of each).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

PER_LORA = 8  # names kept per LoRA: the most recently sent
LORAS = 4096  # LoRAs whose names are kept: the most recently served


class ClientNames:
    def __init__(self, per_lora: int = PER_LORA, loras: int = LORAS):
        self.per_lora, self.loras = per_lora, loras
        self._lock = threading.Lock()  # requests on the event loop; vLLM's stat logger wherever it runs
        self._names: OrderedDict[str, list[str]] = OrderedDict()

    def sent(self, lora: str, name: str) -> None:
        """A request sent as `name` is served by `lora`. A name with a comma is never listed: the routers read
        the LoRAs as one comma-separated label."""
        if name == lora or "," in name:
            return
        with self._lock:
            names = [name] + [n for n in self._names.pop(lora, []) if n != name]
            self._names[lora] = names[: self.per_lora]
            while len(self._names) > self.loras:
                self._names.popitem(last=False)

    def expand(self, loras) -> dict[str, int]:
        """vLLM's {LoRA name: requests}, each LoRA followed by the names clients sent for it, with its count."""
        out: dict[str, int] = {}
        with self._lock:
            for lora, n in loras.items():
                for name in (lora, *self._names.get(lora, ())):
                    out[name] = out.get(name, 0) + n
        return out
