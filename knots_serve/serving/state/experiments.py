"""A/B experiments: a public model name whose traffic is split over arms (merges, adapters, the base).

Assignment is sticky and stateless: a user's arm is a pure function of (experiment, user, weights), so
the same user lands in the same arm across restarts and replicas. Arms are ordered by name and the
user's hash point u ∈ [0, 1) picks the arm whose cumulative weight share covers it; an arm of weight 0
covers nothing. Requests without a user are assigned at random, by weight.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict, Field

from ...compose import MergeError
from ...recipes import Recipe, today
from ..errors import Conflict
from ..merges.names import recipe_model
from .store import Store, StoreUnavailable

log = logging.getLogger("vllm.knots_serve")


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=4096, description="any model string the server serves")
    weight: float = Field(ge=0, le=1e6, allow_inf_nan=False)


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arms: dict[str, Arm] = Field(min_length=1, max_length=64)


def check_experiment(name: str, exp: Experiment, check_model) -> None:
    """Refuse definitions that cannot serve: no positive weight, bad arm names, unservable arm models.
    check_model(model) raises MergeError for a model string the server cannot serve."""
    if sum(a.weight for a in exp.arms.values()) <= 0:
        raise MergeError(f"experiment {name!r}: the arm weights must sum to a positive number")
    for arm_name, arm in exp.arms.items():
        if not arm_name or len(arm_name) > 64 or not arm_name.replace("-", "").replace("_", "").isalnum():
            raise MergeError(f"experiment {name!r}: invalid arm name {arm_name!r}")
        try:
            check_model(arm.model)
        except MergeError as e:
            raise MergeError(f"experiment {name!r}, arm {arm_name!r}: {e}") from None


def hash_point(experiment: str, user: str) -> float:
    digest = hashlib.sha256(f"{experiment}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(experiment: str, exp: Experiment, user: str | None) -> str:
    arms = sorted(exp.arms.items())
    total = sum(a.weight for _, a in arms)
    u = hash_point(experiment, user) if user is not None else random.random()
    edge = 0.0
    for name, arm in arms:
        edge += arm.weight / total
        if u < edge and arm.weight > 0:
            return name
    return next(name for name, arm in reversed(arms) if arm.weight > 0)  # u fell on the rounding edge


HISTORY_EVERY_S, HISTORY_LEN = 5.0, 720  # a report's sample kept at most every 5 s: the last hour


class Outcomes:
    """Per-arm latencies and TTFTs (recent, for quantiles), served and error counts of this replica, and
    the history of its reports, in memory; which arm served each response, and the feedback scores, in the
    store (shared by replicas: store.py)."""

    def __init__(self, store: Store, max_latencies: int = 10_000):
        self.store = store
        self._lock = threading.Lock()
        self._latency: dict[tuple[str, str], deque] = {}
        self._ttft: dict[tuple[str, str], deque] = {}
        self._max_latencies = max_latencies
        self._served: dict[tuple[str, str], int] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._history: dict[str, deque] = {}
        self._writer = ThreadPoolExecutor(1, "knots-outcomes")  # store writes, in order, off the event loop

    def remember(self, response_id: str, experiment: str, arm: str) -> None:
        """On the event loop: which arm serves a response is written to the store by a thread (a failure is
        logged: that response's feedback will get a 404)."""
        self._writer.submit(self._remember, response_id, experiment, arm)

    def _remember(self, response_id: str, experiment: str, arm: str) -> None:
        try:
            self.store.remember(response_id, experiment, arm)
        except StoreUnavailable as e:
            log.warning("feedback for %r will not find its arm: %s", response_id, e)

    def served(self, experiment: str, arm: str, seconds: float, ttft: float) -> None:
        key = experiment, arm
        with self._lock:
            self._latency.setdefault(key, deque(maxlen=self._max_latencies)).append(seconds)
            self._ttft.setdefault(key, deque(maxlen=self._max_latencies)).append(ttft)
            self._served[key] = self._served.get(key, 0) + 1

    def failed(self, experiment: str, arm: str) -> None:
        """A response of the arm that ended in an HTTP error."""
        with self._lock:
            self._errors[experiment, arm] = self._errors.get((experiment, arm), 0) + 1

    def forget(self, experiment: str) -> None:
        """A deleted experiment: its counts and history go (a new one of the same name starts afresh)."""
        with self._lock:
            for table in (self._latency, self._ttft, self._served, self._errors):
                for key in [k for k in table if k[0] == experiment]:
                    del table[key]
            self._history.pop(experiment, None)

    def flush(self) -> None:
        """Wait until every response served so far is remembered in the store."""
        self._writer.submit(lambda: None).result()

    def record(self, response_id: str, score: float) -> tuple[str, str, bool]:
        """One score per response: (experiment, arm, recorded). The same score again is a retry (recorded
        False); another score is a Conflict. KeyError for an id not served (or forgotten). Blocking (it
        writes the store): call it off the event loop. A failed write changes nothing (StoreUnavailable)."""
        self.flush()  # a response this replica just served is remembered first: its feedback never races it
        experiment, arm, before = self.store.record(response_id, score)
        if before is not None and before != score:
            raise Conflict(
                f"response {response_id!r} already has the score {before!r}; feedback is one score per response"
            )
        return experiment, arm, before is None

    def report(self, experiment: str, arms: list[str]) -> dict:
        """Per arm: served, errors, latency and TTFT quantiles (this replica's), feedback (all replicas').
        Sampled into the history (at most every HISTORY_EVERY_S). Blocking (reads the store)."""
        out, feedback = {}, self.store.feedback(experiment)
        with self._lock:
            for arm in arms:
                key = experiment, arm
                n, s, ss = feedback.get(arm, [0, 0.0, 0.0])
                mean = s / n if n else None
                # normal-approximation 95% interval of the mean score
                sd = math.sqrt(max(ss / n - mean * mean, 0.0) * n / (n - 1)) if n > 1 else None
                half = 1.96 * sd / math.sqrt(n) if sd is not None else None
                out[arm] = {
                    "served": self._served.get(key, 0),
                    "errors": self._errors.get(key, 0),
                    "latency_s": _quantiles(self._latency.get(key, ())),
                    "ttft_s": _quantiles(self._ttft.get(key, ())),
                    "feedback": {
                        "n": n,
                        "mean": mean,
                        "ci95": [mean - half, mean + half] if half is not None else None,
                    },
                }
            self._sample(experiment, out)
        return out

    def _sample(self, experiment: str, report: dict) -> None:
        history = self._history.setdefault(experiment, deque(maxlen=HISTORY_LEN))
        now = time.time()
        if history and now - history[-1]["t"] < HISTORY_EVERY_S:
            return
        history.append({"t": now, "arms": copy.deepcopy(report)})

    def history(self, experiment: str) -> list[dict]:
        """This replica's reports of the experiment over time, oldest first: {"t": unix time, "arms": report}.
        A sample is taken when a report is read (the console reads one every few seconds while it shows the
        experiment), at most every HISTORY_EVERY_S, for the last HISTORY_LEN samples."""
        with self._lock:
            return list(self._history.get(experiment, ()))


def _quantiles(values) -> dict:
    v = sorted(values)
    return {
        q: v[min(int(p * len(v)), len(v) - 1)] if v else None for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
    }


def separated_winner(experiment: str, report: dict) -> tuple[str, dict]:
    """(arm, its feedback) of the arm with the highest mean feedback, if its 95% interval lies strictly above
    every other arm's (Outcomes.report); Conflict with every arm's numbers otherwise. An arm with fewer than 2
    scores has no interval yet, and a single arm separates from nothing."""
    feedback = {arm: row["feedback"] for arm, row in report.items()}
    scored = [a for a, f in feedback.items() if f["mean"] is not None]
    best = max(scored, key=lambda a: feedback[a]["mean"], default=None)
    others = [f for a, f in feedback.items() if a != best]
    if best is not None and others and all(f["ci95"] is not None for f in feedback.values()):
        if all(feedback[best]["ci95"][0] > f["ci95"][1] for f in others):
            return best, feedback[best]

    def numbers(arm, f):
        interval = "no interval yet" if f["ci95"] is None else "ci95 [{:.4g}, {:.4g}]".format(*f["ci95"])
        return f"{arm}: n={f['n']}, mean={'-' if f['mean'] is None else format(f['mean'], '.4g')}, {interval}"

    raise Conflict(
        f"experiment {experiment!r} does not yet separate: the best arm's 95% interval of mean feedback must "
        "lie strictly above every other arm's (at least 2 arms, 2 scores each); "
        + "; ".join(numbers(a, f) for a, f in sorted(feedback.items()))
    )


def promotion(experiment: str, exp: Experiment, report: dict, selection) -> Recipe:
    """The recipe `ab promote` writes: the separated winner's merge (`selection(body)`: the server's parse of
    a model string), with its mean feedback as the score. Conflict when the winner is not such a merge."""
    arm, fb = separated_winner(experiment, report)
    model = exp.arms[arm].model
    sel = selection({"model": model})
    if sel is None or sel.spec is None:
        raise Conflict(f"arm {arm!r} serves {model!r}, which is not a merge: nothing to promote")
    recipe = Recipe(
        sel.tasks,
        sel.spec.method,
        sel.spec.resolved_params(),
        score=fb["mean"],
        source=f"ab:{experiment}",
        data="feedback n={}, ci95=[{:.4g}, {:.4g}]".format(fb["n"], *fb["ci95"]),
        date=today(),
    )
    if recipe_model(recipe) != sel.canonical:  # per-task weights, a seed, a trim scope or a basis would be lost
        raise Conflict(
            f"arm {arm!r} serves {sel.canonical!r}: a recipe holds a method and its parameters only, not "
            "per-task weights, a seed, trim_scope or basis; promote an arm without them"
        )
    return recipe
