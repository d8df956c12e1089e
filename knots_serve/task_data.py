"""The data vocabulary of tuning and evaluation: a task's examples and their scorer, read from JSONL (the
format `knots-serve tune` takes: one `{"messages": [...]}` or `{"prompt": "..."}` object a line, plus
`"answer"`), and the scorers `exact` (case-, space- and final-period-insensitive), `contains`, `regex` and
`py:module:function`. Shared by tune.py, evaluate.py and the demo tasks (demo_tasks.py)."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .compose import MergeError


def normalize(text: str) -> str:
    return text.strip().rstrip(".").strip().casefold()


class DataError(MergeError):
    """Bad validation data or a failing scorer; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    messages: tuple[dict, ...]  # the chat up to the answer
    answer: str
    where: str  # "file:line", for error messages


@dataclass(frozen=True)
class Scorer:
    """score(output, answer) -> a number in [0, 1]. `bounded`: an output longer than the answer (plus a
    period and spaces) scores 0, so generation stops there (exact match); else up to max_tokens."""

    name: str
    fn: Callable[[str, str], float]
    bounded: bool = False


@dataclass(frozen=True)
class TaskData:
    """One task's examples, in order, with its scorer; `fingerprint` names this data + scorer in the cache."""

    task: str
    examples: tuple[Example, ...]
    scorer: Scorer
    fingerprint: str

    def score(self, i: int, output: str) -> float:
        ex = self.examples[i]
        try:
            value = float(self.scorer.fn(output, ex.answer))
        except Exception as e:  # a user's scorer: any failure is bad input, named by its example
            raise DataError(f"{ex.where}: scorer {self.scorer.name!r} failed on this example: {e!r}") from None
        if not 0.0 <= value <= 1.0:
            raise DataError(f"{ex.where}: scorer {self.scorer.name!r} returned {value!r}; expected a number in [0, 1]")
        return value


def _exact(output: str, answer: str) -> bool:
    return normalize(output) == normalize(answer)


def _contains(output: str, answer: str) -> bool:
    return normalize(answer) in normalize(output)


def _regex(output: str, answer: str) -> bool:
    return re.search(answer, output) is not None


SCORERS = {
    "exact": Scorer("exact", _exact, bounded=True),
    "contains": Scorer("contains", _contains),
    "regex": Scorer("regex", _regex),
}


def scorer(spec: str) -> Scorer:
    """`exact`, `contains`, `regex` or `py:module:function`."""
    if spec in SCORERS:
        return SCORERS[spec]
    if spec.startswith("py:"):
        module, _, name = spec[3:].rpartition(":")
        try:
            fn = getattr(importlib.import_module(module), name) if module else None
        except (ImportError, AttributeError) as e:
            raise DataError(f"scorer {spec!r}: {e}") from None
        if not callable(fn):
            raise DataError(f"scorer {spec!r}: expected py:module:function naming a callable")
        return Scorer(spec, fn)
    raise DataError(f"unknown scorer {spec!r}: use {', '.join(SCORERS)} or py:module:function")


def _messages(doc: dict, where: str) -> tuple[dict, ...]:
    if ("messages" in doc) == ("prompt" in doc):
        raise DataError(f'{where}: give exactly one of "messages" (a chat) or "prompt" (a user message)')
    if "prompt" in doc:
        if not isinstance(doc["prompt"], str) or not doc["prompt"]:
            raise DataError(f'{where}: "prompt" must be a non-empty string')
        return ({"role": "user", "content": doc["prompt"]},)
    msgs = doc["messages"]
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and isinstance(m["content"], str)
            and m["role"] in ("system", "user", "assistant")
            for m in msgs
        )
    )
    if not ok or msgs[-1]["role"] != "user":
        raise DataError(
            f'{where}: "messages" must be a list of {{"role": system|user|assistant, "content": str}} '
            "ending with a user message"
        )
    return tuple(msgs)


def load_task_data(path: Path, task: str, score: Scorer) -> TaskData:
    """Read and check one task's JSONL file (parse_task_data)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_task_data(raw, str(path), task, score)


def parse_task_data(raw: bytes, source: str, task: str, score: Scorer) -> TaskData:
    """One task's JSONL; a DataError names the source and line of the first problem. The scorer is tried on
    every example's own answer, so a scorer that raises fails here, before any engine starts."""
    examples = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            doc = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise DataError(f"{where}: expected a JSON object")
        unknown = set(doc) - {"messages", "prompt", "answer"}
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if not isinstance(doc.get("answer"), str):
            raise DataError(f'{where}: "answer" must be a string')
        examples.append(Example(_messages(doc, where), doc["answer"], where))
    if not examples:
        raise DataError(f"{source}: no examples (an empty split): tuning needs at least one")
    data = TaskData(task, tuple(examples), score, digest(raw, score.name.encode()))
    for i, ex in enumerate(examples):
        data.score(i, ex.answer)
    return data


def load_data(directory: Path, pool: Iterable[str], tasks: Iterable[str], scorers: dict[str, str], default="exact"):
    """{task: TaskData} for the tasks to tune, from DIR/<task>.jsonl. Every .jsonl file in DIR and every
    scorer must name a task of the pool (a typo would otherwise tune nothing for it, silently)."""
    known = set(pool)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (expected one <task>.jsonl per task)")
    for f in sorted(directory.glob("*.jsonl")):
        if f.stem not in known:
            raise DataError(f"{f}: unknown task {f.stem!r}; the config's tasks: {', '.join(sorted(known))}")
    for t in scorers:
        if t not in known:
            raise DataError(f"--scorer {t}=…: unknown task {t!r}")
    out = {}
    for t in tasks:
        path = directory / f"{t}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: missing: task {t!r} is in a subset to tune and needs validation data")
        out[t] = load_task_data(path, t, scorer(scorers.get(t, default)))
    return out


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]
