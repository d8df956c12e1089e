"""The operator console (/console) in a real browser: Debian's Chromium, driven by Playwright, against the
session's real server on the tiny model. Without Chromium these tests fail, saying so; KNOTS_BROWSER_TESTS=skip
skips them explicitly. With KNOTS_CONSOLE_SCREENSHOTS=DIR each view's screenshot is saved there (docs/console)."""

import contextlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
from conftest import ADMIN_KEY
from playwright.sync_api import expect
from test_serving import http

CHROMIUM = os.environ.get("KNOTS_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("KNOTS_CONSOLE_SCREENSHOTS")
# headless, and no background traffic to Google's hosts: this machine's network is closed
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
FLAGS += ["--disable-sync", "--no-first-run", "--disable-quic"]
PLAY_MODELS = ("tasks:alpha+beta@knots-ta", "tasks:beta+gamma@knots-ties")


@pytest.fixture(scope="module")  # not session: while Playwright's sync API is open, asyncio.run() fails elsewhere
def browser():
    if os.environ.get("KNOTS_BROWSER_TESTS") == "skip":
        pytest.skip("KNOTS_BROWSER_TESTS=skip: the console's browser tests were skipped on request")
    if not shutil.which(CHROMIUM):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the console's browser tests need it (apt-get install chromium; or "
            "KNOTS_CHROMIUM=PATH), or set KNOTS_BROWSER_TESTS=skip to skip them explicitly",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def console(browser, srv):
    """A fresh browser context (empty session storage) on a server's console; JavaScript errors and CSP
    violations fail the test."""
    context = browser.new_context(base_url=srv.url, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(90_000)  # a new merge is composed on the CPU the server shares with the tests
    problems = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: "Content Security Policy" in m.text and problems.append(m.text))
    page.goto("/console")
    yield page
    context.close()
    assert not problems


@pytest.fixture
def page(browser, server):
    with console(browser, server) as page:
        yield page


def log_in(page, key=ADMIN_KEY, api_key=None):
    page.fill("#key", key)
    if api_key:
        page.fill("#api-key", api_key)
    page.click("#login button[type=submit]")


def play(page, *models, prompt="hello world", max_tokens=8):
    """Runs the playground on the models and waits until every column is done or failed."""
    view(page, "playground")
    page.fill("#play textarea[name=prompt]", prompt)
    page.fill("#play input[name=max_tokens]", str(max_tokens))
    inputs = page.locator("#play-models input")
    for i in range(inputs.count()):
        inputs.nth(i).fill(models[i] if i < len(models) else "")
    page.click("#play button[type=submit]")
    page.locator("#answers .answer.done, #answers .answer.failed").nth(len(models) - 1).wait_for()


def view(page, name):
    page.click(f"nav a[href='#{name}']")
    page.wait_for_selector(f"section#{name}.shown")


def shot(page, name):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def test_a_wrong_key_shows_the_error_and_no_data(page, server):
    log_in(page, "not-the-key")
    page.wait_for_selector("#status.error")
    assert "wrong admin key" in page.text_content("#status")
    assert page.is_hidden("main") and page.is_visible("#login")
    assert "alpha" not in page.content()  # no task, merge or experiment reached the page
    assert page.evaluate("sessionStorage.length") == 0 and "key" not in page.url


def test_the_pool_shows_each_task_and_the_shared_basis(page, server):
    log_in(page)
    page.wait_for_selector("#tasks tbody tr")
    rows = page.locator("#tasks tbody tr").all_inner_texts()
    assert [r.split("\t")[0] for r in rows] == ["alpha", "beta", "gamma"]
    doc = http(server, "GET", "/admin/tasks", key=ADMIN_KEY)[1]
    tasks, fingerprint = {t["name"]: t for t in doc["tasks"]}, doc["basis"]["fingerprint"]
    assert tasks["beta"]["model"] in rows[1] and tasks["beta"]["source"] in rows[1]
    for row, name in zip(rows, ["alpha", "beta", "gamma"]):  # statistics: from how many tokens, or none yet
        stats = tasks[name]["stats"]
        assert (f"{stats['tokens']} tokens ({stats['examples']} examples)" if stats else "none") in row
    assert fingerprint and fingerprint in page.text_content("#basis")
    # the key stays in the tab's session storage, never in the URL
    assert page.evaluate("sessionStorage.getItem('knots-admin-key')") == ADMIN_KEY and ADMIN_KEY not in page.url
    shot(page, "pool")
    # adding a task the server cannot read shows the admin route's own error, and the pool is unchanged
    page.fill("#add-task input[name=name]", "delta")
    page.fill("#add-task input[name=path]", "/nowhere/delta")
    page.click("#add-task button[type=submit]")
    page.wait_for_selector("#status.error")
    status = page.text_content("#status")
    assert status.startswith("add delta: ") and "/nowhere/delta" in status
    assert len(http(server, "GET", "/admin/tasks", key=ADMIN_KEY)[1]["tasks"]) == 3
    # logging out leaves nothing read with the key: neither the key nor the data
    page.click("#logout")
    assert page.is_visible("#login") and page.evaluate("sessionStorage.length") == 0
    assert fingerprint not in page.content() and "gamma" not in page.content()


def test_the_playground_streams_two_merges_side_by_side(page, server):
    log_in(page)
    play(page, *PLAY_MODELS)
    answers = {}
    for box in page.locator("#answers .answer").all():
        model = box.get_attribute("data-model")
        answers[model] = box.locator(".text").inner_text()
        meta = box.locator(".meta").inner_text()
        assert f"served by {model} · 8 tokens · TTFT" in meta
    # each column is what the API answers for its merge, and the two merges answer differently
    client = server.client()
    for model in PLAY_MODELS:
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello world"}], max_tokens=8, temperature=0
        )
        assert answers[model] == chat.choices[0].message.content
    assert answers[PLAY_MODELS[0]] != answers[PLAY_MODELS[1]]
    shot(page, "playground")
    # both merges are now cached: the merges view lists them
    view(page, "merges")
    page.wait_for_selector("#cached tbody tr")
    cached = page.text_content("#cached tbody")
    assert all(m in cached for m in PLAY_MODELS)
    assert "composed" in cached  # where their files came from (this server; not another's, nor the fleet)
    # a merge that does not exist answers in its column with the server's error
    play(page, "tasks:alpha+nosuch")
    assert "nosuch" in page.locator("#answers .answer.failed .meta").inner_text()


def test_the_playground_sends_the_api_key_where_inference_needs_one(browser, guarded):
    model = PLAY_MODELS[0]
    with console(browser, guarded) as page:  # the admin key alone: the admin views work, inference does not
        log_in(page)
        page.wait_for_selector("#tasks tbody tr")
        play(page, model)
        assert page.locator("#answers .answer.failed .meta").inner_text() == "HTTP 401: Unauthorized"
        assert "log in with the API key too" in page.text_content("#status")
    with console(browser, guarded) as page:
        log_in(page, api_key=guarded.api_key)
        play(page, model)
        chat = guarded.client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello world"}], max_tokens=8, temperature=0
        )
        assert page.locator("#answers .answer.done .text").inner_text() == chat.choices[0].message.content


def hold_a_request(server) -> socket.socket:
    """A streamed answer the client does not read, through a 4 KiB receive buffer: the server cannot finish
    sending it, so the request stays in flight until the socket is closed. It must outgrow the server's TCP
    send buffer, which Linux grows up to 4 MiB (tcp_wmem): the chat form with 20 top logprobs is 5.2 MB here
    (the completions form, 2.6 MB, sometimes fit and the request ended before the pin could see it)."""
    messages = [{"role": "user", "content": "hello"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 200, "n": 16, "logprobs": True, "top_logprobs": 20}
    body = json.dumps(body | {"stream": True, "ignore_eos": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = server.url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert sock.recv(12) == b"HTTP/1.1 200"
    return sock


def test_pin_and_unpin_from_the_merges_view_show_the_drain_as_it_happens(page, server):
    model = "tasks:alpha+gamma@knots-ta"
    log_in(page)
    view(page, "merges")
    held = hold_a_request(server)
    try:
        page.fill("#pin-form input[name=model]", model)
        page.click("#pin-form button[type=submit]")
        # the pin waits for the answer in flight, and the page says so while it waits
        progress = f"pinning {model}: draining (1 request(s) in flight)"
        expect(page.locator("#pin-progress")).to_have_text(progress, timeout=60_000)
        shot(page, "merges-draining")
        held.close()  # the client goes away: its request ends, the drain is done, the merge goes in
        expect(page.locator("#pinned")).to_have_text(model, timeout=60_000)
        expect(page.locator("#pin-progress")).to_have_text("")
        assert http(server, "GET", "/admin/pin", key=ADMIN_KEY)[1]["pinned"]["model"] == model
        shot(page, "merges")
        page.click("#unpin")
        expect(page.locator("#pinned")).to_have_text("none", timeout=60_000)
        assert http(server, "GET", "/admin/pin", key=ADMIN_KEY)[1]["pinned"] is None
    finally:
        held.close()
        if http(server, "GET", "/admin/pin", key=ADMIN_KEY)[1]["pinned"]:
            http(server, "DELETE", "/admin/pin", key=ADMIN_KEY)


def arm_feedback(server, experiment, arm, scores):
    """Requests to one arm (the arm header forces it), each scored as a client would."""
    client = server.client()
    for score in scores:
        r = client.chat.completions.create(
            model=experiment,
            messages=[{"role": "user", "content": "hello world"}],
            max_tokens=2,
            extra_headers={"X-Knots-Arm": arm},
        )
        assert http(server, "POST", "/v1/feedback", {"id": r.id, "score": score})[0] == 200


def test_an_experiment_is_created_charted_and_its_winner_promoted(page, server, recipes_file):
    name, winner = "console-exp", "tasks:alpha+beta@knots-ties"
    report = server.root / "state" / "tune-report"
    log_in(page)
    view(page, "experiments")
    try:
        page.fill("#new-experiment input[name=name]", name)
        for i, (arm, model) in enumerate((("ties", winner), ("ta", "tasks:alpha+beta@knots-ta"))):
            page.locator("#new-arms input[name=arm]").nth(i).fill(arm)
            page.locator("#new-arms input[name=arm-model]").nth(i).fill(model)
        page.click("#new-experiment button[type=submit]")
        card = page.locator(f".experiment[data-name='{name}']")
        card.wait_for()
        assert http(server, "GET", "/admin/experiments", key=ADMIN_KEY)[1][name]["arms"]["ties"]["model"] == winner
        # no feedback yet: promote is off, and the card says why (the 409's reason)
        assert card.locator(".promote").is_disabled()
        assert "does not yet separate" in card.locator(".promote-state").inner_text()
        arm_feedback(server, name, "ties", [0.9, 0.92, 0.94])
        arm_feedback(server, name, "ta", [0.1, 0.12, 0.14])
        # the next reads show the feedback, enable promote, and the charts gain points over time
        expect(card.locator(".promote")).to_be_enabled(timeout=30_000)
        assert card.locator(".promote-state").inner_text() == f"ready: promotes {winner}"
        rows = card.locator("tr.arm").all_inner_texts()
        assert "0.920 [" in rows[1] and "0.120 [" in rows[0]  # arms sorted: ta, ties
        charts = card.locator(".uplot")
        assert charts.count() == 4
        for chart in charts.all():  # a point per read of the report, at most every 5 s
            expect(chart).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d+)$"), timeout=60_000)
        shot(page, "experiments")
        # weights are edited live
        card.locator("input.weight[data-arm='ta']").fill("0")
        card.locator(".save-weights").click()
        deadline = time.monotonic() + 30
        while http(server, "GET", "/admin/experiments", key=ADMIN_KEY)[1][name]["arms"]["ta"]["weight"] != 0:
            assert time.monotonic() < deadline, "the weight typed in the console was not saved"
            time.sleep(0.2)
        card.locator(".promote").click()
        expect(card.locator(".promote-state")).to_have_text(re.compile("^promoted: "), timeout=30_000)
        # the recipe now serves tasks:alpha+beta, and the recipes view shows where it came from
        view(page, "recipes")
        page.wait_for_selector("#recipe-table tbody tr")
        row = page.locator("#recipe-table tbody tr").first.inner_text()
        assert "alpha+beta" in row and winner in row and f"ab:{name}" in row
        assert "No tuning report" in page.text_content("#tune-report")
        # a tuning report, as `knots-serve tune` writes it, is shown with its table and picture
        write_tuning_report(report)
        page.reload()
        page.wait_for_selector("#tune-report table")
        assert "beta+gamma" in page.locator("#tune-report table").first.inner_text()
        picture = page.locator("#tune-report img")
        assert picture.evaluate("img => img.complete && img.naturalWidth > 0")
        shot(page, "recipes")
    finally:
        http(server, "DELETE", f"/admin/experiments/{name}", key=ADMIN_KEY)
        shutil.rmtree(report, ignore_errors=True)


def write_tuning_report(where: Path) -> None:
    """tune.py's report of one tuned subset (made-up scores: the view is tested here, not the tuning)."""
    from knots_serve.recipes import Recipe
    from knots_serve.tune import plot, report_markdown

    recipe = Recipe(("beta", "gamma"), "iso-c", score=0.61, default_score=0.55, date="2026-12-05")
    stats = {"score": [0.61, 0.58, 0.64], "default": [0.55, 0.52, 0.58], "gain": [0.06, 0.02, 0.1]}
    log = [{"tasks": ["beta", "gamma"], "method": "iso-c", "params": {}, "score": 0.61, "outcome": "tuned"}]
    log[0]["versus_default"] = stats | {"replaced": True}
    meta = {"date": "2026-12-05", "data": "val.jsonl", "methods": ["iso-c"], "default_method": "knots-ties"}
    where.mkdir(parents=True)
    (where / "report.md").write_text(report_markdown([recipe], log, meta | {"wall_s": 60}))
    plot([recipe], where / "report.png")
