"""A/B experiments against the real server: split, stickiness, forced arms, live reweighting, labels,
per-arm metrics, feedback and the report."""

import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import ADMIN_KEY
from server_process import CLI
from test_serving import PROMPTS, complete, http, metric

from knots_serve.serving.state.experiments import Experiment, assign

WEIGHTS = {"merge": 1, "base": 1, "adapter": 2, "off": 0}


def ask(client, user=None, arm=None, model="exp", max_tokens=2, **kw):
    headers = {"x-knots-arm": arm} if arm else {}
    raw = client.completions.with_raw_response.create(
        model=model, prompt=PROMPTS[0], max_tokens=max_tokens, temperature=0, user=user, extra_headers=headers, **kw
    )
    r = raw.parse()
    return raw.headers["x-knots-arm"], r


def test_split_follows_the_weights_and_zero_weight_gets_nothing(server):
    c = server.client()
    n = 240
    with ThreadPoolExecutor(12) as pool:
        arms = list(pool.map(lambda i: ask(c, user=f"user-{i}", max_tokens=1)[0], range(n)))
    counts = {a: arms.count(a) for a in WEIGHTS}
    assert counts["off"] == 0
    for arm, w in WEIGHTS.items():
        p = w / sum(WEIGHTS.values())
        assert abs(counts[arm] - n * p) <= 4 * (n * p * (1 - p)) ** 0.5 + 1, counts
    exp = Experiment.model_validate(server.config["experiments"]["exp"])
    assert arms == [assign("exp", exp, f"user-{i}") for i in range(n)]  # deterministic: same on any replica


def test_users_are_sticky_and_the_header_works_as_the_user_field(server):
    c = server.client()
    for i in range(5):
        first = ask(c, user=f"sticky-{i}")[0]
        assert all(ask(c, user=f"sticky-{i}")[0] == first for _ in range(3))
        raw = c.completions.with_raw_response.create(
            model="exp", prompt="one", max_tokens=1, extra_headers={"x-knots-user": f"sticky-{i}"}
        )
        assert raw.headers["x-knots-arm"] == first


def test_each_arm_serves_exactly_its_model_and_says_so(server):
    c = server.client()
    for arm, spec in server.config["experiments"]["exp"]["arms"].items():
        got_arm, r = ask(c, user="whoever", arm=arm, max_tokens=8)
        assert got_arm == arm and r.model_extra["knots"] == {"experiment": "exp", "arm": arm}
        assert r.choices[0].text == complete(c, spec["model"], PROMPTS[0])
    stream = c.chat.completions.create(
        model="exp",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        stream=True,
        extra_headers={"x-knots-arm": "merge"},
    )
    chunks = list(stream)
    assert chunks and all(ch.model_extra["knots"]["arm"] == "merge" for ch in chunks)
    with pytest.raises(Exception, match="has no arm 'nope'"):
        ask(c, arm="nope")


def test_live_reweighting_drops_no_request(server):
    c = server.client()
    errors, stop = [], threading.Event()

    def load():
        i = 0
        while not stop.is_set():
            try:
                ask(c, user=f"load-{i}", max_tokens=1)
            except Exception as e:  # any failure is the finding
                errors.append(e)
            i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        status, body = http(
            server, "PATCH", "/admin/experiments/exp/weights", {"merge": 0, "base": 0, "adapter": 1}, key=ADMIN_KEY
        )
        assert status == 200, body
        assert all(ask(c, user=f"after-{i}", max_tokens=1)[0] == "adapter" for i in range(20))
    finally:
        stop.set()
        for t in threads:
            t.join()
        http(server, "PATCH", "/admin/experiments/exp/weights", WEIGHTS, key=ADMIN_KEY)
    assert errors == []
    state = json.loads((server.root / "state" / "experiments.json").read_text())
    assert state["added"]["exp"]["arms"]["adapter"]["weight"] == 2  # restored, persisted


def test_per_arm_metrics_feedback_and_report(server):
    c = server.client()
    ids = {arm: [ask(c, user=f"fb-{arm}-{i}", arm=arm)[1].id for i in range(4)] for arm in ("merge", "base")}
    for arm, score in (("merge", 1.0), ("base", 0.0)):
        for j, rid in enumerate(ids[arm]):
            status, body = http(server, "POST", "/v1/feedback", {"id": rid, "score": score + 0.1 * j})
            assert status == 200 and body["arm"] == arm
    assert http(server, "POST", "/v1/feedback", {"id": "nope", "score": 1})[0] == 404
    # one score per response: the same score again is a retry, another one a conflict (nothing counted twice)
    again = http(server, "POST", "/v1/feedback", {"id": ids["merge"][0], "score": 1.0})
    assert again == (200, {"id": ids["merge"][0], "experiment": "exp", "arm": "merge", "recorded": False})
    status, body = http(server, "POST", "/v1/feedback", {"id": ids["merge"][0], "score": 0.5})
    assert (
        status == 409
        and body["error"]["type"] == "ConflictError"
        and "one score per response" in body["error"]["message"]
    )
    assert http(server, "POST", "/v1/feedback", {"id": ids["merge"][0], "score": "x"})[0] == 400  # vLLM maps 422
    for name in (
        "knots_ab_requests_total",
        "knots_ab_tokens_total",
        "knots_ab_ttft_seconds_count",
        "knots_ab_latency_seconds_count",
    ):
        assert metric(server, f'{name}{{arm="merge",experiment="exp"}}') >= 4, name
    status, rep = http(server, "GET", "/admin/experiments/exp/report", key=ADMIN_KEY)
    assert status == 200
    merge = rep["arms"]["merge"]
    assert merge["feedback"]["n"] == 4 and merge["feedback"]["mean"] == pytest.approx(1.15)
    lo, hi = merge["feedback"]["ci95"]
    assert lo < 1.15 < hi and merge["served"] >= 4 and merge["latency_s"]["p50"] > 0
    assert json.loads((server.root / "state" / "feedback.json").read_text())["exp"]["merge"][0] == 4
    assert 0 < merge["ttft_s"]["p50"] <= merge["latency_s"]["p99"]
    # the arms without feedback give no interval yet: the report says promote would refuse, and why
    assert rep["promotable"] == {"ok": False, "reason": rep["promotable"]["reason"]}
    assert "does not yet separate" in rep["promotable"]["reason"] and "adapter: n=0" in rep["promotable"]["reason"]
    # an arm's HTTP errors are counted apart from what it served; the history holds the earlier reads
    with pytest.raises(openai.BadRequestError):
        ask(c, arm="merge", max_tokens=10**6)
    status, later = http(server, "GET", "/admin/experiments/exp/report?history=true", key=ADMIN_KEY)
    now = later["arms"]["merge"]
    assert now["errors"] == merge["errors"] + 1 and now["served"] == merge["served"]
    assert later["history"] and later["history"][0]["arms"]["merge"]["feedback"]["n"] >= 4
    assert "history" not in rep
    r = subprocess.run(
        [CLI, "ab", "report", "exp", "--url", server.url],
        capture_output=True,
        text=True,
        env={"KNOTS_ADMIN_KEY": ADMIN_KEY, "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        timeout=120,
    )
    assert r.returncode == 0 and "merge" in r.stdout and "1.150" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    "method, path, body, message",
    [
        ("PUT", "/admin/experiments/exp2", {"arms": {"a": {"model": "tiny", "weight": 0}}}, "sum to a positive"),
        (
            "PUT",
            "/admin/experiments/exp2",
            {"arms": {"a": {"model": "tasks:alpha+zeta", "weight": 1}}},
            "unknown task(s): zeta",
        ),
        (
            "PUT",
            "/admin/experiments/exp2",
            {"arms": {"a": {"model": "tasks:alpha@nope", "weight": 1}}},
            "unknown merge method",
        ),
        ("PUT", "/admin/experiments/exp2", {"arms": {"a": {"model": "tiny", "weight": -1}}}, "greater than or equal"),
        ("PUT", "/admin/experiments/exp2", {"arms": {}}, "at least 1 item"),
        (
            "POST",
            "/admin/experiments",
            {"name": "exp", "arms": {"a": {"model": "tiny", "weight": 1}}},
            "already exists",
        ),
        ("PUT", "/admin/experiments/alpha", {"arms": {"a": {"model": "tiny", "weight": 1}}}, "clashes"),
        ("PATCH", "/admin/experiments/exp/weights", {"merge": 0, "base": 0, "adapter": 0}, "sum to a positive"),
        ("PATCH", "/admin/experiments/exp/weights", {"ghost": 1}, "no arm(s) ghost"),
    ],
)
def test_bad_definitions_are_refused_and_the_running_config_stays(server, method, path, body, message):
    before = http(server, "GET", "/admin/experiments", key=ADMIN_KEY)[1]
    status, resp = http(server, method, path, body, key=ADMIN_KEY)
    assert status in (400, 404, 409, 422) and message in json.dumps(resp), resp
    assert status == 409 or message not in ("already exists", "clashes")  # conflicts are 409s
    assert http(server, "GET", "/admin/experiments", key=ADMIN_KEY)[1] == before
    assert ask(server.client(), user="still-there", max_tokens=1)[0] in WEIGHTS


def test_duplicate_arm_names_in_a_definition_are_refused(server):
    import urllib.request

    raw = b'{"name": "dup", "arms": {"a": {"model": "tiny", "weight": 1}, "a": {"model": "alpha", "weight": 1}}}'
    req = urllib.request.Request(
        f"{server.url}/admin/experiments",
        data=raw,
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {ADMIN_KEY}"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and b"duplicate name(s) in the definition: a" in e.value.read()


def test_experiments_are_listed_and_created_at_runtime(server):
    arms = {"x": {"model": "tasks:alpha+gamma", "weight": 1}, "y": {"model": "beta", "weight": 1}}
    status, _ = http(server, "POST", "/admin/experiments", {"name": "exp-new", "arms": arms}, key=ADMIN_KEY)
    assert status == 201
    c = server.client()
    assert "exp-new" in [m.id for m in c.models.list().data]
    assert ask(c, model="exp-new", user="u1")[0] in ("x", "y")
    assert http(server, "DELETE", "/admin/experiments/exp-new", key=ADMIN_KEY)[0] == 200
    assert http(server, "DELETE", "/admin/experiments/exp-new", key=ADMIN_KEY)[0] == 404


def test_promote_waits_until_the_feedback_separates_then_serves_the_winner_for_the_subset(server, recipes_file):
    arms = {
        "ta": {"model": "tasks:alpha+beta@knots-ta?alpha=0.5", "weight": 1},
        "ties": {"model": "tasks:alpha+beta@knots-ties", "weight": 1},
    }
    assert http(server, "POST", "/admin/experiments", {"name": "promo", "arms": arms}, key=ADMIN_KEY)[0] == 201
    c = server.client()

    def score(arm, *scores):
        for s in scores:
            rid = ask(c, model="promo", arm=arm, max_tokens=1)[1].id
            assert http(server, "POST", "/v1/feedback", {"id": rid, "score": s})[0] == 200

    def promote():
        env = {"KNOTS_ADMIN_KEY": ADMIN_KEY, "PATH": "/usr/bin:/bin"}
        return subprocess.run(
            [CLI, "ab", "promote", "promo", "--url", server.url], capture_output=True, text=True, env=env, timeout=120
        )

    try:
        score("ta", 1.0)
        score("ties", 0.0)
        r = promote()
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: 409: experiment 'promo' does not yet separate") and (
            "ta: n=1, mean=1, no interval yet; ties: n=1, mean=0, no interval yet" in r.stderr
        ), r.stderr
        score("ta", 0.2)
        score("ties", 0.1)
        status, body = http(server, "POST", "/admin/experiments/promo/promote", key=ADMIN_KEY)
        assert status == 409 and body["error"]["type"] == "ConflictError", body
        numbers = "ta: n=2, mean=0.6, ci95 [-0.184, 1.384]; ties: n=2, mean=0.05, ci95 [-0.048, 0.148]"
        assert numbers in body["error"]["message"], body
        assert not recipes_file.exists()
        score("ta", *[1.0] * 6)
        r = promote()
        recipe = "tasks:alpha+beta@knots-ta?alpha=0.5"
        assert r.returncode == 0 and r.stdout.startswith(
            f"promoted promo: tasks:alpha+beta is now served as {recipe} (feedback n=8, ci95=[0.704, 1.096])"
        ), r.stdout + r.stderr
        (written,) = json.loads(recipes_file.read_text())["recipes"]
        assert written | {"date": ""} == {
            "tasks": ["alpha", "beta"],
            "method": "knots-ta",
            "params": {"alpha": 0.5},
            "score": pytest.approx(0.9),
            "default_score": None,
            "source": "ab:promo",
            "data": "feedback n=8, ci95=[0.704, 1.096]",
            "date": "",
        }
        r = c.completions.create(model="tasks:alpha+beta", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert r.model == recipe and r.choices[0].text == complete(c, recipe, PROMPTS[0], max_tokens=4)
        listed = http(server, "GET", "/admin/recipes", key=ADMIN_KEY)[1]
        assert [r["model"] for r in listed["recipes"]] == [recipe] and listed["rule"] == {}  # promoted: no rule
    finally:
        http(server, "DELETE", "/admin/experiments/promo", key=ADMIN_KEY)


def test_outcomes_keep_a_history_of_reports_and_forget_a_deleted_experiment(tmp_path, monkeypatch):
    from knots_serve.serving.state import experiments
    from knots_serve.serving.state.store import FileStore

    clock = [1000.0]
    monkeypatch.setattr(experiments.time, "time", lambda: clock[0])
    out = experiments.Outcomes(FileStore(tmp_path))
    out.served("e", "a", 0.5, 0.1)
    out.failed("e", "a")
    for step in (0, 1, experiments.HISTORY_EVERY_S, 1):  # one sample per HISTORY_EVERY_S, however often read
        clock[0] += step
        out.served("e", "a", 0.7, 0.2)
        row = out.report("e", ["a", "b"])["a"]
    assert [h["t"] for h in out.history("e")] == [1000.0, 1000.0 + 1 + experiments.HISTORY_EVERY_S]
    assert out.history("e")[0]["arms"]["a"]["served"] == 2  # a copy of the report then, not the live numbers
    assert row["served"] == 5 and row["errors"] == 1 and row["ttft_s"]["p50"] == 0.2
    out.served("other", "a", 0.5, 0.1)
    out.forget("e")
    assert (
        out.history("e") == []
        and out.report("e", ["a"])["a"]["served"] == 0
        and not out.report("e", ["a"])["a"]["errors"]
    )
    assert out.report("other", ["a"])["a"]["served"] == 1
