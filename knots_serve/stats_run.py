"""Measure task statistics (stats.py) with transformers: each task's own adapted model (the base with that
task's LoRA added into its weights) runs over the task's examples, chat-formatted with the answer as the
assistant's turn, and a forward pre-hook on every adapted module accumulates the mean Gram of its input.

Modules that read one input tensor (q/k/v read the attention norm's output, gate/up the MLP norm's) are found
by tensor identity in the forward, not by name, and share one Gram. Padding tokens never enter a Gram.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import contextmanager

import torch

from .adapters import DTYPES, LoraAdapter
from .compose import MergeSpec, adapter_factors, factor_sum_norm2, finish, regression_merge
from .stats import Gram, StatsDir, StatsError, TaskStats
from .task_data import Example, digest

# distinct module inputs per layer, all seven projections adapted: (attention in, o_proj in, MLP in, down_proj in)
SHAPES = {"SmolLM2-135M": ((576, 576, 576, 1536), 30), "Llama-3-8B": ((4096, 4096, 4096, 14336), 32)}


def shape_bytes(inputs: tuple[int, ...], layers: int, sketch_rank: int = 0) -> int:
    """Bytes of one task's statistics for a model whose layers read inputs of these sizes (float32)."""
    per = sum(4 * (i * i if not sketch_rank or sketch_rank >= i else i * (sketch_rank + 1)) for i in inputs)
    return per * layers


def data_digest(examples: list[Example]) -> str:
    return digest(json.dumps([[list(e.messages), e.answer] for e in examples], sort_keys=True).encode())


def token_ids(tok, ex: Example) -> list[int]:
    """The chat as the model reads it once it has answered: the prompt's turns plus the answer's."""
    chat = [*ex.messages, {"role": "assistant", "content": ex.answer}]
    return list(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])


class _Recorder:
    """Forward pre-hooks that add x·xᵀ (float64) of each adapted module's unpadded input tokens."""

    def __init__(self, model, modules: list[str]):
        named = dict(model.named_modules())
        missing = [m for m in modules if m not in named]
        if missing:
            raise StatsError(f"the base model has no module(s) {', '.join(missing[:3])}: not this adapter's base")
        self.sums: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}  # module -> the module whose Gram it shares (itself if first)
        self.mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # the tensor held: its id is never reused meanwhile
        self._handles = [named[m].register_forward_pre_hook(self._hook(m)) for m in modules]

    def _hook(self, module: str):
        def hook(_, args):
            x = args[0]
            first = self._seen.setdefault(id(x), (x, module))[1]
            self.owner.setdefault(module, first)
            if first != module:
                return
            rows = x[self.mask].double()
            total = self.sums.get(module)
            self.sums[module] = rows.T @ rows if total is None else total + rows.T @ rows

        return hook

    def batch(self, mask: torch.Tensor) -> None:
        self.mask, self._seen = mask.bool(), {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@contextmanager
def _added(model, updates: dict[str, torch.Tensor]):
    """Each module's weight W + ΔW (updates {module: ΔW}) for the duration; the weights restored after."""
    named = dict(model.named_modules())
    missing = [m for m in updates if m not in named]
    if missing:
        raise StatsError(f"the base model has no module(s) {', '.join(missing[:3])}: not this adapter's base")
    saved = {}
    try:
        for m, delta in updates.items():
            W = named[m].weight
            saved[m] = W.detach().clone()
            W.add_(delta.to(W.dtype))
        yield
    finally:
        for m, W in saved.items():
            named[m].weight.copy_(W)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (layerwise: nothing above the layer is needed)."""


def _record(model, tok, examples, modules, batch, step, stop_at=None) -> tuple[dict[str, Gram], int]:
    """The mean input Gram of each module over the examples' unpadded tokens ({module: Gram}, modules that read
    one input sharing one), and the token count. stop_at: a submodule after which each forward ends."""
    rec = _Recorder(model, modules)
    stopper = stop_at and dict(model.named_modules())[stop_at].register_forward_hook(_stop)
    try:
        tokens = 0
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for i in range(0, len(examples), batch):
            ids = [token_ids(tok, e) for e in examples[i : i + batch]]
            n = max(map(len, ids))
            input_ids = torch.tensor([x + [pad] * (n - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids], device=device)
            rec.batch(mask)
            try:
                model(input_ids=input_ids, attention_mask=mask)
            except _Stop:
                pass
            tokens += int(mask.sum())
            step(len(ids))
    finally:
        rec.close()
        if stopper:
            stopper.remove()
    grams = {m: Gram(dense=(s / tokens).float()) for m, s in rec.sums.items()}
    return {m: grams[owner] for m, owner in rec.owner.items()}, tokens


def _stop(*_):
    raise _Stop


def _delta(lora) -> torch.Tensor:
    return lora.scale * lora.B.double() @ lora.A.double()


@torch.no_grad()
def measure(
    model,
    tok,
    adapter: LoraAdapter,
    examples: list[Example],
    *,
    sketch_rank: int = 0,
    batch: int = 8,
    step: Callable[[int], None] = lambda n: None,
) -> TaskStats:
    """One task's statistics: its adapter added into `model`'s weights (restored after), its examples run."""
    with _added(model, {m: _delta(lora) for m, lora in adapter.modules.items()}):
        grams, tokens = _record(model, tok, examples, list(adapter.modules), batch, step)
    meta = {"sketch_rank": 0, "model": str(getattr(model.config, "_name_or_path", ""))}
    stats = TaskStats(adapter.name, tokens, len(examples), adapter.digest, data_digest(examples), grams, meta)
    return stats.sketched(sketch_rank) if sketch_rank else stats


LAYER = re.compile(r"^(?P<block>.*\.layers\.(?P<index>\d+))\.")


@torch.no_grad()
def layerwise_regmean(
    model,
    tok,
    adapters: dict[str, LoraAdapter],
    data: dict[str, list[Example]],
    spec: MergeSpec,
    *,
    batch: int = 8,
    step: Callable[[int], None] = lambda n: None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """RegMean++ (Nguyen et al.): RegMean layer by layer, bottom up, each task's Grams of layer ℓ measured on
    its own examples with the layers below ℓ already merged (and layer ℓ that task's own), so a layer's
    merge sees the inputs the merged model will feed it. Per layer and task, a forward up to layer ℓ:
    about L/2 full passes per example, offline only. -> the merged factors {module: (B, A)}."""
    factors = adapter_factors(adapters, spec.tasks)
    blocks: dict[int, list[str]] = {}
    for m in factors:
        found = LAYER.match(m)
        if found is None:
            raise StatsError(f"module {m!r} is in no numbered layer (…layers.N.…): layerwise RegMean needs one")
        blocks.setdefault(int(found["index"]), []).append(m)
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for index in sorted(blocks):
        modules, block = blocks[index], LAYER.match(blocks[index][0])["block"]
        below = {m: B.double() @ A.double() for m, (B, A) in merged.items()}
        grams = {}
        with _added(model, below):
            for t in spec.tasks:
                own = {m: _delta(adapters[t].modules[m]) for m in modules if m in adapters[t].modules}
                with _added(model, own):
                    grams[t], _ = _record(model, tok, data[t], list(own), batch, step, stop_at=block)
        merged |= regression_merge({m: factors[m] for m in modules}, grams, spec, torch.float32)
    return finish(merged, spec, lambda: factor_sum_norm2(factors, spec))


def load_model(model_dir, dtype: str = "float32"):
    """The base model and tokenizer (transformers), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise StatsError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).eval()
    return model, tok


def stats_for(model_dir, adapters, data: dict[str, list[Example]], where: StatsDir, **kw) -> dict[str, TaskStats]:
    """{task: statistics on exactly these examples}: read from `where` when measured before (same adapter,
    same data), else measured now and written there."""
    out = {t: where.get(t, adapters[t].digest, data_digest(ex)) for t, ex in data.items()}
    todo = {t: ex for t, ex in data.items() if out[t] is None}
    if todo:
        for s in measure_all(model_dir, adapters, todo, **kw):
            where.put(s)
            out[s.task] = s
    return out


def measure_all(model_dir, adapters: dict[str, LoraAdapter], data: dict[str, list[Example]], **kw) -> list[TaskStats]:
    """Every task's statistics, with one progress bar over all the examples."""
    from tqdm import tqdm

    model, tok = load_model(model_dir, kw.pop("dtype", "float32"))
    out = []
    with tqdm(total=sum(map(len, data.values())), desc="statistics", unit="ex") as bar:
        for task, examples in data.items():
            bar.set_postfix_str(task)
            out.append(measure(model, tok, adapters[task], examples, step=bar.update, **kw))
    return out
