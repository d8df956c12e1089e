"""Hostile input against the running server: our routes fuzzed from the server's own OpenAPI schema
(schemathesis + hypothesis), the `model` and `knots` fields of the completion routes fuzzed, and explicit
cases: oversized bodies, huge task lists, deep JSON, invalid UTF-8, path tricks and lying safetensors
headers on the admin register API. Never a 5xx, and the server answers right afterwards."""

import json
import os
import shutil
import struct

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis import GenerationMode

from conftest import ADMIN_KEY
from test_serving import PROMPTS, complete, http

OURS = ("/admin/", "/v1/feedback", "/v1/models")
FAST = settings(max_examples=int(os.environ.get("KNOTS_FUZZ_EXAMPLES", 15)), deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def healthy(server):
    """Checks after each test: the server still answers, and the same as before."""
    before = complete(server.client(), "tasks:alpha+beta", PROMPTS[0])
    yield
    assert complete(server.client(), "tasks:alpha+beta", PROMPTS[0]) == before
    tasks = {t["name"] for t in http(server, "GET", "/admin/tasks", key=ADMIN_KEY)[1]["tasks"]}
    assert {"alpha", "beta", "gamma"} <= tasks


def our_operations(server):
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json").json())
    ops = [r.ok() for r in schema.get_all_operations()]
    return [op for op in ops if op.path.startswith(OURS) and not op.path.startswith("/admin/pin")]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_our_routes_fuzzed_from_the_openapi_schema_never_give_a_5xx(server, healthy, mode):
    """Pinning is left out: a random valid pin would change the weights under the other tests."""
    ops = our_operations(server)
    assert len(ops) >= 8, [op.path for op in ops]
    seen = []
    for op in ops:
        @FAST
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            if case.method == "DELETE" and case.path_parameters and \
                    case.path_parameters.get("name") in ("alpha", "beta", "gamma", "exp"):
                return
            r = case.call(base_url=server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
            seen.append(r.status_code)
            assert r.status_code < 500, (case.method, case.formatted_path, case.body, r.text[:300])

        try:
            check()
        except Unsatisfiable:  # no case of this mode exists for the operation (e.g. no parameters)
            pass
    assert len(seen) >= len(ops) // 2 and any(s >= 400 for s in seen)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=8), kids, max_size=4), max_leaves=20)
fragments = st.sampled_from(["tasks:", "alpha", "beta", "gamma", "+", "@", "?", "&", "=", "knots-ties", "core-ta",
                             "top_k", "0.5", "w.alpha", "seed", "basis", "subset", "..", "/", "%00", "é", ""])
model_strings = st.one_of(st.text(max_size=60), st.lists(fragments, max_size=12).map("".join))


@FAST
@given(model=model_strings, knots=st.one_of(st.just(None), json_value,
                                           st.fixed_dictionaries({"tasks": st.lists(fragments, max_size=5)},
                                                                 optional={"method": fragments, "params": json_value,
                                                                           "weights": json_value, "seed": json_value})),
       chat=st.booleans())
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


@pytest.mark.parametrize("body, status, message", [
    (b"x" * (9 << 20), 413, "request body over"),
    (json.dumps({"model": "tasks:" + "+".join(f"t{i}" for i in range(10_000)), "prompt": "one"}).encode(), 400,
     "at most 4096"),
    (json.dumps({"model": "tasks:" + "+".join(f"t{i}" for i in range(500)), "prompt": "one"}).encode(), 400,
     "at most 256"),
    (json.dumps({"model": "tiny", "prompt": "one", "knots": {"tasks": [f"t{i}" for i in range(10_000)]}}).encode(),
     400, "at most 256"),
    (b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, ""),
    (b'{"model": "tasks:alpha+\xff\xfe", "prompt": "one"}', 400, ""),
    (b'{"model": "tasks:alpha+beta", "prompt": "\xc3\x28"}', 400, ""),
    (b'{"model": "tasks:alpha+beta", "prompt": "one", "model": "tasks:zeta"}', 404, "zeta"),
    (b"", 400, ""),
])
def test_hostile_bodies_get_a_4xx(server, healthy, body, status, message):
    r = raw(server, body)
    assert r.status_code == status, r.text[:300]
    assert message in r.text


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


A, B = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", \
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
LYING = {
    "header longer than the file": struct.pack("<Q", 1 << 40) + b"{}",
    "offsets past the end": safetensors_bytes({A: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]},
                                               B: {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]}},
                                              b"\0" * 16),
    "shape and size disagree": safetensors_bytes({A: {"dtype": "F32", "shape": [4000, 64], "data_offsets": [0, 1024]},
                                                  B: {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]}},
                                                 b"\0" * 2048),
    "unknown dtype": safetensors_bytes({A: {"dtype": "Q9", "shape": [4, 64], "data_offsets": [0, 1024]},
                                        B: {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]}},
                                       b"\0" * 2048),
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
    for path in (str(extra / ".." / ".." / "state"), str(extra / "link"), str(outside), "/etc", "/",
                 "~/", "../" * 20 + "etc/passwd", str(extra) + "/../extra-evil", "extra/../../"):
        status, body = http(server, "POST", "/admin/tasks", {"name": "sneaky", "path": path}, key=ADMIN_KEY)
        assert status == 400 and "outside the configured adapter_dirs" in body["error"]["message"], (path, body)
    status, body = http(server, "POST", "/admin/tasks", {"name": "sneaky", "path": "a\0b"}, key=ADMIN_KEY)
    assert status == 400 and "invalid adapter path" in body["error"]["message"]
    assert "sneaky" not in str(http(server, "GET", "/admin/tasks", key=ADMIN_KEY)[1])
