"""Faults on the running server: a task's adapter files deleted or corrupted after registration, and a
client that disconnects in the middle of a stream."""

import json
import shutil
import threading
import time
import urllib.request

import httpx
import openai
import pytest
from conftest import ADMIN_KEY
from test_pinning import MERGE, pin, unpin
from test_serving import PROMPTS, complete, http


def counters(server) -> tuple[float, float]:
    """vLLM's requests finished (by stop or length) and tokens generated."""
    return vllm_metric(server, "vllm:request_success_total"), vllm_metric(server, "vllm:generation_tokens_total")


def settled_counters(server) -> tuple[float, float]:
    """counters() once they stop moving: vLLM records a finished request's stats a moment after its
    response (a clean-clone run read 449 before and 450 after, from the warm-up request)."""
    last, deadline = counters(server), time.time() + 10
    while time.time() < deadline:
        time.sleep(0.3)
        now = counters(server)
        if now == last:
            return now
        last = now
    return last


def vllm_metric(server, name) -> float:
    text = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("fault", ["deleted", "corrupted"])
def test_adapter_files_lost_after_registration_refuse_the_task_alone_and_merges_keep_working(
    server, tiny_adapters, fault
):
    c = server.client()
    copy = server.root / "extra" / f"lost-{fault}"
    shutil.copytree(tiny_adapters["gamma"], copy)
    status, body = http(server, "POST", "/admin/tasks", {"name": "lost", "path": str(copy)}, key=ADMIN_KEY)
    assert status == 201, body
    try:
        alone = complete(c, "tasks:lost", PROMPTS[0])
        assert alone == complete(c, "gamma", PROMPTS[0])
        if fault == "deleted":
            shutil.rmtree(copy)
        else:
            weights = copy / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
        for model in ("tasks:lost", "lost"):
            with pytest.raises(openai.APIStatusError) as e:
                complete(c, model, PROMPTS[0])
            assert e.value.status_code == 503 and "'lost'" in e.value.message and "on disk" in e.value.message
        # merges come from the weights in memory: exact, and equal to the same merge with gamma
        assert complete(c, "tasks:alpha+lost@knots-ta?basis=subset", PROMPTS[0]) == complete(
            c, "tasks:alpha+gamma@knots-ta?basis=subset", PROMPTS[0]
        )
        assert complete(c, "tasks:alpha+beta", PROMPTS[1])  # the rest keeps serving
    finally:
        assert http(server, "DELETE", "/admin/tasks/lost", key=ADMIN_KEY)[0] == 200


def test_a_client_that_disconnects_mid_stream_is_aborted_and_leaks_nothing(server):
    """The request is aborted in vLLM (none is left running, and they do not all run to their max_tokens: the
    tiny model may finish one before the hang-up reaches it), the merge hold and the drain gate are released:
    a pin right after completes, and the server answers as before."""
    c = server.client()
    before = complete(c, "tasks:alpha+gamma", PROMPTS[0])
    finished, tokens = settled_counters(server)
    body = {
        "model": "tasks:alpha+gamma",
        "prompt": PROMPTS[0],
        "max_tokens": 240,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    hangups = 5  # the tiny model may finish a stream before its hang-up reaches vLLM; not all five
    for _ in range(hangups):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first chunk, then hang up
    deadline = time.time() + 10
    while vllm_metric(server, "vllm:num_requests_running") and time.time() < deadline:
        time.sleep(0.2)
    assert vllm_metric(server, "vllm:num_requests_running") == 0
    now_finished, now_tokens = settled_counters(server)
    assert now_finished - finished < hangups and now_tokens - tokens < hangups * 240  # not all ran to their end
    t0 = time.perf_counter()
    try:
        info = pin(server, MERGE)
        assert info["drain_s"] < 5
    finally:
        unpin(server)
    assert time.perf_counter() - t0 < 60
    finished, tokens = counters(server)
    assert complete(c, "tasks:alpha+gamma", PROMPTS[0]) == before
    now_finished, now_tokens = counters(server)  # the counters do count (tokens: the aborted streams'
    assert now_finished == finished + 1 and now_tokens >= tokens + 8  # last steps may land late: >=)


def sse_text(lines) -> str:
    """The text of a streamed completion's SSE lines."""
    return "".join(
        json.loads(line[6:])["choices"][0]["text"]
        for line in lines
        if line.startswith("data: ") and line != "data: [DONE]"
    )


def test_a_pin_waits_for_a_stream_in_flight_then_swaps(server):
    """The known limit (docs/RELIABILITY.md): a pin drains, so it waits for a stream in flight, and the
    whole stream comes from one weight set (the base) even though the pin was asked for mid-stream."""
    body = {
        "model": "tiny",
        "prompt": PROMPTS[0],
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        alone = sse_text(r.iter_lines())
    done = {}
    swap = threading.Thread(target=lambda: done.setdefault("pin", pin(server, MERGE)))
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            swap.start()  # asked for while the stream is still being generated
            rest = [line for line in lines]
        text = sse_text([first, *rest])
        swap.join(60)
        assert text == alone  # no token of the stream came from the merged weights
        assert done["pin"]["model"] == MERGE
        # pinned now, and the merge changes this answer: so a swap mid-stream would have shown in `text`
        long = complete(server.client(), "tiny", PROMPTS[0], max_tokens=200, extra_body={"ignore_eos": True})
        assert long != alone
    finally:
        if swap.ident:  # started
            swap.join(60)
        http(server, "DELETE", "/admin/pin", key=ADMIN_KEY)  # 404 if the pin never happened: fine
