"""Several API server processes of one vLLM kept in step (group.py): two real KnotsServers (the HTTP edge without
an engine, asgi_edge.py), joined in one group over real unix sockets, on one SQLite store and one cache_dir, as
the API servers of `--api-server-count 2` are. What one changes through the admin API the other serves when the
call returns (no poll: store_poll_s is an hour here); a drain closes both; a new merge is composed once."""

import asyncio
import os
import shutil

import pytest
from asgi_edge import Engine, call, make_server

from knots_serve.serving.cluster.group import Group, StripedIds
from knots_serve.serving.errors import Unavailable
from knots_serve.serving.http.middleware import KnotsMiddleware
from knots_serve.serving.server import pins
from knots_serve.serving.server.hub import KnotsServer
from knots_serve.serving.state.experiments import Experiment

ARMS = {"arms": {"ta": {"model": "tasks:alpha+beta@knots-ta", "weight": 1}, "plain": {"model": "alpha", "weight": 1}}}


@pytest.fixture
def group(tmp_path, tiny_adapters):
    """run(test, **config): test(a, b, on, engine) in an event loop: API servers 0 and 1 of one group; on(server,
    model) is one request through that server's middleware: (status, headers, body)."""
    shutil.copytree(tiny_adapters["gamma"], tmp_path / "adapters" / "delta")

    def run(test, **settings):
        async def main():
            shared = {
                "store": "sqlite",
                "state_dir": str(tmp_path / "state"),
                "cache_dir": str(tmp_path / "cache"),
                "store_poll_s": 3600,
                "adapter_dirs": [str(tmp_path / "adapters")],
            } | settings
            servers = []
            for i in range(2):
                (tmp_path / str(i)).mkdir()
                servers.append(make_server(tmp_path / str(i), tiny_adapters, **shared))
            (tmp_path / "group").mkdir()
            await asyncio.gather(*(s.join(Group(tmp_path / "group", i, 2, s)) for i, s in enumerate(servers)))
            engine = Engine()

            async def on(server: KnotsServer, model: str):
                KnotsMiddleware.server = server
                return await call(KnotsMiddleware(engine), model)

            try:
                await test(*servers, on, engine)
            finally:
                KnotsMiddleware.server = None
                engine.release.set()
                for s in servers:
                    s.close()

        asyncio.run(main())

    return run


def test_a_registration_through_one_api_server_is_served_by_the_other_when_the_call_returns(group, tmp_path):
    async def test(a, b, on, engine):
        await a.register("delta", str(tmp_path / "adapters" / "delta"))
        assert "delta" in b.bases.adapters  # applied by b before a's call returned
        assert b.bases.pool_id == a.bases.pool_id
        assert not list(a.cache.cache_dir.glob("basis-*"))  # the basis a saved for b: gone once b applied it
        assert (await on(b, "tasks:alpha+delta@knots-ta"))[0] == 200
        await b.unregister("delta")
        assert "delta" not in a.bases.adapters
        assert (await on(a, "tasks:alpha+delta@knots-ta"))[0] == 404

    group(test)


def test_experiments_changed_through_one_are_served_by_the_other_when_the_call_returns(group):
    async def test(a, b, on, engine):
        await a.put_experiment("ab", Experiment.model_validate(ARMS))
        assert b.experiments["ab"] == a.experiments["ab"]
        assert (await on(b, "ab"))[0] == 200
        await b.set_weights("ab", {"ta": 0})
        assert a.experiments["ab"].arms["ta"].weight == 0
        await b.delete_experiment("ab")
        assert "ab" not in a.experiments

    group(test)


def test_a_drain_closes_every_api_server_of_the_group_and_hands_the_pin_state_over(group):
    async def test(a, b, on, engine):
        engine.release.clear()
        stuck = asyncio.ensure_future(on(b, "tiny"))  # a request inside API server 1
        while not engine.seen:
            await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match=r"API server 1: 1 request\(s\) still in flight after the drain timeout"):
            async with pins.drained(a):
                pytest.fail("drained while API server 1 still had a request inside")
        async with asyncio.timeout(5):  # both doors open again
            for s in (a, b):
                async with s.gate.shared():
                    pass
        engine.release.set()
        assert (await stuck)[0] == 200

        async with pins.drained(a):
            waiting = asyncio.ensure_future(on(b, "tiny"))
            await asyncio.sleep(0.2)
            assert not waiting.done() and len(engine.seen) == 1  # held at API server 1's door
            a.pinned = {"model": "tasks:alpha+beta@knots-ta"}
        assert (await waiting)[0] == 200
        assert b.pinned == {"model": "tasks:alpha+beta@knots-ta"}  # what a pinned, b routes by

    group(test, drain_timeout_s=0.3)


def test_one_pin_at_a_time_in_the_group(group):
    """A pin prepares its merge in the workers, then writes it: another pin, through any API server, waits."""

    async def test(a, b, on, engine):
        async def pin_through_b():
            async with pins.one_at_a_time(b):
                pass

        async with pins.one_at_a_time(a):
            other = asyncio.ensure_future(pin_through_b())
            await asyncio.sleep(0.2)
            assert not other.done()  # waits for a's to end
        await asyncio.wait_for(other, 5)

    group(test)


def test_a_new_merge_is_composed_once_for_the_group_and_each_process_owns_its_files(group):
    def weights(server, name):
        return next(c.path for c in server.cache.cached() if c.name == name) / "adapter_model.safetensors"

    async def test(a, b, on, engine):
        one, two = "tasks:alpha+beta@knots-ties", "tasks:beta+gamma@knots-ties?top_k=0.5"
        assert (await on(a, one))[0] == 200 and (await on(b, one))[0] == 200
        assert weights(a, one) != weights(b, one) and os.path.samefile(weights(a, one), weights(b, one))
        answers = await asyncio.gather(on(a, two), on(b, two))  # at once: one composes, the other waits, links
        assert [s for s, _, _ in answers] == [200, 200] and os.path.samefile(weights(a, two), weights(b, two))
        gone, kept = weights(a, one), weights(b, one)
        a.cache.clear()  # a's files deleted: b's name for the same bytes stays
        assert not gone.exists() and kept.stat().st_nlink == 1
        assert (await on(b, one))[0] == 200

    group(test)


def test_an_api_server_that_cannot_be_reached_stops_a_swap_and_is_named(group, tmp_path):
    async def test(a, b, on, engine):
        b.group.close()
        with pytest.raises(Unavailable, match=r"API server 1 cannot be reached .*nothing changed"):
            async with pins.drained(a):
                pytest.fail("drained without API server 1")
        async with asyncio.timeout(5):
            async with a.gate.shared():  # the door of the one that asked is open
                pass
        with pytest.raises(Unavailable, match=r"the change is saved and served by this API server, but not yet"):
            await a.register("delta", str(tmp_path / "adapters" / "delta"))
        assert "delta" in a.bases.adapters and "delta" in a.tasks.items()

    group(test)


def test_lora_ids_taken_in_turns_never_meet_and_follow_the_ids_given_at_start():
    counters = [StripedIds(3, i, 3) for i in range(3)]  # three tasks loaded at start: ids 1..3 in every process
    ids = [c.inc(1) for _ in range(50) for c in counters]
    assert len(set(ids)) == len(ids) and min(ids) == 4
