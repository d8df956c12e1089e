"""Merge recipes (recipes.py): which method and parameters `tasks:A+B` is served with — the subset's recipe,
else the rule fitted from the tuned recipes, else default_method — as a library, through the model-string
grammar, at the HTTP edge (promote's refusals) and on the running server (reload, /admin/recipes)."""

import json
import subprocess
import time

import openai
import pytest
import yaml
from conftest import ADMIN_KEY
from server_process import CLI
from test_serving import PROMPTS, complete, http

from knots_serve.compose import MergeError
from knots_serve.recipes import Choice, Recipe, RecipeBook, load_recipes, save_recipes
from knots_serve.serving.errors import Conflict
from knots_serve.serving.merges.names import parse_field, parse_model
from knots_serve.serving.server.config import load_config
from knots_serve.serving.state.experiments import separated_winner
from knots_serve.serving.state.store import FileStore


def tuned(tasks, method, score, **params):
    return Recipe(tuple(tasks.split("+")), method, params, score=score)


def test_a_subsets_recipe_wins_then_the_rule_then_the_default():
    book = RecipeBook([tuned("a+b", "knots-ta", 0.9, alpha=0.5), tuned("c+d", "knots-ties", 0.8, top_k=0.3)])
    assert book.choose(("b", "a"), "knots-ties") == Choice("knots-ta", {"alpha": 0.5}, "recipe")
    assert book.choose(("a", "c"), "ta").source == "rule"
    assert RecipeBook().choose(("a", "b"), "knots-ties") == Choice("knots-ties", {}, "default")
    promoted = Recipe(("a", "b"), "knots-ta", {"alpha": 0.5}, source="ab:exp")
    only_promoted = RecipeBook([promoted])  # measured on one subset's traffic: no rule for the others
    assert only_promoted.choose(("a", "c"), "knots-ties").source == "default"
    assert only_promoted.choose(("a", "b"), "knots-ties").source == "recipe"


def test_the_rule_takes_the_nearest_tuned_size_the_method_that_won_most_and_its_median_parameters():
    book = RecipeBook(
        [
            tuned("a+b", "knots-ties", 0.7, top_k=0.1, alpha=1.0),
            tuned("a+c", "knots-ties", 0.6, top_k=0.3, alpha=1.5),
            tuned("b+c", "knots-ties", 0.5, top_k=0.5, alpha=2.0),
            tuned("a+d", "knots-ta", 0.99, alpha=0.5),  # a higher score, but fewer wins
            tuned("a+b+c+d+e", "ta", 0.9, alpha=0.9),
        ]
    )
    assert book.rule(2) == book.rule(3) == Choice("knots-ties", {"alpha": 1.5, "top_k": 0.3}, "rule")
    assert book.rule(4) == book.rule(9) == Choice("ta", {"alpha": 0.9}, "rule")  # 4: 5 is nearer than 2
    assert RecipeBook().rule(2) is None


def test_a_tie_in_wins_goes_to_the_higher_mean_score():
    book = RecipeBook([tuned("a+b", "knots-ties", 0.6), tuned("a+c", "knots-ta", 0.8, alpha=0.5)])
    assert book.rule(2) == Choice("knots-ta", {"alpha": 0.5}, "rule")
    book = book.with_recipes([tuned("a+b", "knots-ties", 0.9)])  # replaces a+b's recipe
    assert book.rule(2).method == "knots-ties"


def test_recipes_round_trip_through_their_file(tmp_path):
    path = tmp_path / "recipes.json"
    assert load_recipes(path).recipes == {}  # no file: no recipes
    book = RecipeBook([tuned("b+a", "knots-ta", 0.9, alpha=0.5), Recipe(("c", "d"), "ties", source="ab:x")])
    save_recipes(path, book)
    assert load_recipes(path).recipes == book.recipes
    assert json.loads(path.read_text())["recipes"][0]["tasks"] == ["a", "b"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "Expecting property name"),
        ('{"version": 2, "recipes": []}', 'expected {"version": 1'),
        ('{"version": 1, "recipes": [{"tasks": ["a", "b"], "method": "nope"}]}', "recipe 0: unknown merge method"),
        ('{"version": 1, "recipes": [{"tasks": "ab", "method": "ta"}]}', "'tasks' must be a list of task names"),
        (
            '{"version": 1, "recipes": [{"tasks": ["a", "b"], "method": "ta", "params": {"top_k": 0.3}}]}',
            "takes no parameter 'top_k'",
        ),
        ('{"version": 1, "recipes": [{"tasks": ["a"], "method": "ta", "score": "high"}]}', "'score' must be a number"),
        ('{"version": 1, "recipes": [{"tasks": ["a"], "method": "ta", "colour": 1}]}', "unknown recipe field(s)"),
    ],
)
def test_a_malformed_recipes_file_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "recipes.json"
    path.write_text(content)
    with pytest.raises(MergeError) as e:
        load_recipes(path)
    assert f"unreadable recipes file {path}" in str(e.value) and message in str(e.value), e.value


def test_recipes_are_read_again_when_they_change_and_a_bad_file_keeps_what_was_served(edge):
    async def test(server, mw, engine):
        path = server.cfg.state_dir / "recipes.json"
        assert server.choose(("alpha", "beta")).source == "default" and server.recipes_error is None
        save_recipes(path, RecipeBook([tuned("alpha+beta", "knots-ta", 0.9, alpha=0.5)]))
        assert server.choose(("alpha", "beta")).source == "default"  # not before the next sync
        await server.store_sync.apply()
        assert server.choose(("alpha", "beta")) == Choice("knots-ta", {"alpha": 0.5}, "recipe")
        path.write_text("{broken")
        await server.store_sync.apply()
        assert server.choose(("alpha", "beta")).method == "knots-ta"  # kept
        assert server.recipes_error.startswith(f"unreadable recipes file {path}")
        with pytest.raises(MergeError, match="unreadable recipes file"):  # a put never replaces what it cannot read
            server.store.put_recipes([tuned("alpha+gamma", "ta", 0.5)])
        save_recipes(path, RecipeBook())
        await server.store_sync.apply()
        assert server.book.recipes == {} and server.recipes_error is None

    edge(test, store_poll_s=3600)


def test_putting_recipes_adds_or_replaces_one_subset(tmp_path):
    store = FileStore(tmp_path)
    store.put_recipes([tuned("a+b", "knots-ta", 0.9, alpha=0.5), tuned("a+c", "ta", 0.5)])
    book = store.put_recipes([Recipe(("b", "a"), "knots-ties", {"top_k": 0.3}, source="ab:e")])
    assert {k: r.method for k, r in book.recipes.items()} == {"a+b": "knots-ties", "a+c": "ta"}
    assert load_recipes(tmp_path / "recipes.json").recipes == book.recipes == store.recipes().recipes


def chooser(book, default="knots-ties"):
    return lambda tasks: book.choose(tasks, default)


def test_no_method_and_auto_select_through_the_recipes_and_the_requests_parameters_win():
    choose = chooser(RecipeBook([tuned("a+b", "knots-dare-ties", 0.9, density=0.7, top_k=0.3)]))
    recipe = "tasks:a+b@knots-dare-ties?top_k=0.3&density=0.7"
    assert parse_model("tasks:b+a", choose).canonical == recipe
    assert parse_model("tasks:a+b@auto", choose).canonical == recipe
    assert parse_field({"tasks": ["a", "b"]}, choose).canonical == recipe
    assert parse_field({"tasks": ["a", "b"], "method": "auto"}, choose).canonical == recipe
    assert parse_model("tasks:a+b?density=0.9&seed=3", choose).canonical == (
        "tasks:a+b@knots-dare-ties?top_k=0.3&density=0.9&seed=3"
    )
    with_alpha = "tasks:a+b@knots-dare-ties?alpha=2.0&top_k=0.3&density=0.7"
    assert parse_field({"tasks": ["a", "b"], "params": {"alpha": 2}}, choose).canonical == with_alpha
    assert parse_model("tasks:a+b@ties", choose).canonical == "tasks:a+b@ties"  # a named method: no recipe
    assert parse_model("tasks:a+c", choose).canonical == "tasks:a+c@knots-dare-ties?top_k=0.3&density=0.7"  # rule
    assert parse_model("tasks:a+c", "knots-ties").canonical == "tasks:a+c@knots-ties"  # a method id: no recipes
    for one in ("tasks:a", "tasks:a@auto"):  # one task without a method: its own adapter, recipes or not
        assert parse_model(one, choose).spec is None


def test_a_parameter_the_chosen_method_does_not_take_says_where_the_method_came_from():
    choose = chooser(RecipeBook([tuned("a+b", "knots-ta", 0.9, alpha=0.5)]))
    with pytest.raises(MergeError) as e:
        parse_model("tasks:a+b?top_k=0.3", choose)
    assert str(e.value) == (
        "a+b is merged with knots-ta (the subset's recipe), which takes no parameter 'top_k' (it takes alpha, "
        "lines, isotropize); name a method that takes it (@METHOD)"
    )
    with pytest.raises(MergeError, match=r"knots-ties \(default_method\), which takes no parameter 'density'"):
        parse_field({"tasks": ["a", "c"], "params": {"density": 0.5}}, chooser(RecipeBook()))


def test_auto_is_no_method_id_in_the_config(tmp_path):
    path = tmp_path / "serve.yaml"
    doc = {"model": str(tmp_path), "merges": {"best": "tasks:a+b@auto"}, "pin": "tasks:a+b@auto"}
    path.write_text(yaml.safe_dump(doc))
    assert load_config(path).merges == {"best": "tasks:a+b@auto"}
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "default_method": "auto"}))
    with pytest.raises(MergeError, match="unknown merge method 'auto'"):
        load_config(path)


def test_serve_with_an_unreadable_recipes_file_is_a_cli_error(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "recipes.json").write_text('{"version": 1, "recipes": [{"tasks": ["a"]}]}')
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "model"), "state_dir": "state"}))
    r = subprocess.run([CLI, "serve", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: unreadable recipes file {tmp_path / 'state' / 'recipes.json'}: recipe 0: malformed" in r.stderr


def feedback(n, mean, ci95):
    return {"feedback": {"n": n, "mean": mean, "ci95": ci95}}


def test_an_arm_is_promoted_only_when_its_interval_lies_above_every_other_arms():
    apart = {"a": feedback(5, 0.9, [0.8, 1.0]), "b": feedback(5, 0.3, [0.1, 0.5]), "c": feedback(2, 0.1, [0, 0.2])}
    assert separated_winner("e", apart) == ("a", apart["a"]["feedback"])
    for report, numbers in (
        (apart | {"b": feedback(5, 0.7, [0.5, 0.8])}, "b: n=5, mean=0.7, ci95 [0.5, 0.8]"),  # touching: not strictly
        (apart | {"c": feedback(1, 0.1, None)}, "c: n=1, mean=0.1, no interval yet"),
        (apart | {"c": feedback(0, None, None)}, "c: n=0, mean=-, no interval yet"),
        ({"a": apart["a"]}, "a: n=5, mean=0.9, ci95 [0.8, 1]"),  # one arm: nothing to separate from
    ):
        with pytest.raises(Conflict) as e:
            separated_winner("e", report)
        assert "experiment 'e' does not yet separate" in str(e.value) and numbers in str(e.value), e.value


def scored(server, experiment, arm, scores):
    for i, s in enumerate(scores):
        server.outcomes.remember(f"{experiment}-{arm}-{i}", experiment, arm)
        server.outcomes.record(f"{experiment}-{arm}-{i}", s)


@pytest.mark.parametrize(
    "winner, message",
    [
        ("alpha", "arm 'win' serves 'alpha', which is not a merge: nothing to promote"),
        ("tiny", "arm 'win' serves 'tiny', which is not a merge"),
        ("tasks:alpha", "arm 'win' serves 'tasks:alpha', which is not a merge"),
        ("tasks:alpha+beta@knots-ta?w.alpha=0.5", "a recipe holds a method and its parameters only"),
        ("tasks:alpha+beta@knots-dare-ties?seed=3", "a recipe holds a method and its parameters only"),
        ("tasks:alpha+beta@knots-ties?trim_scope=module", "a recipe holds a method and its parameters only"),
        ("tasks:alpha+beta@knots-ties?basis=subset", "a recipe holds a method and its parameters only"),
    ],
)
def test_promote_refuses_a_winner_a_recipe_cannot_hold(edge, winner, message):
    async def test(server, mw, engine):
        scored(server, "e", "win", [1.0, 0.9, 1.0])
        scored(server, "e", "lose", [0.0, 0.1, 0.0])
        with pytest.raises(Conflict, match=message):
            await server.promote("e")
        assert not (server.cfg.state_dir / "recipes.json").exists()

    arms = {"win": {"model": winner, "weight": 1}, "lose": {"model": "tasks:alpha+beta", "weight": 1}}
    edge(test, experiments={"e": {"arms": arms}})


def test_promote_keeps_what_matters_of_an_arm_and_drops_what_does_not(edge):
    """A seed of a method that draws nothing, weights of 1: the same merge as the recipe's, so promoted."""

    async def test(server, mw, engine):
        scored(server, "e", "win", [1.0, 0.9, 1.0])
        scored(server, "e", "lose", [0.0, 0.1, 0.0])
        done = await server.promote("e")
        assert done["model"] == "tasks:alpha+beta@knots-ties?top_k=0.3"
        assert done["recipe"] | {"date": ""} == {
            "tasks": ("alpha", "beta"),
            "method": "knots-ties",
            "params": {"alpha": 1.0, "top_k": 0.3},
            "score": pytest.approx(0.9667, abs=1e-4),
            "default_score": None,
            "source": "ab:e",
            "data": "feedback n=3, ci95=[0.9013, 1.032]",
            "date": "",
        }
        assert (await call_route(server, "tasks:alpha+beta")) == done["model"]

    arms = {
        "win": {"model": "tasks:alpha+beta@knots-ties?top_k=0.3&seed=5&w.alpha=1", "weight": 1},
        "lose": {"model": "tasks:alpha+beta@auto", "weight": 1},  # an arm may name @auto: no method id
    }
    edge(test, experiments={"e": {"arms": arms}})


async def call_route(server, model):
    route = await server.route({"model": model})
    server.cache.release(route.held)
    return route.model


@pytest.fixture
def served(server, recipes_file):
    def served(model, **kw):
        return server.client().completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0, **kw)

    return served


def test_a_recipes_file_written_while_serving_applies_within_a_second(server, recipes_file, served):
    """The server polls its store every store_poll_s (1 s): applied within that plus the time to read the file."""
    assert served("tasks:alpha+beta").model == "tasks:alpha+beta@knots-ties"  # no recipes: default_method
    recipes = [tuned("alpha+beta", "knots-ta", 0.9, alpha=0.5), tuned("alpha+gamma", "knots-ta", 0.8, alpha=0.75)]
    save_recipes(recipes_file, RecipeBook(recipes))
    time.sleep(1.2)
    recipe = "tasks:alpha+beta@knots-ta?alpha=0.5"
    r = served("tasks:alpha+beta")
    assert r.model == recipe and r.choices[0].text == complete(server.client(), recipe, PROMPTS[0], max_tokens=4)
    assert served("tasks:beta+alpha@auto").model == recipe
    assert served("tiny", extra_body={"knots": {"tasks": ["alpha", "beta"]}}).model == recipe
    assert served("tasks:alpha+beta?alpha=0.7").model == "tasks:alpha+beta@knots-ta?alpha=0.7"
    assert served("tasks:alpha+beta@knots-ties").model == "tasks:alpha+beta@knots-ties"  # a method: no recipe
    assert served("tasks:alpha+beta+gamma").model == "tasks:alpha+beta+gamma@knots-ta?alpha=0.625"  # the rule
    with pytest.raises(openai.BadRequestError) as e:
        served("tasks:alpha+beta?top_k=0.3")
    assert "knots-ta (the subset's recipe), which takes no parameter 'top_k'" in e.value.message

    status, doc = http(server, "GET", "/admin/recipes", key=ADMIN_KEY)
    assert status == 200 and doc["path"] == str(recipes_file) and doc["error"] is None
    assert [(r["tasks"], r["model"], r["score"]) for r in doc["recipes"]] == [
        (["alpha", "beta"], recipe, 0.9),
        (["alpha", "gamma"], "tasks:alpha+gamma@knots-ta?alpha=0.75", 0.8),
    ]
    assert doc["rule"] == {"2": {"method": "knots-ta", "params": {"alpha": 0.625}}}
    assert http(server, "GET", "/admin/recipes")[0] == 401

    recipes_file.write_text("{broken")  # a bad write: the server keeps the recipes it serves, and says why
    time.sleep(1.2)
    assert served("tasks:alpha+beta").model == recipe
    error = http(server, "GET", "/admin/recipes", key=ADMIN_KEY)[1]["error"]
    assert error.startswith(f"unreadable recipes file {recipes_file}")
