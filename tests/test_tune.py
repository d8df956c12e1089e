"""`knots-serve tune`: validation data and scorers (bad input named by file and line, nothing written), the
subset specs, the coordinate search, the paired bootstrap that decides whether a tuned point replaces the
default, the report, and one real run on the tiny model (recipes, report, resume)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from knots_serve.compose import MergeError
from knots_serve.demo_tasks import TASKS, jsonl, task_data
from knots_serve.recipes import Recipe, load_recipes
from knots_serve.stats import TaskStats
from knots_serve.task_data import DataError, load_data, scorer
from knots_serve.tune import (
    KEPT,
    REPLACED,
    coordinate_search,
    interval,
    normalized,
    paired_bootstrap,
    report_markdown,
    search_space,
    subsets,
    versus_default,
)

HERE = Path(__file__).resolve().parent
POOL = ("alpha", "beta", "gamma")
CLI = [sys.executable, "-c", "from knots_serve.cli import main; main()"]


def write(path: Path, *lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def good(directory: Path, tasks=("alpha", "beta")) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        write(
            directory / f"{t}.jsonl",
            {"prompt": "say one", "answer": "one"},
            {
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two?"}],
                "answer": "2",
            },
        )
    return directory


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": "p"}', '"answer" must be a string'),
        ('{"prompt": "p", "messages": [], "answer": "a"}', "exactly one of"),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "answer": "a"}',
            "ending with a user message",
        ),
        ('{"prompt": "p", "answer": "a", "extra": 1}', "unknown field(s) extra"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, line, message):
    data = good(tmp_path / "data")
    write(data / "beta.jsonl", {"prompt": "fine", "answer": "x"}, line)
    with pytest.raises(DataError) as e:
        load_data(data, POOL, ["alpha", "beta"], {})
    assert f"{data / 'beta.jsonl'}:2: " in str(e.value) and message in str(e.value)


def test_unknown_task_empty_split_missing_file_and_unknown_scorer_are_refused(tmp_path):
    data = good(tmp_path / "data")
    write(data / "gama.jsonl", {"prompt": "p", "answer": "a"})
    with pytest.raises(DataError, match=r"gama.jsonl: unknown task 'gama'"):
        load_data(data, POOL, ["alpha", "beta"], {})
    (data / "gama.jsonl").unlink()
    (data / "beta.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"beta.jsonl: no examples \(an empty split\)"):
        load_data(data, POOL, ["alpha", "beta"], {})
    with pytest.raises(DataError, match=r"gamma.jsonl: missing"):
        load_data(good(tmp_path / "d2"), POOL, ["alpha", "gamma"], {})
    with pytest.raises(DataError, match="unknown scorer 'fuzzy'"):
        load_data(good(tmp_path / "d3"), POOL, ["alpha"], {"alpha": "fuzzy"})
    with pytest.raises(DataError, match="unknown task 'delta'"):
        load_data(good(tmp_path / "d4"), POOL, ["alpha"], {"delta": "exact"})


def test_a_scorer_that_raises_is_named_with_the_example_before_any_engine_starts(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "def strict(output, answer):\n"
        "    if answer == '2':\n"
        "        raise ValueError('cannot score a digit')\n"
        "    return output == answer\n"
        "def out_of_range(output, answer):\n"
        "    return 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = good(tmp_path / "data")
    with pytest.raises(DataError, match=r"alpha.jsonl:2: scorer 'py:my_scorers:strict' failed .*cannot score a digit"):
        load_data(data, POOL, ["alpha"], {"alpha": "py:my_scorers:strict"})
    with pytest.raises(DataError, match=r"alpha.jsonl:1: .*returned 7.0; expected a number in \[0, 1\]"):
        load_data(data, POOL, ["alpha"], {"alpha": "py:my_scorers:out_of_range"})
    with pytest.raises(DataError, match="my_scorers"):
        scorer("py:my_scorers:nothing_here")


def test_scorers():
    assert scorer("exact").fn(" Positive. ", "positive") and not scorer("exact").fn("positive!", "positive")
    assert scorer("contains").fn("The answer is 42.", "42") and not scorer("contains").fn("41", "42")
    assert scorer("regex").fn("total: 1,204", r"1,?204") and not scorer("regex").fn("1204", r"^12$")
    assert scorer("exact").bounded and not scorer("contains").bounded


def test_demo_data_is_the_jsonl_tune_reads(tmp_path):
    """The demo tasks as validation files: the same fingerprint, so the benchmark and the CLI share a cache."""
    (tmp_path / "add.jsonl").write_bytes(jsonl("add", "val"))
    from_file = load_data(tmp_path, TASKS, ["add"], {})["add"]
    demo = task_data("add", "val")
    assert from_file.fingerprint == demo.fingerprint and len(demo.examples) == len(TASKS["add"].examples("val"))
    assert [e.messages for e in from_file.examples] == [e.messages for e in demo.examples]
    assert task_data("add", "test").fingerprint != demo.fingerprint


def test_subset_specs():
    tasks = ["a", "b", "c", "d"]
    assert subsets(["pairs"], tasks) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert subsets(["all", "b+a", "a+b"], tasks) == [("a", "b", "c", "d"), ("a", "b")]
    sampled = subsets(["3:2"], tasks, seed=1)
    assert len(sampled) == 2 and all(len(s) == 3 for s in sampled) and sampled == subsets(["3:2"], tasks, seed=1)
    for bad, msg in (("a+x", "unknown task"), ("a", "2\\+ distinct"), ("a+a", "distinct"), ("5:1", "size 5")):
        with pytest.raises(MergeError, match=msg):
            subsets([bad], tasks)


def test_a_subsets_spec_may_be_a_comma_list_and_bad_entries_are_named():
    tasks = ["a", "b", "c", "d"]
    assert subsets(["pairs,3:2, all"], tasks, seed=1) == subsets(["pairs", "3:2", "all"], tasks, seed=1)
    assert subsets(["a+b,c+d", "b+a"], tasks) == [("a", "b"), ("c", "d")]
    with pytest.raises(MergeError, match=r"--subsets 'a\+x': .*unknown task\(s\): x"):
        subsets(["pairs,a+x"], tasks)
    for bad in ("pairs,,all", "pairs,", ","):
        with pytest.raises(MergeError, match=f"--subsets '{bad}': an empty entry"):
            subsets([bad], tasks)


def test_coordinate_search_walks_one_parameter_at_a_time_and_keeps_the_earlier_value_on_ties():
    grid = {"alpha": (0.5, 1.0, 2.0), "top_k": (0.2, 0.1, 0.5)}
    seen = []

    def score(p):
        seen.append(dict(p))
        return -abs(p["alpha"] - 1.0) + (0.1 if p["top_k"] == 0.5 else 0.0) + (0.0 if p["top_k"] != 0.1 else 0.1)

    params, best, trail = coordinate_search(["alpha", "top_k"], grid, score)
    assert params == {"alpha": 1.0, "top_k": 0.1}  # 0.1 and 0.5 tie: the earlier in the grid stays
    assert best == pytest.approx(0.1) and len(trail) == 6
    assert seen[:3] == [{"alpha": a, "top_k": 0.2} for a in (0.5, 1.0, 2.0)]  # alpha first, from top_k's first
    assert search_space("knots-dare-ties") == ["alpha", "top_k", "density"] and search_space("ta") == ["alpha"]


LORA = {"x": [1.0] * 20, "y": [1.0] * 10 + [0.5] * 10}
HALF = {"x": [1.0, 0.0] * 10, "y": [1.0, 0.0] * 10}


def test_normalized_is_per_task_sum_over_the_loras_averaged_and_unnormalized_where_the_lora_scores_0():
    assert normalized(HALF, LORA) == pytest.approx((10 / 20 + 10 / 15) / 2)
    assert normalized({"x": [1.0, 0.0, 1.0], "y": [0.5, 0.0]}, {"x": [1.0] * 3, "y": [0.0, 0.0]}) == pytest.approx(
        (2 / 3 + 0.25) / 2
    )


def test_paired_bootstrap_finds_a_clear_win_significant_and_a_one_example_win_not():
    clear = {"x": [1.0] * 20, "y": [1.0] * 20}
    gain, low, high = paired_bootstrap(clear, HALF, LORA)
    assert gain == pytest.approx(normalized(clear, LORA) - normalized(HALF, LORA)) and 0 < low < gain < high
    one = {"x": [1.0, 1.0] + HALF["x"][2:], "y": HALF["y"]}  # one example more right, out of 40
    gain, low, high = paired_bootstrap(one, HALF, LORA)
    assert gain > 0 and low <= 0 < high  # a third of the resamples leave that example out: not significant
    mixed = {"x": [0.0, 1.0] * 10, "y": HALF["y"]}  # as many wins as losses: the same score, not a win
    gain, low, high = paired_bootstrap(mixed, HALF, LORA)
    assert gain == 0 and low < 0 < high


def test_paired_bootstrap_of_identical_scores_has_zero_width_and_is_deterministic_for_a_seed():
    assert paired_bootstrap(HALF, HALF, LORA) == (0.0, 0.0, 0.0)
    noisy = {"x": [1.0, 0.0, 0.0, 1.0] * 5, "y": [0.5, 1.0] * 10}
    assert paired_bootstrap(noisy, HALF, LORA, seed=3) == paired_bootstrap(noisy, HALF, LORA, seed=3)
    assert paired_bootstrap(noisy, HALF, LORA, seed=3) != paired_bootstrap(noisy, HALF, LORA, seed=4)
    low, high = interval(HALF, LORA)
    assert low < normalized(HALF, LORA) < high and interval(LORA, LORA) == (1.0, 1.0)


def test_versus_default_replaces_the_default_on_a_significant_gain_only():
    won = versus_default({"x": [1.0] * 20, "y": [1.0] * 20}, HALF, LORA)
    assert won["replaced"] and won["gain"][1] > 0 and won["default"][0] == round(normalized(HALF, LORA), 4)
    lucky = versus_default({"x": [1.0, 1.0] + HALF["x"][2:], "y": HALF["y"]}, HALF, LORA)
    assert not lucky["replaced"] and lucky["gain"][0] > 0 and lucky["score"][0] > lucky["default"][0]
    for stat in (lucky["score"], lucky["default"], lucky["gain"]):  # [value, low, high]
        assert len(stat) == 3 and stat[1] <= stat[0] <= stat[2]


def test_the_report_gives_each_recipe_its_intervals_the_gain_and_whether_it_replaced_the_default():
    clear = {"x": [1.0] * 20, "y": [1.0] * 20}
    lucky = {"x": [1.0, 1.0] + HALF["x"][2:], "y": HALF["y"]}
    won, kept = versus_default(clear, HALF, LORA), versus_default(lucky, HALF, LORA)
    log = [
        {"tasks": ["a", "b"], "method": "knots-ta", "params": {"alpha": 1.5}, "score": won["score"][0]}
        | {"versus_default": won, "outcome": REPLACED},
        {"tasks": ["a", "c"], "method": "knots-ties", "params": {"alpha": 1.0, "top_k": 0.2}, "score": 0.5},
        {"tasks": ["a", "c"], "method": "ta", "params": {"alpha": 1.5}, "score": kept["score"][0]}
        | {"versus_default": kept, "outcome": KEPT},
    ]
    recipes = [
        Recipe(("a", "b"), "knots-ta", {"alpha": 1.5}, score=won["score"][0], default_score=won["default"][0]),
        Recipe(("a", "c"), "knots-ties", {"alpha": 1.0, "top_k": 0.2}, score=kept["default"][0]),
    ]
    meta = {"date": "2025-01-01", "data": "DATA", "methods": ["knots-ties", "ta"], "default_method": "knots-ties"}
    text = report_markdown(recipes, log, meta | {"wall_s": 1.0})
    row = next(ln for ln in text.splitlines() if ln.startswith("| a+b |"))
    w = {k: won[k] for k in ("score", "default", "gain")}
    assert f"| {w['score'][0]:.3f} [{w['score'][1]:.3f}, {w['score'][2]:.3f}] |" in row
    assert f"| {w['default'][0]:.3f} [{w['default'][1]:.3f}, {w['default'][2]:.3f}] |" in row
    assert f"| {w['gain'][0]:+.3f} [{w['gain'][1]:+.3f}, {w['gain'][2]:+.3f}] | replaced the default |" in row
    row = next(ln for ln in text.splitlines() if ln.startswith("| a+c |"))
    assert row.startswith("| a+c | knots-ties | alpha=1, top_k=0.2 | ")
    assert f"| {kept['default'][0]:.3f} [{kept['default'][1]:.3f}, {kept['default'][2]:.3f}] |" in row
    k = kept["score"]
    assert f"kept default: gain not significant (best found: ta alpha=1.5, {k[0]:.3f} [{k[1]:.3f}, {k[2]:.3f}])" in row


def test_cli_errors_name_the_problem_and_write_nothing(tmp_path, tiny_adapters):
    state = tmp_path / "state"
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"model": str(tmp_path), "tasks": {n: str(p) for n, p in tiny_adapters.items()}, "state_dir": str(state)}
        )
    )
    data = good(tmp_path / "data")
    write(data / "alpha.jsonl", {"prompt": "p", "answer": "a"}, "{oops")
    cases = [
        (["--subsets", "alpha+beta"], f"{data / 'alpha.jsonl'}:2: not JSON"),
        (["--subsets", "alpha+omega"], "unknown task(s): omega"),
        (["--subsets", "pairs,alpha+omega"], "--subsets 'alpha+omega'"),  # each entry of a comma list is read
        (["--subsets", "pairs", "--subsets", "all,alpha+omega"], "--subsets 'alpha+omega'"),  # and each flag
        (["--subsets", "pairs,,all"], "--subsets 'pairs,,all': an empty entry"),
        (["--subsets", "alpha+beta", "--methods", "knots-nope"], "knots-nope"),
    ]
    for extra, message in cases:
        run = subprocess.run(
            [*CLI, "tune", "--config", str(cfg), "--data", str(data), *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    assert not state.exists()  # nothing written


@pytest.mark.slow
def test_tune_end_to_end_on_the_tiny_model_writes_recipes_and_a_report_and_resumes(tmp_path, tiny_base, tiny_adapters):
    """A real engine (vLLM, in process), the real pinning path; a scorer of the operator's own (py:) that
    prefers longer answers, so merges differ in score on a random tiny model."""
    state = tmp_path / "state"
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_base),
                "tasks": {n: str(p) for n, p in tiny_adapters.items()},
                "state_dir": str(state),
                "default_method": "knots-ties",
            }
        )
    )
    (tmp_path / "op_scorers.py").write_text(
        "def words(output, answer):\n    return min(len(set(output.split())), 8) / 8\n"
    )
    data = tmp_path / "data"
    data.mkdir()
    for i, t in enumerate(("alpha", "beta")):
        write(data / f"{t}.jsonl", *({"prompt": f"w{j} w{i} w{j + 3}", "answer": "w1"} for j in range(3)))
    args = [
        *CLI,
        "tune",
        "--config",
        str(cfg),
        "--data",
        str(data),
        "--subsets",
        "alpha+beta",
        "--methods",
        "knots-ta,core-regmean",
        "--scorer",
        "alpha=py:op_scorers:words",
        "--scorer",
        "beta=py:op_scorers:words",
        "--dtype",
        "float32",
        "--eager",
        "--max-tokens",
        "8",
    ]
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    run = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    book = load_recipes(state / "recipes.json")
    recipe = book.get(("alpha", "beta"))
    doc = json.loads((state / "tune-report" / "tune.json").read_text())
    search, data_aware = doc["log"]
    alphas = (0.1, 0.2, 0.3, 0.6, 1.0, 1.5, 2.0, 3.0)
    assert [p for p, _ in search["trail"]] == [{"alpha": a} for a in alphas]
    # the data-aware merge: statistics measured from the validation examples, then alpha and reduce searched
    assert data_aware["method"] == "core-regmean" and len(data_aware["trail"]) == len(alphas) + 3
    measured = {TaskStats.load(p).task: TaskStats.load(p) for p in (state / "stats").glob("*.safetensors")}
    assert set(measured) == {"alpha", "beta"} and measured["beta"].examples == 3
    search = max((search, data_aware), key=lambda e: e["score"])  # the recipe's candidate: the best search
    best = max(s for _, s in search["trail"])
    assert search["score"] == pytest.approx(best, abs=1e-4)
    assert search["params"] in [p for p, s in search["trail"] if s == best]
    versus = search["versus_default"]
    assert versus["score"][0] == pytest.approx(best, abs=1e-4) and versus["default"][0] == recipe.default_score
    assert versus["replaced"] == (versus["gain"][1] > 0)  # the tuned point replaces the default on a significant gain
    if versus["replaced"]:
        assert search["outcome"] == "replaced the default"
        assert (
            recipe.method == search["method"]
            and recipe.params == search["params"]
            and recipe.score == versus["score"][0]
        )
    else:
        assert search["outcome"] == "kept default: gain not significant"
        assert recipe.method == "knots-ties" and recipe.score == recipe.default_score
    assert recipe.source == "tune" and recipe.data and recipe.date
    row = next(ln for ln in (state / "tune-report" / "report.md").read_text().splitlines() if "| alpha+beta |" in ln)
    assert search["outcome"] in row
    assert (state / "tune-report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resumable: a second run evaluates nothing new and writes the same recipe
    cache = (state / "tune-work" / "evals.json").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (state / "stats").iterdir()}
    again = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (state / "tune-work" / "evals.json").read_text() == cache
    assert {p: p.stat().st_mtime_ns for p in (state / "stats").iterdir()} == stamps  # not measured again
    assert load_recipes(state / "recipes.json").get(("alpha", "beta")) == recipe
