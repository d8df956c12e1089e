"""Who may do what (docs/SECURITY.md): the inference API key (vLLM's VLLM_API_KEY), the admin key on the
admin routes and on vLLM's runtime LoRA routes, and no key in any log or command line."""

import json
import urllib.request

import httpx
import psutil
import pytest
from conftest import ADMIN_KEY, API_KEY
from test_serving import PROMPTS, complete, metric

from knots_serve.serving.http.auth import admin_refusal

MUTATING = ("post", "put", "patch", "delete")


def call(srv, method, path, body=None, **headers):
    return httpx.request(method, f"{srv.url}{path}", json=body, headers=headers, timeout=120)


def bearer(key):
    return {"authorization": f"Bearer {key}"}


def test_admin_key_check(monkeypatch):
    monkeypatch.delenv("SOME_ADMIN_KEY", raising=False)
    assert admin_refusal("SOME_ADMIN_KEY", "Bearer x", None)[0] == 403  # unset: the admin API is off
    monkeypatch.setenv("SOME_ADMIN_KEY", "s3cret")
    assert admin_refusal("SOME_ADMIN_KEY", "Bearer s3cret", None) is None
    assert admin_refusal("SOME_ADMIN_KEY", None, "s3cret") is None
    assert admin_refusal("SOME_ADMIN_KEY", "Bearer s3cret", "wrong")[0] == 401  # X-Admin-Key wins
    for wrong in (None, "", "Bearer ", "Bearer s3cre", "Bearer s3cret2", "s3cret", "Bearer \udcff"):
        assert admin_refusal("SOME_ADMIN_KEY", wrong, None)[0] == 401


def test_inference_needs_the_api_key_before_anything_is_routed_or_composed(guarded):
    misses = metric(guarded, 'knots_compose_cache_total{result="miss"}')
    new_merge = {"model": "tasks:alpha+gamma@knots-ties?top_k=0.77", "prompt": "one", "max_tokens": 2}
    for headers in ({}, bearer("wrong"), bearer(ADMIN_KEY)):
        assert call(guarded, "POST", "/v1/completions", new_merge, **headers).status_code == 401
        assert (
            call(guarded, "POST", "/v1/completions", dict(new_merge, model="tasks:zeta"), **headers).status_code == 401
        )  # not 404: no task names leak to strangers
        assert call(guarded, "GET", "/v1/models", **headers).status_code == 401
        assert call(guarded, "POST", "/v1/feedback", {"id": "x", "score": 1}, **headers).status_code == 401
    assert metric(guarded, 'knots_compose_cache_total{result="miss"}') == misses  # nothing was composed
    assert complete(guarded.client(), new_merge["model"], "one", max_tokens=2)
    assert call(guarded, "GET", "/health").status_code == 200  # liveness stays open


def test_the_console_page_is_open_and_holds_no_data(guarded):
    """/console is its page, script and styles only: open without a key (the key is entered in the page),
    with nothing of the server's state in it, and no other file of the package reachable through it."""
    page = call(guarded, "GET", "/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert not [task for task in ("alpha", "beta", "gamma") if task in page.text]
    assert call(guarded, "GET", "/console/console.js").status_code == 200
    for other in ("console.py", "api.py", "..%2Fapi.py", "static", "%2e%2e/auth.py"):
        assert call(guarded, "GET", f"/console/{other}").status_code == 404


def test_admin_routes_need_the_admin_key_not_the_api_key(guarded):
    assert call(guarded, "GET", "/admin/tasks", **bearer(API_KEY)).status_code == 401
    assert call(guarded, "GET", "/admin/tasks", **bearer(ADMIN_KEY)).status_code == 200
    assert call(guarded, "GET", "/admin/tasks", **{"x-admin-key": ADMIN_KEY}).status_code == 200


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/load_lora_adapter", {"lora_name": "etc", "lora_path": "/etc"}),
        ("/v1/unload_lora_adapter", {"lora_name": "alpha"}),
        ("/scale_elastic_ep", {"new_data_parallel_size": 2}),
    ],
)
def test_vllm_runtime_lora_routes_need_the_admin_key(server, guarded, path, body):
    """knots-serve switches these vLLM routes on for its resolver; without the guard any client could load
    an adapter from any readable path, or unload the task adapters."""
    before = complete(server.client(), "alpha", PROMPTS[0])
    assert call(server, "POST", path, body).status_code == 401
    assert call(server, "POST", path, body, **bearer("wrong")).status_code == 401
    assert call(guarded, "POST", path, body, **bearer(API_KEY)).status_code == 401  # the API key is not enough
    assert complete(server.client(), "alpha", PROMPTS[0]) == before
    if path == "/v1/load_lora_adapter":  # (the others would really unload alpha or rescale the server)
        got = call(guarded, "POST", path, body, **bearer(API_KEY), **{"x-admin-key": ADMIN_KEY})
        assert got.status_code in (400, 404)  # both keys: vLLM handles it, and finds no adapter in /etc


def test_every_mutating_route_refuses_a_client_without_keys(guarded):
    """Every route in the OpenAPI schema that changes anything (POST/PUT/PATCH/DELETE) is behind a key:
    the API key (vLLM, /v1/...) or the admin key (ours). A route added later without one fails here."""
    schema = call(guarded, "GET", "/openapi.json").json()  # public: it is vLLM's, and lists no secrets
    open_routes = []
    for path, ops in schema["paths"].items():
        for method in set(ops) & set(MUTATING):
            concrete = path.replace("{", "").replace("}", "")
            status = call(guarded, method.upper(), concrete, {}).status_code
            if status not in (401, 403):
                open_routes.append(f"{method.upper()} {path} -> {status}")
    assert [r for r in open_routes if not r.startswith("POST /ping ")] == []  # /ping: the health probe
    assert "/invocations" in schema["paths"]  # inference outside /v1, which vLLM's own key check leaves open
    assert complete(guarded.client(), "tasks:alpha+beta", PROMPTS[0])


def test_no_key_appears_in_the_logs_or_on_a_command_line(guarded):
    """After requests with right and wrong keys (and the admin API used), grep the server's whole output and
    every process's command line for the key strings."""
    wrong = "wrong-key-d41d8cd98f"
    call(guarded, "POST", "/v1/completions", {"model": "tiny", "prompt": "one"}, **bearer(wrong))
    call(guarded, "GET", "/admin/tasks", **{"x-admin-key": wrong})
    call(guarded, "POST", "/admin/tasks", {"name": "x", "path": "/etc"}, **bearer(ADMIN_KEY))
    complete(guarded.client(), "tasks:beta+gamma@knots-ta", PROMPTS[1])
    req = urllib.request.Request(f"{guarded.url}/v1/models", headers=bearer(API_KEY))
    assert json.loads(urllib.request.urlopen(req).read())["data"]
    log = guarded.log.read_text(errors="replace")
    assert "POST /v1/completions" in log or "/v1/completions" in log  # the log does record requests
    for secret in (API_KEY, ADMIN_KEY, wrong):
        assert secret not in log
    procs = [psutil.Process(guarded.pid)] + psutil.Process(guarded.pid).children(recursive=True)
    for p in procs:
        assert not any(s in " ".join(p.cmdline()) for s in (API_KEY, ADMIN_KEY)), p.cmdline()
