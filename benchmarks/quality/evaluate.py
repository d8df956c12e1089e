"""Exact-match accuracy of merges on the demo tasks, through the engine path the server pins merges with.

One vLLM engine (in this process) with the knots_serve plugin and its PinWorker: a merge is written into
the weights by `knots_prepare` + `knots_pin` (what POST /admin/pin runs in every worker), the prefix cache
is reset, and a split's prompts are generated greedily in one batch with vLLM's chat API (the chat template that
/v1/chat/completions applies). Per-example results are cached in a JSON file, keyed by the basis
fingerprint and the merge's canonical key, so a rerun (or an interrupted run) evaluates nothing twice.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from knots_serve.atomic import atomic_write_json
from knots_serve.compose import MergeSpec
from knots_serve.demo_tasks import TASKS


@dataclass(frozen=True)
class Merge:
    """A merge to pin: a spec, and the basis file it is composed from (its fingerprint names it)."""

    spec: MergeSpec
    basis_path: Path
    fingerprint: str

    @property
    def label(self) -> str:
        return f"{self.fingerprint}:{self.spec.key()}"


class Evaluator:
    def __init__(self, base_dir: Path, cache_file: Path, eager: bool = False, dtype: str = "auto"):
        os.environ["VLLM_PLUGINS"] = "knots_serve"  # the plugin keeps W0 of packed CPU weights: pinning needs it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in-process: collective_rpc is a call
        from vllm import LLM

        self.llm = LLM(
            model=str(base_dir),
            worker_extension_cls="knots_serve.serving.pinning.PinWorker",
            kv_cache_memory_bytes=1 << 30,
            max_model_len=512,
            max_num_seqs=256,
            seed=0,
            enforce_eager=eager,
            dtype=dtype,
        )
        self.tok = self.llm.get_tokenizer()
        self.cache_file = cache_file
        self.cache: dict[str, list[int]] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
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
            self.llm.collective_rpc(
                "knots_prepare", args=("basis", str(merge.basis_path), json.dumps(asdict(merge.spec)))
            )
            self.llm.collective_rpc("knots_pin")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the previous weights
        self.pinned = label
        self.seconds["pin"] += time.perf_counter() - t0

    def correct(self, merge: Merge | None, tasks, split: str, n: int) -> dict[str, list[int]]:
        """Per task, 0/1 exact match of the first n examples of the split (the base model when merge is None)."""
        label = merge.label if merge else "base"

        def key(t):
            return f"{label}|{split}|{t}"

        todo = [t for t in tasks if len(self.cache.get(key(t), [])) < n]
        if todo:
            self._pin(merge)
            examples = [(t, e) for t in todo for e in TASKS[t].examples(split)[:n]]
            from vllm import SamplingParams

            # an answer longer than the reference plus a period and spaces is wrong anyway: stop there
            params = [
                SamplingParams(temperature=0.0, max_tokens=len(self.tok(e.answer).input_ids) + 3) for _, e in examples
            ]
            t0 = time.perf_counter()
            outputs = self.llm.chat(
                [[{"role": "user", "content": e.prompt}] for _, e in examples], params, use_tqdm=False
            )
            self.seconds["generate"] += time.perf_counter() - t0
            self.prompts += len(examples)
            fresh: dict[str, list[int]] = {t: [] for t in todo}
            for (t, e), out in zip(examples, outputs):
                fresh[t].append(int(TASKS[t].score(out.outputs[0].text, e.answer)))
            self.cache.update({key(t): v for t, v in fresh.items()})
            atomic_write_json(self.cache_file, self.cache)
            spec = merge.spec if merge else None
            print(
                f"[{time.strftime('%H:%M:%S')}] {split} {len(examples)} prompts: "
                f"{spec.method + ' ' + str(spec.params) + ' ' + '+'.join(spec.tasks) if spec else 'base'}"
                f" (pin {self.seconds['pin']:.0f} s, generate {self.seconds['generate']:.0f} s so far)",
                flush=True,
            )
        return {t: self.cache[key(t)][:n] for t in tasks}

    def accuracy(self, merge: Merge | None, tasks, split: str, n: int) -> dict[str, float]:
        return {t: sum(v) / len(v) for t, v in self.correct(merge, tasks, split, n).items()}
