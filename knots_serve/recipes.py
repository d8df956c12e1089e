"""Merge recipes: per task subset, the method and parameters to serve it with, tuned on the operator's own
validation data (`knots-serve tune`) or promoted from an A/B experiment (`knots-serve ab promote`).

The server answers `tasks:A+B` (no `@METHOD`) and `tasks:A+B@auto` with, in this order:
1. the subset's own recipe;
2. else the rule fitted from all tuned recipes (`RecipeBook.rule`): among the recipes of the tuned subset
   size nearest to the request's, the method that won most often (ties: the higher mean validation score),
   with the median of that method's tuned parameters at that size;
3. else the config's `default_method` at the registry defaults.

They are kept in the server's store (serving/state/store.py: `state_dir/recipes.json`, written atomically, or
Redis), which a running server polls, so `knots-serve tune` and `ab promote` take effect without a restart.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_write_json
from .compose import MergeError, MergeSpec

VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """How to serve one subset: a method id and its parameters, and where that choice came from."""

    tasks: tuple[str, ...]  # sorted
    method: str
    params: dict[str, float] = field(default_factory=dict)
    score: float | None = None  # normalized validation score of this recipe (tune), mean feedback (ab)
    default_score: float | None = None  # the config default's score on the same data, for comparison
    source: str = "tune"  # "tune" or "ab:<experiment>"
    data: str = ""  # fingerprint of the validation data (tune) or the feedback it was promoted on (ab)
    date: str = ""

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(sorted(self.tasks)))
        self.spec()  # validates the method, the parameters' names and ranges

    def spec(self) -> MergeSpec:
        return MergeSpec(self.tasks, self.method, dict(self.params))

    @property
    def key(self) -> str:
        return subset_key(self.tasks)

    @classmethod
    def from_json(cls, doc: dict) -> Recipe:
        if not isinstance(doc, dict):
            raise MergeError(f"a recipe must be an object, got {type(doc).__name__}")
        unknown = set(doc) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise MergeError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        # the types the server relies on per request (the rule averages scores): checked once, here
        tasks, params = doc.get("tasks"), doc.get("params", {})
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise MergeError(f"'tasks' must be a list of task names, got {tasks!r}")
        if not isinstance(params, dict):
            raise MergeError(f"'params' must be an object, got {params!r}")
        for name in ("score", "default_score"):
            v = doc.get(name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise MergeError(f"{name!r} must be a number or null, got {v!r}")
        try:
            return cls(**{**doc, "tasks": tuple(tasks)})
        except TypeError as e:
            raise MergeError(f"malformed recipe {doc!r}: {e}") from None


def subset_key(tasks) -> str:
    return "+".join(sorted(tasks))


@dataclass(frozen=True)
class Choice:
    """What `tasks:A+B` resolves to: a method, its parameters, and why (recipe, rule or default)."""

    method: str
    params: dict[str, float]
    source: str  # "recipe" | "rule" | "default"


class RecipeBook:
    """An immutable set of recipes, one per subset."""

    def __init__(self, recipes=()):
        self.recipes: dict[str, Recipe] = {r.key: r for r in recipes}
        self._rules: dict[int, Choice | None] = {}  # per subset size: the book never changes, so fit once

    def get(self, tasks) -> Recipe | None:
        return self.recipes.get(subset_key(tasks))

    def with_recipes(self, recipes) -> RecipeBook:
        return RecipeBook([*self.recipes.values(), *recipes])

    @property
    def tuned(self) -> list[Recipe]:
        """The recipes the rule is fitted on (promoted ones were measured on one subset's traffic only)."""
        return [r for r in self.recipes.values() if r.source == "tune"]

    def rule(self, size: int) -> Choice | None:
        """The method and parameters fitted from the tuned recipes for a subset of `size` tasks (docstring
        of the module); None without tuned recipes."""
        if size not in self._rules:
            self._rules[size] = self._fit(size)
        return self._rules[size]

    def _fit(self, size: int) -> Choice | None:
        tuned = self.tuned
        if not tuned:
            return None
        nearest = min({len(r.tasks) for r in tuned}, key=lambda n: (abs(n - size), n))
        at = [r for r in tuned if len(r.tasks) == nearest]
        wins = Counter(r.method for r in at)

        def strength(m):
            return wins[m], statistics.fmean(r.score or 0.0 for r in at if r.method == m)

        method = max(sorted(wins), key=strength)
        resolved = [r.spec().resolved_params() for r in at if r.method == method]  # a missing one is its default
        return Choice(method, {p: statistics.median(r[p] for r in resolved) for p in resolved[0]}, "rule")

    def choose(self, tasks, default_method: str) -> Choice:
        recipe = self.get(tasks)
        if recipe is not None:
            return Choice(recipe.method, dict(recipe.params), "recipe")
        return self.rule(len(tasks)) or Choice(default_method, {}, "default")

    def to_json(self) -> dict:
        return {
            "version": VERSION,
            "recipes": [asdict(r) for _, r in sorted(self.recipes.items())],
        }

    @classmethod
    def from_json(cls, doc) -> RecipeBook:
        if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("recipes"), list):
            raise MergeError(f'expected {{"version": {VERSION}, "recipes": [...]}}')
        recipes = []
        for i, r in enumerate(doc["recipes"]):
            try:
                recipes.append(Recipe.from_json(r))
            except MergeError as e:
                raise MergeError(f"recipe {i}: {e}") from None
        return cls(recipes)


def load_recipes(path: Path) -> RecipeBook:
    """The recipes in `path` (none when the file does not exist); MergeError naming the file otherwise."""
    if not path.exists():
        return RecipeBook()
    try:
        return RecipeBook.from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as e:  # MergeError is a ValueError
        raise MergeError(f"unreadable recipes file {path}: {e}") from None


def save_recipes(path: Path, book: RecipeBook) -> None:
    atomic_write_json(path, book.to_json())


def today() -> str:
    return time.strftime("%Y-%m-%d")
