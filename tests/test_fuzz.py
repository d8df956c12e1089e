"""Hostile input against the running server: every operation of the server's own OpenAPI schema (ours and
vLLM's) fuzzed (schemathesis + hypothesis, positive and negative cases), the `model` and `knots` fields of
the completion routes fuzzed, and explicit cases: oversized bodies, huge task lists, deep JSON, invalid
UTF-8, path tricks and lying safetensors headers on the admin register API. Never a 5xx, and the server
answers right afterwards (docs/SECURITY.md, "Fuzzing")."""

import collections
import json
import os
import shutil
import struct

import httpx
import pytest
import schemathesis
from conftest import ADMIN_KEY
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.errors import UnsupportedSchema
from test_serving import PROMPTS, complete, http

from knots_serve.serving.http.auth import ADMIN_PATHS, ADMIN_PREFIXES
from knots_serve.serving.http.middleware import INFERENCE_PATHS

OURS = ("/admin/", "/v1/feedback", "/v1/models")
EXAMPLES = int(os.environ.get("KNOTS_FUZZ_EXAMPLES", 15))  # per operation and mode, on our routes
VLLM_EXAMPLES = int(os.environ.get("KNOTS_FUZZ_VLLM_EXAMPLES", 8))  # on vLLM's routes (big schemas, slow)
FAST = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# vLLM control routes (0.32: rl/online, serve/dev, serve/profile, serve/fault_tolerance, scale_out, elastic_ep,
# the runtime LoRA routes), mounted or not depending on flags (VLLM_SERVER_DEV_MODE, --profiler-config,
# --enable-scale-out, --tokens-only, --enable-fault-tolerance): each changes or stops the engine, or drops
# others' requests, so each needs the admin key; the fuzzing sends them without it, never executes them
CONTROL = [
    ("POST", p)
    for p in (
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/adapters",
        "/adapters/alpha",
        "/scale_elastic_ep",
        "/pause",
        "/resume",
        "/abort_requests",
        "/inference/v1/abort_requests",
        "/init_weight_transfer_engine",
        "/shutdown_weight_transfer_engine",
        "/start_weight_update",
        "/start_draft_weight_update",
        "/update_weights",
        "/finish_weight_update",
        "/update_weight_version",
        "/weight_checker",
        "/start_profile",
        "/stop_profile",
        "/reset_prefix_cache",
        "/reset_mm_cache",
        "/reset_encoder_cache",
        "/release_kv_cache_memory",
        "/sleep",
        "/wake_up",
        "/collective_rpc",
        "/fault_tolerance/apply",
    )
] + [("DELETE", "/adapters/alpha"), ("GET", "/server_info")]
# generation cost bounded: at most this many tokens, 2 choices, whatever a case asks for
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens", "max_new_tokens")
CAPS = dict.fromkeys(TOKEN_FIELDS, 4) | {"n": 2, "best_of": 2, "top_logprobs": 2, "logprobs": 2, "prompt_logprobs": 2}


@pytest.fixture(scope="module")
def healthy(server):
    """Checks after each test: the server still answers, and the same as before."""
    before = complete(server.client(), "tasks:alpha+beta", PROMPTS[0])
    yield
    assert complete(server.client(), "tasks:alpha+beta", PROMPTS[0]) == before
    tasks = {t["name"] for t in http(server, "GET", "/admin/tasks", key=ADMIN_KEY)[1]["tasks"]}
    assert {"alpha", "beta", "gamma"} <= tasks


# constrained decoding left out of the generated cases: the tiny model's word-level vocabulary cannot spell
# JSON (no "{" token) nor most regexes, so vLLM's grammar masks every token, samples token 0, rejects it and
# answers 500 (test_known_vllm_5xx_on_a_grammar_the_vocabulary_cannot_spell: a vLLM bug pinned there; real,
# byte-level vocabularies spell any grammar)
GRAMMAR_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "output_config",
)


def admin_only(path: str) -> bool:
    return (path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES)) and not path.startswith(OURS)


def bounded(body, default_field: str | None):
    """The case's body with every token budget capped (anywhere in it: batch bodies nest requests), and a
    budget added to a generation request that sets none; invalid values (negative, not numbers) are left as
    they are: they test validation and cost nothing."""
    if isinstance(body, list):
        return [bounded(b, default_field) for b in body]
    if not isinstance(body, dict):
        return body
    out = {k: bounded(v, default_field) for k, v in body.items() if k not in GRAMMAR_FIELDS}
    if out.get("tool_choice") not in (None, "auto", "none"):  # "required" or a named tool: a JSON grammar
        del out["tool_choice"]
    if isinstance(out.get("text"), dict):  # the Responses API's text.format
        out["text"] = {k: v for k, v in out["text"].items() if k != "format"}
    for field, cap in CAPS.items():
        if isinstance(out.get(field), (int, float)) and not isinstance(out[field], bool) and out[field] > cap:
            out[field] = cap
    if (
        default_field
        and not any(f in out for f in TOKEN_FIELDS)
        and any(k in out for k in ("prompt", "messages", "input"))
    ):
        out[default_field] = CAPS[default_field]
    return out


# positive cases mostly name a model that does not exist and leave the prompt out (the schemas make both
# optional): half of them get a real model (the base, a task, a merge, a named merge, the experiment) and an
# input, so the random rest of the request reaches the merge routing and the engine
MODELS = ("tiny", "alpha", "tasks:alpha+beta", "tasks:beta+gamma@knots-ties?top_k=0.5", "ab-ta", "exp")
INPUTS = {"prompt": "one two", "messages": [{"role": "user", "content": "one two"}], "input": "one two"}
INPUT_OF = {
    "/v1/completions": "prompt",
    "/v1/chat/completions": "messages",
    "/v1/responses": "input",
    "/v1/messages": "messages",
}


def realistic(body, path: str, model: str):
    if not isinstance(body, dict) or path not in INPUT_OF:
        return body
    field = INPUT_OF[path]
    return body | {"model": model} | ({} if body.get(field) or body.get("prompt_embeds") else {field: INPUTS[field]})


def budget_field(path: str) -> str | None:
    if path in INFERENCE_PATHS:
        return "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    return None


def operations(server):
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json", timeout=60).json())
    return [r.ok() for r in schema.get_all_operations()]


def kind(op) -> str:
    """How an operation is fuzzed: `ours` with the admin key; `guarded` (the admin key's routes, and /admin/pin:
    a random valid pin would change the weights under the other tests) without it, which must answer 401/403;
    `vllm`: vLLM's other routes, as any client calls them, generation budgets capped."""
    if admin_only(op.path) or op.path.startswith("/admin/pin"):
        return "guarded"
    return "ours" if op.path.startswith(OURS) else "vllm"


FIXTURES = ("alpha", "beta", "gamma", "exp")  # the other tests' tasks and experiment: never changed here
STATS = collections.Counter()  # (kind, mode, status class) -> cases, for docs/SECURITY.md


def fuzz(server, op, mode, examples, statuses):
    how = kind(op)

    # no shrinking: the assertion names the failing case, and shrinking a 5xx on vLLM's big schemas takes minutes
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=op.as_strategy(generation_mode=mode), model=st.sampled_from((None,) * len(MODELS) + MODELS))
    def check(case, model):
        if case.method != "GET" and (case.path_parameters or {}).get("name") in FIXTURES:
            return
        # ours: the key in both headers, over the schema's generated header parameters (a random X-Admin-Key
        # would win over the Authorization header and make it a 401 before anything is validated)
        headers = {"authorization": f"Bearer {ADMIN_KEY}", "x-admin-key": ADMIN_KEY} if how == "ours" else {}
        if how == "guarded":  # no admin key, whatever the schema's header parameters generated
            case.headers = {
                k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "x-admin-key")
            }
        if how == "vllm" and budget_field(op.path) is not None:
            if mode == GenerationMode.POSITIVE and model is not None:
                case.body = realistic(case.body, op.path, model)
            case.body = bounded(case.body, budget_field(op.path))
        r = case.call(base_url=server.url, headers=headers, timeout=120)
        statuses.append(r.status_code)
        what = (case.method, case.formatted_path, case.query, case.body, r.status_code, r.text[:400])
        STATS[how, mode.value, f"{r.status_code // 100}xx"] += 1
        assert r.status_code < 500, what
        if how == "guarded":
            assert r.status_code in (401, 403, 404), what
        if (
            how == "vllm"
            and op.path in ("/v1/completions", "/v1/chat/completions")
            and isinstance(case.body, (dict, list, bytes))
        ):
            # /invocations (SageMaker) takes either body; its schema declares none, so it is fuzzed with these
            body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()  # bytes: negative
            r = httpx.post(
                f"{server.url}/invocations", content=body, headers={"content-type": "application/json"}, timeout=120
            )
            statuses.append(r.status_code)
            STATS[how, mode.value, f"{r.status_code // 100}xx"] += 1
            assert r.status_code < 500, ("POST", "/invocations", case.body, r.status_code, r.text[:400])

    try:
        check()
    except Unsatisfiable:  # no case of this mode exists for the operation (e.g. no parameters)
        pass
    except UnsupportedSchema:  # schemathesis cannot negate a part of the schema (a `not` deep in vLLM's
        STATS[how, mode.value, "ungenerated"] += 1  # Responses schema): the cases before it were sent


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_fuzzed_from_the_openapi_schema_never_gives_a_5xx(server, healthy, mode):
    """Every operation of the server's schema, ours and vLLM's: ours with the admin key, the admin key's own
    routes without it (401/403, never executed), vLLM's others as a client (token budgets capped)."""
    ops = operations(server)
    kinds = collections.Counter(kind(op) for op in ops)
    assert kinds["ours"] >= 8 and kinds["guarded"] >= 5 and kinds["vllm"] >= 15, kinds
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"} <= {op.path for op in ops}
    seen = collections.defaultdict(list)
    for op in ops:
        fuzz(server, op, mode, EXAMPLES if kind(op) == "ours" else VLLM_EXAMPLES, seen[kind(op)])
    print(f"\nfuzz {mode.value}:", {k: collections.Counter(v) for k, v in seen.items()}, dict(sorted(STATS.items())))
    for k in kinds:
        assert len(seen[k]) >= kinds[k] // 2, (k, len(seen[k]), kinds[k])
    assert any(s >= 400 for s in seen["ours"]) and set(seen["guarded"]) <= {401, 403, 404}
    if mode == GenerationMode.POSITIVE:  # valid cases get through: the budgets cap them, not refuse them
        assert collections.Counter(seen["vllm"])[200] >= 5, seen["vllm"]


@pytest.mark.parametrize("method, path", CONTROL)
def test_vllm_control_routes_need_the_admin_key(server, method, path):
    """Mounted or not (the middleware answers before routing), with or without vLLM's API key."""
    assert admin_only(path), path
    for headers in ({}, {"authorization": "Bearer none"}, {"x-admin-key": "wrong"}):
        r = httpx.request(
            method, f"{server.url}{path}", json={"request_ids": ["x"], "mode": "abort"}, headers=headers, timeout=60
        )
        assert r.status_code == 401, (path, headers, r.status_code, r.text[:200])


def test_systemone_for_a_model_without_structured_decisions_is_a_404_not_vllms_501(server):
    """vLLM 0.32 answers 501 NotImplementedError on /v1/systemone for a model without a structured-decision
    strategy (the tiny Llama); the middleware answers 404 instead."""
    r = httpx.post(f"{server.url}/v1/systemone", json={"state": "x", "questions": {}}, timeout=60)
    assert r.status_code == 404 and "/v1/systemone is not served" in r.json()["error"]["message"]


# vLLM's control routers: every route that changes something needs the admin key (auth.py), whichever flag
# mounts it; these few only read or generate (/inference/v1/generate: API key, and no merge by name, as on
# every route outside INFERENCE_PATHS)
CONTROL_ROUTERS = (
    "rl.online",
    "serve.dev.cache",
    "serve.dev.rpc",
    "serve.dev.server_info",
    "serve.dev.sleep",
    "serve.profile",
    "serve.fault_tolerance",
    "scale_out.token_in_token_out",
    "serve.elastic_ep",
)
NOT_CONTROL = {
    "/is_paused",
    "/weight_info",
    "/get_world_size",
    "/is_sleeping",
    "/is_scaling_elastic_ep",
    "/inference/v1/generate",
}


def test_every_route_of_vllms_control_routers_needs_the_admin_key():
    import importlib

    routes = set()
    for name in CONTROL_ROUTERS:
        module = importlib.import_module(f"vllm.entrypoints.{name}.api_router")
        for router in (getattr(module, "router", None), getattr(module, "abort_router", None)):
            routes |= {r.path for r in getattr(router, "routes", [])}
    assert len(routes) >= 30 and {"/pause", "/update_weights", "/start_profile"} <= routes, routes
    assert sorted(p for p in routes - NOT_CONTROL if not admin_only(p)) == []
    lora = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters", "/adapters/alpha"}  # in the schema
    assert {path for _, path in CONTROL} - lora <= routes  # CONTROL names real routes


@pytest.mark.xfail(
    strict=True,
    reason="vLLM 0.32: a grammar the vocabulary cannot spell (JSON on the tiny word-level "
    "vocabulary) masks every token; the engine rejects token 0 and answers 500",
)
@pytest.mark.parametrize(
    "path, body",
    [
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "one"}],
                "max_tokens": 4,
                "response_format": {"type": "json_object"},
            },
        ),
        ("/v1/completions", {"prompt": "one", "max_tokens": 4, "structured_outputs": {"regex": "w1 w2"}}),
        ("/v1/responses", {"input": "one", "max_output_tokens": 4, "text": {"format": {"type": "json_object"}}}),
    ],
)
def test_known_vllm_5xx_on_a_grammar_the_vocabulary_cannot_spell(server, path, body):
    r = httpx.post(f"{server.url}{path}", json={"model": "tiny"} | body, timeout=120)
    assert r.status_code < 500, (r.status_code, r.text[:300])


ASSISTANT_ITEMS = [
    {"type": "message", "role": "assistant", "id": "m1", "status": "completed", "content": []},
    {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
]


@pytest.mark.parametrize("item", ASSISTANT_ITEMS, ids=["empty", "refusal"])
def test_an_assistant_message_vllm_cannot_read_in_responses_input_is_a_400_not_a_500(server, item):
    """Found by the fuzzer: vLLM 0.32 reads content[0].text of an assistant output message in `input` (500 for
    an empty content or a refusal first). The middleware answers 400 naming the item; a readable one passes."""
    body = {"model": "tiny", "max_output_tokens": 2, "input": [item, {"role": "user", "content": "one"}]}
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("input[0]: an assistant message"), r.text
    readable = dict(item, content=[{"type": "output_text", "text": "w1", "annotations": []}])
    r = httpx.post(f"{server.url}/v1/responses", json=body | {"input": [readable, body["input"][1]]}, timeout=120)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("item", ASSISTANT_ITEMS, ids=["empty", "refusal"])
def test_known_vllm_crash_on_an_assistant_message_it_cannot_read(item):
    """The vLLM bug the guard above stands for; when vLLM reads these, this fails: drop the guard."""
    from openai.types.responses import ResponseOutputMessage
    from vllm.entrypoints.openai.responses.utils import _construct_message_from_response_item

    message = ResponseOutputMessage.model_validate({"id": "m1", "status": "completed"} | item)
    with pytest.raises((AttributeError, IndexError)):
        _construct_message_from_response_item(message)


@pytest.mark.parametrize(
    "path, body, field",
    [
        (
            "/v1/completions",
            {"prompt": "the cat", "stream_interval": 861491155846713726957722271744},
            "stream_interval",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stream_interval": 2**64},
            "stream_interval",
        ),
        ("/v1/completions", {"prompt": [[1, 2, -(2**63) - 1]]}, "prompt[0][2]"),
    ],
)
def test_an_integer_past_64_bits_is_a_400_naming_it_not_a_500(server, path, body, field):
    """Found by the fuzzer: vLLM 0.32 takes any `stream_interval` ≥ 1 and answers 500 (an empty message)
    when msgpack cannot send it to the engine. The middleware answers 400 naming the field; 2**64 - 1 passes."""
    body = {"model": "tiny", "max_tokens": 2} | body
    r = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["message"] == f"{field}: integers must fit in 64 bits", r.text
    if field == "stream_interval":
        r = httpx.post(f"{server.url}{path}", json=body | {"stream_interval": 2**64 - 1}, timeout=120)
        assert r.status_code == 200, r.text


def test_known_vllm_crash_on_an_integer_msgpack_cannot_send():
    """The vLLM bug the guard above stands for; when vLLM bounds stream_interval, this fails: drop the guard."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.serial_utils import MsgpackEncoder

    params = SamplingParams(max_tokens=2, stream_interval=2**100)  # validated: only ≥ 1 is checked
    with pytest.raises(OverflowError):
        MsgpackEncoder().encode(params)


def test_generation_budgets_are_capped():
    body = {
        "model": "m",
        "max_tokens": 10**9,
        "n": 50,
        "logprobs": True,
        "messages": [],
        "requests": [{"prompt": "p"}, {"prompt": "p", "max_completion_tokens": 99, "min_tokens": -3}],
    }
    assert bounded(body, "max_tokens") == {
        "model": "m",
        "max_tokens": 4,
        "n": 2,
        "logprobs": True,
        "messages": [],
        "requests": [{"prompt": "p", "max_tokens": 4}, {"prompt": "p", "max_completion_tokens": 4, "min_tokens": -3}],
    }
    assert bounded({"input": "x"}, "max_output_tokens") == {"input": "x", "max_output_tokens": 4}
    assert bounded(
        {
            "prompt": "p",
            "max_tokens": 1,
            "response_format": {},
            "tool_choice": "required",
            "text": {"format": {}, "verbosity": "low"},
        },
        "max_tokens",
    ) == {"prompt": "p", "max_tokens": 1, "text": {"verbosity": "low"}}
    assert bounded("not json", "max_tokens") == "not json"


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
fragments = st.sampled_from(
    [
        "tasks:",
        "alpha",
        "beta",
        "gamma",
        "+",
        "@",
        "?",
        "&",
        "=",
        "knots-ties",
        "core-ta",
        "top_k",
        "0.5",
        "w.alpha",
        "seed",
        "basis",
        "subset",
        "..",
        "/",
        "%00",
        "é",
        "",
    ]
)
model_strings = st.one_of(st.text(max_size=60), st.lists(fragments, max_size=12).map("".join))


@FAST
@given(
    model=model_strings,
    knots=st.one_of(
        st.just(None),
        json_value,
        st.fixed_dictionaries(
            {"tasks": st.lists(fragments, max_size=5)},
            optional={"method": fragments, "params": json_value, "weights": json_value, "seed": json_value},
        ),
    ),
    chat=st.booleans(),
)
def test_model_and_knots_fields_fuzzed_never_give_a_5xx(server, healthy, model, knots, chat):
    body = {"model": model, "max_tokens": 1}
    body |= {"messages": [{"role": "user", "content": "one"}]} if chat else {"prompt": "one"}
    if knots is not None:
        body["knots"] = knots
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert r.status_code < 500, (body, r.text[:300])


def raw(server, body: bytes, path="/v1/completions"):
    return httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=120)


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"x" * (9 << 20), 413, "request body over"),
        (
            json.dumps({"model": "tasks:" + "+".join(f"t{i}" for i in range(10_000)), "prompt": "one"}).encode(),
            400,
            "at most 4096",
        ),
        (
            json.dumps({"model": "tasks:" + "+".join(f"t{i}" for i in range(500)), "prompt": "one"}).encode(),
            400,
            "at most 256",
        ),
        (
            json.dumps(
                {"model": "tiny", "prompt": "one", "knots": {"tasks": [f"t{i}" for i in range(10_000)]}}
            ).encode(),
            400,
            "at most 256",
        ),
        (b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, ""),
        (b'{"model": "tasks:alpha+\xff\xfe", "prompt": "one"}', 400, ""),
        (b'{"model": "tasks:alpha+beta", "prompt": "\xc3\x28"}', 400, ""),
        (b'{"model": "tasks:alpha+beta", "prompt": "one", "model": "tasks:zeta"}', 404, "zeta"),
        (b"", 400, ""),
    ],
)
def test_hostile_bodies_get_a_4xx(server, healthy, body, status, message):
    r = raw(server, body)
    assert r.status_code == status, r.text[:300]
    assert message in r.text


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


A, B = (
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
)
LYING = {
    "header longer than the file": struct.pack("<Q", 1 << 40) + b"{}",
    "offsets past the end": safetensors_bytes(
        {
            A: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]},
            B: {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]},
        },
        b"\0" * 16,
    ),
    "shape and size disagree": safetensors_bytes(
        {
            A: {"dtype": "F32", "shape": [4000, 64], "data_offsets": [0, 1024]},
            B: {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]},
        },
        b"\0" * 2048,
    ),
    "unknown dtype": safetensors_bytes(
        {
            A: {"dtype": "Q9", "shape": [4, 64], "data_offsets": [0, 1024]},
            B: {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]},
        },
        b"\0" * 2048,
    ),
    "header not JSON": struct.pack("<Q", 8) + b"\xff" * 8 + b"\0" * 64,
    "empty file": b"",
}


@pytest.mark.parametrize("case", sorted(LYING))
def test_safetensors_with_lying_headers_are_refused_with_a_400(server, healthy, tiny_adapters, case):
    target = server.root / "extra" / f"lying-{case.replace(' ', '-')}"
    shutil.copytree(tiny_adapters["alpha"], target, dirs_exist_ok=True)
    (target / "adapter_model.safetensors").write_bytes(LYING[case])
    status, body = http(server, "POST", "/admin/tasks", {"name": "lying", "path": str(target)}, key=ADMIN_KEY)
    assert status == 400 and "unreadable adapter_model.safetensors" in body["error"]["message"], body


def test_adapter_paths_outside_adapter_dirs_are_refused(server, healthy, tiny_adapters, tmp_path):
    extra = server.root / "extra"
    extra.mkdir(exist_ok=True)
    outside = tmp_path / "outside"
    shutil.copytree(tiny_adapters["alpha"], outside)
    (extra / "link").unlink(missing_ok=True)
    (extra / "link").symlink_to(outside)
    for path in (
        str(extra / ".." / ".." / "state"),
        str(extra / "link"),
        str(outside),
        "/etc",
        "/",
        "~/",
        "../" * 20 + "etc/passwd",
        str(extra) + "/../extra-evil",
        "extra/../../",
    ):
        status, body = http(server, "POST", "/admin/tasks", {"name": "sneaky", "path": path}, key=ADMIN_KEY)
        assert status == 400 and "outside the configured adapter_dirs" in body["error"]["message"], (path, body)
    status, body = http(server, "POST", "/admin/tasks", {"name": "sneaky", "path": "a\0b"}, key=ADMIN_KEY)
    assert status == 400 and "invalid adapter path" in body["error"]["message"]
    assert "sneaky" not in str(http(server, "GET", "/admin/tasks", key=ADMIN_KEY)[1])
