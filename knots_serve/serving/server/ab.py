"""Experiments (A/B tests between merges) and recipes, as this server serves them: the admin writes to the
experiment table and the promotion of a winning arm to its subset's recipe. The served state is the hub's
(`experiments`, `book`), swapped whole on every change so that requests in flight keep what they read; the
store's copy is what other replicas apply (sync.py)."""

from __future__ import annotations

import asyncio
import dataclasses

from ...compose import MergeError
from ...recipes import Choice
from ..errors import BadRequest, Conflict, NotFound, Unavailable
from ..merges.names import PREFIX, TASK_NAME, recipe_model
from ..state.experiments import Experiment, check_experiment, promotion


class ABTests:
    def __init__(self, server):
        self.server = server
        self.lock = asyncio.Lock()  # experiment writes and their sync from the store, one at a time

    def choose(self, tasks) -> Choice:
        """How to merge a subset requested without a method (recipes.py); the recipes are read again from the
        store when they change (sync.py), so `knots-serve tune` and `ab promote` apply without a restart."""
        return self.server.book.choose(tasks, self.server.cfg.default_method)

    async def put(self, name: str, exp: Experiment) -> None:
        s = self.server
        if not TASK_NAME.match(name):
            raise BadRequest(f"invalid experiment name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        taken = name == s.cfg.base_name or name.startswith(PREFIX) or name in s.bases.adapters or name in s.cfg.merges
        if taken:
            raise Conflict(f"experiment name {name!r} clashes with the base model, a task or a merge")
        check_experiment(name, exp, s.check_model)
        async with self.lock:
            await asyncio.to_thread(s.experiment_store.put, name, exp.model_dump())
            s.store_sync.written("experiments")
            s.experiments = s.experiments | {name: exp}  # swap, never mutate: requests in flight keep theirs
        await s.in_step()

    async def set_weights(self, name: str, weights: dict[str, float]) -> Experiment:
        exp = self._get(name)
        unknown = set(weights) - set(exp.arms)
        if unknown:
            raise BadRequest(f"experiment {name!r} has no arm(s) {', '.join(sorted(unknown))}")
        arms = {a: arm.model_copy(update={"weight": weights.get(a, arm.weight)}) for a, arm in exp.arms.items()}
        new = Experiment.model_validate({"arms": {a: arm.model_dump() for a, arm in arms.items()}})
        await self.put(name, new)
        return new

    def promotable(self, name: str, report: dict) -> dict:
        """Whether promote would succeed on this report: {"ok": true, "model": the recipe's merge}, or
        {"ok": false, "reason": the 409 it would answer}."""
        try:
            recipe = promotion(name, self._get(name), report, self.server.router.selection)
        except MergeError as e:  # Conflict; or an arm's model no longer valid (a task since removed)
            return {"ok": False, "reason": str(e)}
        return {"ok": True, "model": recipe_model(recipe)}

    async def promote(self, name: str) -> dict:
        """The experiment's winning arm, once it separates, as its subset's recipe (experiments.promotion)."""
        s, exp = self.server, self._get(name)
        report = await asyncio.to_thread(s.outcomes.report, name, sorted(exp.arms))
        recipe = promotion(name, exp, report, s.router.selection)
        try:
            s.book = await asyncio.to_thread(s.store.put_recipes, [recipe])
            s.store_sync.written("recipes")
        except MergeError as e:  # unreadable recipes, a full disk, the store away: nothing written
            raise Unavailable(f"cannot save the recipe to {s.store.where('recipes')}: {e}") from None
        await s.in_step()
        return {"recipe": dataclasses.asdict(recipe), "model": recipe_model(recipe)}

    async def delete(self, name: str) -> None:
        s = self.server
        self._get(name)
        async with self.lock:
            await asyncio.to_thread(s.experiment_store.delete, name)
            s.store_sync.written("experiments")
            s.experiments = {n: e for n, e in s.experiments.items() if n != name}
            s.outcomes.forget(name)
        await s.in_step()

    def _get(self, name: str) -> Experiment:
        if name not in self.server.experiments:
            raise NotFound(f"unknown experiment {name!r}")
        return self.server.experiments[name]
