"""What a hostile or unlucky client can reach at the HTTP edge (docs/SECURITY.md, docs/RELIABILITY.md): every
generation route is routed, nothing selects a merge unrouted, no work the server will refuse, bounded metric
labels and new-merge rates, messages that name the parameter, drains that end. The real KnotsServer and
middleware over ASGI (asgi_edge.py); the same routes on the running server are in test_serving.py."""

import asyncio
import shutil
import threading

import pytest
from asgi_edge import call

from knots_serve.serving import metrics
from knots_serve.serving.errors import TooManyRequests, Unavailable
from knots_serve.serving.merges.basis_store import BasisStore
from knots_serve.serving.server.limits import RateLimit


def test_the_responses_api_and_every_generation_route_select_merges_like_chat(edge):
    async def test(server, mw, engine):
        for path in ("/v1/responses", "/v1/messages", "/invocations", "/v1/completions"):
            body = {"model": "tasks:alpha+beta@knots-ta", "input": "one"}
            assert (await call(mw, path=path, body=body))[0] == 200
            assert engine.seen[-1] == {"path": path, "body": body | {"model": "tasks:alpha+beta@knots-ta"}}
        status, _, error = await call(mw, path="/v1/responses", body={"model": "tasks:alpha+nope", "input": "x"})
        assert status == 404 and "unknown task(s): nope" in error["error"]["message"]

    edge(test)


def test_a_merge_on_a_route_that_does_not_serve_merges_is_refused_naming_the_route(edge):
    async def test(server, mw, engine):
        for path, body in (
            ("/tokenize", {"model": "tasks:alpha+beta", "prompt": "one"}),
            ("/v1/embeddings", {"model": "exp", "input": "one"}),
            ("/pooling", {"model": "tiny", "input": "one", "knots": {"tasks": ["alpha", "beta"]}}),
        ):
            status, _, error = await call(mw, path=path, body=body)
            assert status == 400 and f"{path} does not serve merges" in error["error"]["message"], (path, error)
        assert engine.seen == []  # nothing reached vLLM
        assert (await call(mw, path="/tokenize", body={"model": "tiny", "prompt": "one"}))[0] == 200  # the base

    edge(test, experiments={"exp": {"arms": {"a": {"model": "tasks:alpha+beta", "weight": 1}}}})


def test_a_merge_named_in_a_multipart_form_is_refused(edge):
    async def test(server, mw, engine):
        boundary = "b0undary"
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\ntasks:alpha+beta\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
            f"--{boundary}--\r\n"
        ).encode()
        headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
        status, _, error = await call(mw, path="/v1/audio/transcriptions", body=form, headers=headers)
        assert status == 400 and "does not serve merges" in error["error"]["message"]
        assert engine.seen == []

    edge(test)


def test_background_responses_cannot_use_merges(edge):
    async def test(server, mw, engine):
        status, _, error = await call(
            mw, path="/v1/responses", body={"model": "tasks:alpha+beta", "input": "one", "background": True}
        )
        assert status == 400 and error["error"]["param"] == "background"

    edge(test)


def test_the_resolver_serves_a_merge_only_while_a_request_holds_it(edge):
    """vLLM asks the resolver for unknown names; a merge cached but not held by a routed request is not
    served (a request that slipped past the routing would get vLLM's 404, never a merge)."""

    async def test(server, mw, engine):
        engine.release.clear()
        inflight = asyncio.ensure_future(call(mw, "tasks:alpha+gamma@knots-ta"))
        while not engine.seen:
            await asyncio.sleep(0.01)
        assert server.resolve("tasks:alpha+gamma@knots-ta") is not None  # held by the request in flight
        engine.release.set()
        assert (await inflight)[0] == 200
        assert server.resolve("tasks:alpha+gamma@knots-ta") is None  # cached, no longer held
        assert [m.name for m in server.cache.cached()] == ["tasks:alpha+gamma@knots-ta"]

    edge(test)


def test_never_seen_merges_are_rate_limited_per_client_with_429(edge):
    async def test(server, mw, engine):
        a, b = ("10.0.0.1", 1), ("10.0.0.2", 1)
        assert (await call(mw, "tasks:alpha+beta", client=a))[0] == 200
        assert (await call(mw, "tasks:alpha+gamma", client=a))[0] == 200
        status, headers, error = await call(mw, "tasks:beta+gamma", client=a)
        assert status == 429 and int(headers[b"retry-after"]) >= 1
        assert error["error"]["type"] == "RateLimitError" and "new_merge_rate" in error["error"]["message"]
        assert (await call(mw, "tasks:alpha+beta", client=a))[0] == 200  # cached: never limited
        assert (await call(mw, "tiny", client=a))[0] == 200
        assert (await call(mw, "tasks:beta+gamma", client=b))[0] == 200  # another client has its own bucket
        assert len(server.cache.cached()) == 3

    edge(test, new_merge_burst=2, new_merge_rate=0.001)


def test_a_client_is_charged_once_per_merge_it_starts_never_for_refused_ones_or_joins(edge):
    """The budget of new merges counts composes a client starts: a merge refused before any work (a dense
    `ties` over max_lora_rank: 400) costs nothing, and concurrent requests for one new merge cost one."""

    async def test(server, mw, engine):
        a = ("10.0.0.1", 1)
        for _ in range(3):
            status, _, error = await call(mw, "tasks:alpha+beta@ties", client=a)
            assert status == 400 and "max_lora_rank" in error["error"]["message"], error
        together = await asyncio.gather(*(call(mw, "tasks:alpha+gamma@knots-ties", client=a) for _ in range(8)))
        assert [r[0] for r in together] == [200] * 8
        assert (await call(mw, "tasks:beta+gamma", client=a))[0] == 200  # the second of a burst of two
        assert (await call(mw, "tasks:alpha+beta", client=a))[0] == 429  # a third: past the burst
        assert sorted(c.name for c in server.cache.cached()) == [
            "tasks:alpha+gamma@knots-ties",
            "tasks:beta+gamma@knots-ties",
        ]

    edge(test, new_merge_burst=2, new_merge_rate=0.001)


def test_the_rate_refills_over_time():
    limit = RateLimit(rate=2.0, burst=1)
    limit.take("c", now=0.0)
    with pytest.raises(TooManyRequests) as refused:
        limit.take("c", now=0.1)
    assert refused.value.retry_after == 1
    limit.take("c", now=0.6)  # 0.5 s at 2/s: one token back


def test_request_metrics_have_one_series_per_method_and_subset_size_not_per_parameter(edge):
    async def test(server, mw, engine):
        before = {s.labels["model"] for m in metrics.REQUESTS.collect() for s in m.samples}
        for i in range(6):
            assert (await call(mw, f"tasks:alpha+beta@knots-ta?alpha={1 + i / 1000}"))[0] == 200
        after = {s.labels["model"] for m in metrics.REQUESTS.collect() for s in m.samples}
        assert after - before <= {"merge/2/knots-ta"} and "merge/2/knots-ta" in after
        assert len(server.cache.cached()) == 6

    edge(test)


def test_a_dense_space_trimming_merge_is_refused_before_any_compose(edge):
    """Dense TIES is full-rank in general: past max_lora_rank it is refused at once (and the message says
    what is served instead), not after seconds of compose."""

    async def test(server, mw, engine):
        misses = metrics.CACHE.labels("miss")._value.get()
        status, _, error = await call(mw, "tasks:alpha+beta@ties")
        message = error["error"]["message"]
        assert status == 400 and "full-rank" in message and "knots-ties" in message and "/admin/pin" in message
        assert metrics.CACHE.labels("miss")._value.get() == misses  # nothing was composed
        assert (await call(mw, "tasks:alpha+beta@knots-ties"))[0] == 200  # rank 12: served

    edge(test, max_lora_rank=32)


def test_a_compose_past_the_memory_bound_is_refused_before_any_work(edge):
    async def test(server, mw, engine):
        misses = metrics.CACHE.labels("miss")._value.get()
        status, _, error = await call(mw, "tasks:alpha+beta+gamma@knots-ties")
        assert status == 400 and "compose_memory_bytes" in error["error"]["message"]
        assert metrics.CACHE.labels("miss")._value.get() == misses
        assert (await call(mw, "tasks:alpha+beta@knots-ta"))[0] == 200  # TA stacks nothing

    edge(test, compose_memory_bytes=4096)


@pytest.mark.parametrize(
    "model, param",
    [
        ("tasks:alpha+beta@knots-dare-ties?seed=²", "seed"),
        ("tasks:alpha+beta?top_k=lots", "top_k"),
        ("tasks:alpha+beta?w.alpha=1e999", "alpha"),
    ],
)
def test_a_bad_parameter_is_named_in_the_message(edge, model, param):
    async def test(server, mw, engine):
        status, _, error = await call(mw, model)
        assert status == 400 and param in error["error"]["message"] and "invalid literal" not in str(error)

    edge(test)


def test_a_drain_that_does_not_end_gives_up_with_503_and_changes_nothing(edge, tiny_adapters, tmp_path):
    async def test(server, mw, engine):
        shutil.copytree(tiny_adapters["alpha"], tmp_path / "delta")
        engine.release.clear()
        stuck = asyncio.ensure_future(call(mw, "tiny"))
        while not engine.seen:
            await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match=r"1 request\(s\) still in flight after the drain timeout"):
            await server.register("delta", str(tmp_path / "delta"))
        assert "delta" not in server.bases.adapters and "delta" not in server.tasks.items()
        async with asyncio.timeout(5):  # the door is open again
            async with server.gate.shared():
                pass
        engine.release.set()
        assert (await stuck)[0] == 200
        assert (await server.register("delta", str(tmp_path / "delta")))["name"] == "delta"

    edge(test, drain_timeout_s=0.3)


class SlowPrepare(BasisStore):
    """A real store whose pool changes wait for a signal (a basis build that takes long)."""

    def __init__(self, *args, **kwargs):
        self.go = threading.Event()
        self.go.set()  # the first pool at once
        super().__init__(*args, **kwargs)
        self.go.clear()

    def prepare(self, adapters):
        self.go.wait(30)
        return super().prepare(adapters)


def test_inference_never_waits_for_a_basis_build(edge, tiny_adapters, tmp_path):
    async def test(server, mw, engine):
        shutil.copytree(tiny_adapters["beta"], tmp_path / "delta")
        server.bases = server.cache.store = SlowPrepare(server.bases.adapters, "cpu")
        registering = asyncio.ensure_future(server.register("delta", str(tmp_path / "delta")))
        await asyncio.sleep(0.2)  # the new pool's basis is being built
        assert not registering.done()
        assert (await asyncio.wait_for(call(mw, "tasks:alpha+beta@knots-ta"), 10))[0] == 200
        server.bases.go.set()
        assert (await asyncio.wait_for(registering, 30))["name"] == "delta"
        assert (await call(mw, "tasks:alpha+delta@knots-ta"))[0] == 200

    edge(test)


def test_the_rank_bound_holds_for_modules_wider_than_any_vllm_rank(tmp_path):
    """A dense trim of a 600×600 module can reach rank 600, above vLLM's 512: the same refusal, before
    any work; in the KnOTS basis the same merge has rank ≤ 8 and is planned as such."""
    from tiny import random_adapter

    from knots_serve.serving.errors import BadRequest
    from knots_serve.serving.merges.adapter_cache import AdapterCache
    from knots_serve.serving.merges.names import parse_model

    pool = {n: random_adapter(n, {"model.layers.0.mlp.up_proj": (600, 600)}, 4, seed=i) for i, n in enumerate("ab")}
    cache = AdapterCache(BasisStore(pool), tmp_path / "cache", 1 << 20, 512)
    with pytest.raises(BadRequest, match="full-rank in general .up to 600 in model.layers.0.mlp.up_proj."):
        cache.get(parse_model("tasks:a+b@ties", "knots-ties"))
    assert cache.store.plan(parse_model("tasks:a+b@knots-ties", "knots-ties"))[0] == 8
    assert cache.get(parse_model("tasks:a+b@knots-ties", "knots-ties")).rank == 8
    cache.close()


def test_an_unchecked_authorization_header_does_not_buy_a_fresh_rate_bucket(edge):
    """Without API keys the Authorization header is unchecked: rotating it must not reset the limit."""

    async def test(server, mw, engine):
        models = ("tasks:alpha+beta", "tasks:alpha+gamma", "tasks:beta+gamma")
        codes = [
            (await call(mw, m, headers=[(b"authorization", f"Bearer k{i}".encode())]))[0] for i, m in enumerate(models)
        ]
        assert codes == [200, 200, 429]

    edge(test, new_merge_burst=2, new_merge_rate=0.001)


def test_streamed_experiment_events_are_labelled_whatever_their_sse_shape():
    """Chat streams `data:` events; the Responses API puts an `event:` line first. Both get the arm."""
    import json
    import types

    from knots_serve.serving.http.arm_labels import ArmLabeller
    from knots_serve.serving.server.routing import Route

    remembered = []
    server = types.SimpleNamespace(outcomes=types.SimpleNamespace(remember=lambda *a: remembered.append(a)))
    labeller = ArmLabeller(server, Route("m", "exp", "a"), None)
    chat = labeller._event(b'data: {"id": "c1", "choices": []}')
    assert remembered == [("c1", "exp", "a")]  # at the first chunk: before the client has the response
    responses = labeller._event(b'event: response.created\ndata: {"type": "response.created"}')
    assert json.loads(chat[len(b"data: ") :])["knots"] == {"experiment": "exp", "arm": "a"}
    head, data = responses.split(b"\n")
    assert head == b"event: response.created" and json.loads(data[len(b"data: ") :])["knots"]["arm"] == "a"
    assert labeller._event(b"data: [DONE]") == b"data: [DONE]"


def test_the_spectral_methods_are_served_per_request_and_doge_is_refused_up_front(edge):
    async def test(server, mw, engine):
        ok = [
            {"model": "tasks:alpha+beta@knots-iso-c?alpha=1.3"},
            {"model": "tasks:alpha+beta@iso-cts?common=0.5&isotropize=1"},
            {"model": "tiny", "knots": {"tasks": ["alpha", "beta"], "method": "cart", "params": {"rank": 0.25}}},
            {"model": "exp"},  # arms: tsv, core-iso-c with LiNeS
        ]
        for body in ok:
            status, _, error = await call(mw, body=body | {"messages": [{"role": "user", "content": "hi"}]})
            assert status == 200, (body, error)
        assert engine.seen[0]["body"]["model"] == "tasks:alpha+beta@knots-iso-c?alpha=1.3"
        bad = {
            "tasks:alpha+beta@tsv?keep=0": ["keep=0.0", "(0, 1]"],
            "tasks:alpha+beta@iso-cts?common=1.5": ["common=1.5", "[0, 1]"],
            "tasks:alpha+beta@cart?rank=-1": ["rank=-1.0", "(0, 1]"],
            "tasks:alpha+beta@iso-c?top_k=0.3": ["takes no parameter 'top_k'"],
            "tasks:alpha+beta@core-doge": ["not composed per request", "POST /admin/pin", "knots-serve merge"],
        }
        seen = len(engine.seen)
        for model, words in bad.items():
            status, _, error = await call(mw, body={"model": model, "messages": [{"role": "user", "content": "x"}]})
            assert status == 400 and all(w in error["error"]["message"] for w in words), (model, error)
        assert len(engine.seen) == seen  # refused before any work reached vLLM

    edge(
        test,
        experiments={
            "exp": {
                "arms": {
                    "a": {"model": "tasks:alpha+beta@tsv?keep=0.5", "weight": 1},
                    "b": {"model": "tasks:alpha+beta@core-iso-c?lines=0.5", "weight": 1},
                }
            }
        },
    )
