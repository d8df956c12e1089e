"""Scoring merges on validation data, through the engine path the server pins merges with.

One vLLM engine (in this process) with the knots_serve plugin and its PinWorker: a merge is written into the
weights by `knots_prepare` + `knots_pin` (what POST /admin/pin runs in every worker), the prefix cache is
reset, and a task's examples are generated greedily in one batch with vLLM's chat API (the chat template
that /v1/chat/completions applies). Per-example scores are cached in a JSON file keyed by the basis
fingerprint, the merge's canonical key and the data's fingerprint, so a rerun (or an interrupted run)
evaluates nothing twice. Used by `knots-serve tune` and the quality benchmark.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import atomic_write_json
from .compose import MergeSpec
from .task_data import TaskData


@dataclass(frozen=True)
class Merge:
    """A merge to pin: a spec and the file it comes from (its fingerprint names it): a basis the merge is
    composed from in the engine (kind "basis"), or the merge's own factors composed beforehand ("factors":
    the data-aware merges, whose statistics the engine does not hold)."""

    spec: MergeSpec
    path: Path
    fingerprint: str
    kind: str = "basis"

    @property
    def label(self) -> str:
        return f"{self.fingerprint}:{self.spec.key()}"


class Evaluator:
    def __init__(
        self,
        base_dir: Path,
        cache_file: Path,
        eager: bool = False,
        dtype: str = "auto",
        max_tokens: int = 64,
        max_model_len: int = 1024,
    ):
        os.environ["VLLM_PLUGINS"] = "knots_serve"  # the plugin keeps W0 of packed CPU weights: pinning needs it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in-process: collective_rpc is a call
        os.environ.pop("KNOTS_SERVE_CONFIG", None)  # a serve config's `pinning: false` must not reach the plugin
        from vllm import LLM

        self.llm = LLM(
            model=str(base_dir),
            worker_extension_cls="knots_serve.serving.engine.pinning.PinWorker",
            kv_cache_memory_bytes=1 << 30,
            max_model_len=max_model_len,
            max_num_seqs=256,
            seed=0,
            enforce_eager=eager,
            dtype=dtype,
        )
        self.tok = self.llm.get_tokenizer()
        self.max_tokens = max_tokens
        self.cache_file = cache_file
        self.cache: dict[str, list[float]] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        self.pinned = "base"
        self.seconds = {"pin": 0.0, "generate": 0.0}
        self.prompts = 0

    def _pin(self, merge: Merge | None) -> None:
        label = merge.label if merge else "base"
        if label == self.pinned:
            return
        t0 = time.perf_counter()
        if merge is None:
            self.llm.collective_rpc("knots_unpin")
        else:
            self.llm.collective_rpc("knots_prepare", args=(merge.kind, str(merge.path), json.dumps(asdict(merge.spec))))
            self.llm.collective_rpc("knots_pin")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the previous weights
        self.pinned = label
        self.seconds["pin"] += time.perf_counter() - t0

    def scores(self, merge: Merge | None, data: dict[str, TaskData], n: int | None = None) -> dict[str, list[float]]:
        """Per task, the scores of its first n examples (all when n is None) answered by the merge pinned
        (the base model when merge is None). Only what the cache lacks is generated."""
        label = merge.label if merge else "base"

        def key(d: TaskData) -> str:
            return f"{label}|{d.fingerprint}"

        want = {t: len(d.examples) if n is None else min(n, len(d.examples)) for t, d in data.items()}
        todo = [
            (d, i) for t, d in data.items() for i in range(len(self.cache.get(key(d), [])), want[t])
        ]  # each task's missing suffix
        if todo:
            self._pin(merge)
            from vllm import SamplingParams

            params = [SamplingParams(temperature=0.0, max_tokens=self._budget(d, i)) for d, i in todo]
            t0 = time.perf_counter()
            outputs = self.llm.chat([list(d.examples[i].messages) for d, i in todo], params, use_tqdm=False)
            self.seconds["generate"] += time.perf_counter() - t0
            self.prompts += len(todo)
            fresh = {k: list(v) for k, v in self.cache.items() if k in {key(d) for d, _ in todo}}
            for (d, i), out in zip(todo, outputs):
                fresh.setdefault(key(d), []).append(d.score(i, out.outputs[0].text))
            self.cache.update(fresh)
            atomic_write_json(self.cache_file, self.cache)
        return {t: self.cache[key(d)][: want[t]] for t, d in data.items()}

    def _budget(self, d: TaskData, i: int) -> int:
        if d.scorer.bounded:  # a longer answer than the reference plus a period and spaces is wrong anyway
            return len(self.tok(d.examples[i].answer).input_ids) + 3
        return self.max_tokens
