"""Model strings that select merges: the per-request grammar, and the structured `knots` request field.

    tasks:A+B                      A and B, merged as the subset's recipe says, else the rule fitted from the
                                   tuned recipes, else with the server's default method (recipes.py)
    tasks:A+B@auto                 the same, said explicitly
    tasks:A+B@knots-ties           a method id from the registry
    tasks:A+B@knots-ties?top_k=0.3&alpha=1.2&w.A=0.5&seed=1&trim_scope=module&basis=subset
                                   (extension) parameters, per-task weights, DARE seed, trim scope, basis
                                   (auto, the default; shared; subset: see basis_store.py); without a
                                   method they override the recipe's parameters
    tasks:A                        one task, no method: that task's own adapter, as `A` is

Every merge has one canonical string (sorted tasks, the method, non-default settings in a fixed order);
it is the LoRA name vLLM sees, so equal merges share one composed adapter and one engine slot.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ...compose import MergeError, MergeSpec
from ...methods import PARAMS, factored, resolve
from ...recipes import Choice

PREFIX = "tasks:"
TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
BASIS_MODES = ("auto", "shared", "subset")
AUTO = "auto"  # the method of `tasks:A+B@auto`: chosen per subset, as when no method is named
# how a merge without a method gets one: tasks -> Choice (the server's recipes), or a method id (no recipes)
Chooser = Callable[[tuple[str, ...]], Choice] | str
WHY = {"recipe": "the subset's recipe", "rule": "the rule fitted from the tuned recipes", "default": "default_method"}


@dataclass(frozen=True)
class Selection:
    """A parsed model string: a merge (spec + basis mode), or a single task's own adapter (spec None)."""

    tasks: tuple[str, ...]
    spec: MergeSpec | None
    basis: str = "auto"  # auto | shared | subset (basis_store.py)

    @property
    def canonical(self) -> str:
        if self.spec is None:
            return PREFIX + self.tasks[0]
        s = self.spec
        _, method = resolve(s.method)
        query = [(p, v) for p, v in s.resolved_params().items() if v != PARAMS[p].default]
        query += [(f"w.{t}", float(w)) for t, w in sorted(s.weights.items()) if w != 1]
        if method.random and s.seed != 0:
            query.append(("seed", s.seed))
        if method.trims and s.trim_scope != "global":
            query.append(("trim_scope", s.trim_scope))
        if self.basis != "auto" and not factored(method):  # TA and spectral merges: the same in every basis
            query.append(("basis", self.basis))
        q = "&".join(f"{k}={_fmt(v)}" for k, v in query)
        return f"{PREFIX}{'+'.join(sorted(s.tasks))}@{s.method}" + (f"?{q}" if q else "")


def check_per_request(sel: Selection) -> None:
    """A merge the server composes per request must be cheap enough to: DOGE's optimization costs 4-140x a
    knots-ties compose (docs/BENCHMARKS.md, "Compose cost per method"), so it is refused up front, saying how
    to get it instead."""
    if sel.spec is not None and not resolve(sel.spec.method)[1].per_request:
        raise MergeError(
            f"{sel.canonical!r} is not composed per request: {sel.spec.method} optimizes every module (Adam, "
            f"{sel.spec.resolved_params().get('steps')} steps), many times a knots-ties compose; pin it "
            "(POST /admin/pin), or precompute it with `knots-serve merge --method "
            f"{sel.spec.method} --out DIR` and add DIR as a task"
        )


def recipe_model(recipe) -> str:
    """The canonical name of the merge a recipe (recipes.Recipe) serves: what responses name in `model`."""
    return Selection(recipe.tasks, recipe.spec()).canonical


def _fmt(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise MergeError(f"invalid task name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    return name


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise MergeError(f"parameter {key}={value!r} is not a number") from None


def selection(
    tasks, method: str | None, params: dict, weights: dict, seed, trim_scope, basis, choose: Chooser
) -> Selection:
    tasks = tuple(check_task_name(t) for t in tasks)
    if basis not in BASIS_MODES:
        raise MergeError(f"basis must be one of {', '.join(BASIS_MODES)}, got {basis!r}")
    method = None if method == AUTO else method
    if (
        len(tasks) == 1
        and method is None
        and not (params or weights or seed or basis != "auto" or trim_scope != "global")
    ):
        return Selection(tasks, None)
    if method is None:
        choice = choose(tasks) if callable(choose) else Choice(choose, {}, "default")
        takes = resolve(choice.method)[1].params
        extra = sorted(set(params) - set(takes))
        if extra:  # the client did not name this method: say where it came from
            raise MergeError(
                f"{'+'.join(sorted(tasks))} is merged with {choice.method} ({WHY[choice.source]}), which takes no "
                f"parameter {extra[0]!r} (it takes {', '.join(takes)}); name a method that takes it (@METHOD)"
            )
        method, params = choice.method, choice.params | params  # the request's parameters win
    spec = MergeSpec(tasks, method, params, weights, seed, trim_scope)
    return Selection(tuple(sorted(tasks)), spec, basis)


def parse_model(model: str, choose: Chooser) -> Selection:
    """Parse 'tasks:A+B[@METHOD][?k=v&…]'; raises MergeError naming what is wrong."""
    if not model.startswith(PREFIX):
        raise MergeError(f"model {model!r} does not start with {PREFIX!r}")
    if len(model) > 4096:
        raise MergeError(f"model string of {len(model)} characters; at most 4096")
    body, _, query = model[len(PREFIX) :].partition("?")
    names, at, method = body.partition("@")
    if at and not method:
        raise MergeError(f"empty method after '@' in {model!r}")
    tasks = names.split("+") if names else []
    if not tasks or any(t == "" for t in tasks):
        raise MergeError(f"malformed task list in {model!r}: expected tasks:A+B[@METHOD]")
    if len(tasks) > 256:
        raise MergeError(f"the model string lists {len(tasks)} tasks; at most 256")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise MergeError(f"malformed parameters {query!r} in {model!r}: expected k=v&k=v") from None
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise MergeError(f"parameter {twice[0]!r} given twice in {model!r}")
    params, weights, seed, trim_scope, basis = {}, {}, 0, "global", "auto"
    for key, value in pairs:
        if key.startswith("w."):
            weights[key[2:]] = _number(key, value)
        elif key in PARAMS:
            params[key] = _number(key, value)
        elif key == "seed":
            if not re.fullmatch(r"[0-9]{1,19}", value):  # ASCII digits: str.isdigit() also takes '²'
                raise MergeError(f"parameter seed={value!r}: expected a non-negative integer below 2**63")
            seed = int(value)
        elif key == "trim_scope":
            trim_scope = value
        elif key == "basis":
            basis = value
        else:
            raise MergeError(f"unknown parameter {key!r} in {model!r}")
    return selection(tasks, method or None, params, weights, seed, trim_scope, basis, choose)


def parse_field(field: object, choose: Chooser) -> Selection:
    """The structured form, sent as `extra_body={"knots": {...}}` by OpenAI clients:
    {"tasks": [...], "method": "...", "params": {...}, "weights": {...}, "seed": 0,
     "trim_scope": "global", "basis": "auto"}; no method (or "auto") as `tasks:A+B`."""
    if not isinstance(field, dict):
        raise MergeError('\'knots\' must be an object: {"tasks": [...], "method": ..., "params": {...}}')
    unknown = set(field) - {"tasks", "method", "params", "weights", "seed", "trim_scope", "basis"}
    if unknown:
        raise MergeError(f"unknown field(s) in 'knots': {', '.join(sorted(map(str, unknown)))}")
    tasks = field.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise MergeError("'knots.tasks' must be a list of task names")
    if len(tasks) > 256:
        raise MergeError(f"'knots.tasks' lists {len(tasks)} tasks; at most 256")
    method = field.get("method")
    if method is not None and not isinstance(method, str):
        raise MergeError("'knots.method' must be a string")
    params, weights = field.get("params", {}), field.get("weights", {})
    if not isinstance(params, dict) or not isinstance(weights, dict):
        raise MergeError("'knots.params' and 'knots.weights' must be objects")
    return selection(
        tasks,
        method,
        params,
        weights,
        field.get("seed", 0),
        field.get("trim_scope", "global"),
        field.get("basis", "auto"),
        choose,
    )
