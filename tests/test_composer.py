"""The basis store (resident pool) and the composed-adapter cache in process: compose once, LRU by bytes,
rank limit, pool changes, the compose bound, the auto basis rule; and the model-string grammar."""

import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import random_adapter

from knots_serve.adapters import load_adapter
from knots_serve.basis import Basis
from knots_serve.compose import MergeError
from knots_serve.serving import metrics
from knots_serve.serving.merges.adapter_cache import AdapterCache
from knots_serve.serving.merges.basis_store import SHARED_BASIS, BasisStore, UnknownTask
from knots_serve.serving.merges.names import parse_field, parse_model

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.v_proj": (16, 32)}


def pool(n=4):
    return {f"t{i}": random_adapter(f"t{i}", SHAPES, 4, seed=i) for i in range(n)}


def new_cache(adapters, cache_dir, cache_bytes, max_lora_rank, basis_file=None, **kw) -> AdapterCache:
    return AdapterCache(BasisStore(adapters, "cpu", basis_file), cache_dir, cache_bytes, max_lora_rank, **kw)


def repool(cache: AdapterCache, adapters) -> None:
    """What the server does when the pool changes."""
    cache.store.set_pool(adapters)
    cache.clear()


@pytest.fixture
def composer(tmp_path):
    return new_cache(pool(), tmp_path / "cache", cache_bytes=1 << 20, max_lora_rank=64)


def sel(s):
    return parse_model(s, "knots-ties")


def test_equal_merges_share_one_canonical_name():
    a = sel("tasks:t1+t0@knots-ties?alpha=1&top_k=0.2&w.t0=1")
    b = parse_field({"tasks": ["t0", "t1"], "method": "knots-ties", "params": {"top_k": 0.2}}, "knots-ties")
    assert a.canonical == b.canonical == sel("tasks:t0+t1").canonical == "tasks:t0+t1@knots-ties"
    assert (
        sel("tasks:t0+t1@knots-dare-ties?seed=2&basis=subset").canonical
        == "tasks:t0+t1@knots-dare-ties?seed=2&basis=subset"
    )
    assert sel("tasks:t0").spec is None  # one task, no method: the adapter itself


def test_compose_writes_a_loadable_adapter_and_caches_it(composer):
    c = composer.get(sel("tasks:t0+t2@knots-ta"))
    merged = load_adapter(c.path)
    want = sum(composer.store.adapters[t].modules["model.layers.0.self_attn.q_proj"].delta() for t in ("t0", "t2"))
    got = merged.modules["model.layers.0.self_attn.q_proj"].delta()
    assert torch.allclose(got, want, atol=1e-4)
    assert composer.get(sel("tasks:t2+t0@knots-ta")) is c


def test_only_a_held_merge_is_resolvable(composer):
    """The vLLM resolver serves a merge only while a routed request holds it (middleware.py)."""
    c = composer.get(sel("tasks:t0+t1@knots-ta"))
    assert composer.held(c.name) is None  # cached, but no request holds it
    held = composer.get(sel("tasks:t0+t1@knots-ta"), hold=True)
    assert composer.held(c.name) is held
    composer.release(held)
    assert composer.held(c.name) is None


def test_concurrent_gets_of_one_new_merge_compose_it_once(composer):
    misses = metrics.CACHE.labels("miss")._value.get()
    start = threading.Barrier(16)
    results = []

    def get():
        start.wait()
        results.append(composer.get(sel("tasks:t0+t1+t3@core-ties")))

    threads = [threading.Thread(target=get) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and len({id(r) for r in results}) == 1
    assert metrics.CACHE.labels("miss")._value.get() == misses + 1


def test_cache_is_bounded_in_bytes(tmp_path):
    composer = new_cache(pool(), tmp_path / "cache", cache_bytes=1, max_lora_rank=64)
    evicted = []
    composer.on_evict = lambda c: evicted.append(c.name)
    first = composer.get(sel("tasks:t0+t1"))
    second = composer.get(sel("tasks:t2+t3"))
    assert evicted == [first.name] and not first.path.exists() and second.path.exists()
    assert [c.name for c in composer.cached()] == [second.name]  # the newest stays even over the bound
    sizes = []
    composer.cache_bytes = 3 * second.nbytes
    for s in ("tasks:t0+t2", "tasks:t1+t3", "tasks:t0+t3", "tasks:t1+t2"):
        composer.get(sel(s))
        sizes.append(composer.cached_bytes())
    assert max(sizes) <= composer.cache_bytes and len(composer.cached()) == 3


def test_a_speculative_merge_goes_first_and_never_displaces_a_requested_one(tmp_path):
    composer = new_cache(pool(), tmp_path / "cache", cache_bytes=1 << 20, max_lora_rank=64)
    asked = composer.get(sel("tasks:t0+t1"))
    composer.cache_bytes = 2 * asked.nbytes  # room for two merges
    wasted = metrics.SPECULATIVE.labels("wasted")._value.get()
    ahead = composer.get(sel("tasks:t2+t3"), speculative=True)
    assert composer.describe()[-1]["model"] == ahead.name and composer.describe()[-1]["speculative"]
    third = composer.get(sel("tasks:t0+t2"), speculative=True)  # over the bound: the older guess goes
    assert sorted(c.name for c in composer.cached()) == sorted([asked.name, third.name])
    assert not ahead.path.exists() and metrics.SPECULATIVE.labels("wasted")._value.get() == wasted + 1
    newest = composer.get(sel("tasks:t1+t3"))  # asked for: the speculative merge nobody used goes first
    assert sorted(c.name for c in composer.cached()) == sorted([asked.name, newest.name])
    assert metrics.SPECULATIVE.labels("wasted")._value.get() == wasted + 2


def test_a_popular_merge_outlives_newer_ones_asked_for_once(tmp_path):
    """Eviction by the expected cost of a miss (GreedyDual-Size-Frequency), not recency: plain LRU would drop
    the popular merge here, the least recently used when the third arrives."""
    composer = new_cache(pool(), tmp_path / "cache", cache_bytes=1 << 20, max_lora_rank=64)
    composer.get(sel("tasks:t0+t3"))  # warm-up: a first compose is slower, and would look costlier
    composer.clear()
    popular = composer.get(sel("tasks:t0+t1"))
    for _ in range(20):
        composer.get(sel("tasks:t0+t1"))
    once = composer.get(sel("tasks:t2+t3"))
    composer.cache_bytes = popular.nbytes + once.nbytes
    evicted = []
    composer.on_evict = lambda c: evicted.append(c.name)
    newest = composer.get(sel("tasks:t1+t2"))
    assert evicted == [once.name]
    assert sorted(c.name for c in composer.cached()) == sorted([popular.name, newest.name])
    rows = {r["model"]: r for r in composer.describe()}
    assert rows[popular.name]["hits"] == 21 and rows[newest.name]["hits"] == 1


def test_subset_bases_are_cached_within_their_byte_bound_the_most_used_kept():
    store = BasisStore(pool(), "cpu")
    used = store.basis("knots", "subset", ("t0", "t1"))
    store.subset_bytes = 2 * used.nbytes()
    for _ in range(5):
        assert store.basis("knots", "subset", ("t0", "t1")) is used  # cached: the same object
    store.basis("knots", "subset", ("t2", "t3"))
    store.basis("knots", "subset", ("t1", "t2"))  # over the bound: the once-used t2+t3 goes
    assert set(store._subset) == {("knots", ("t0", "t1")), ("knots", ("t1", "t2"))}
    assert sum(b.nbytes() for b in store._subset.values()) <= store.subset_bytes


def test_adding_a_task_keeps_the_device_factors_of_the_others():
    adapters = pool(5)
    store = BasisStore({n: a for n, a in adapters.items() if n != "t4"}, "cpu")
    before = dict(store._device_adapters)
    prepared = store.prepare(adapters)
    assert all(prepared["_device_adapters"][n] is before[n] for n in before)  # not copied again
    assert "t4" in prepared["_device_adapters"] and prepared["_pool_id"] != store.pool_id  # a new pool
    assert prepared["_bases"] == {}  # its shared basis: on first use


def test_rank_above_the_server_limit_and_unknown_tasks_are_refused(tmp_path, composer):
    small = new_cache(pool(), tmp_path / "small", cache_bytes=1 << 20, max_lora_rank=8)
    with pytest.raises(MergeError, match="above this server's max_lora_rank 8"):
        small.get(sel("tasks:t0+t1+t2@knots-ties"))
    assert small.get(sel("tasks:t0+t1@knots-ta")).rank == 8  # rank 8 fits
    with pytest.raises(UnknownTask, match="unknown task"):
        composer.get(sel("tasks:t0+t9"))


def test_a_new_pool_drops_every_composed_merge(composer):
    c = composer.get(sel("tasks:t0+t1"))
    evicted = []
    composer.on_evict = lambda c: evicted.append(c.name)
    repool(composer, pool(5))
    assert evicted == [c.name] and composer.cached() == []
    again = composer.get(sel("tasks:t0+t1"))
    assert again.path != c.path  # a new path: vLLM must not reuse KV blocks cached for the old weights


def test_the_shared_basis_is_built_on_first_use_and_loaded_from_its_file_when_the_pool_matches(tmp_path):
    file, shared = tmp_path / "pool.safetensors", sel("tasks:t0+t3@knots-ties?basis=shared")
    first = new_cache(pool(), tmp_path / "a", 1 << 20, 64, basis_file=file)
    first.get(sel("tasks:t0+t3@knots-ties"))  # basis auto: the subset's own
    assert not file.exists() and first.store.shared_nbytes() == 0  # nothing needed the pool's basis yet
    a = load_adapter(first.get(shared).path)
    assert file.exists() and first.store.shared_nbytes() > 0
    mtime = file.stat().st_mtime_ns
    second = new_cache(pool(), tmp_path / "b", 1 << 20, 64, basis_file=file)
    b = load_adapter(second.get(shared).path)
    assert file.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert all(torch.equal(a.modules[m].A, b.modules[m].A) for m in a.modules)
    new_cache(pool(3), tmp_path / "c", 1 << 20, 64, basis_file=file).get(sel("tasks:t0+t2@knots-ties?basis=shared"))
    assert file.stat().st_mtime_ns != mtime  # another pool: rebuilt and saved
    file.write_bytes(b"not a basis")
    new_cache(pool(), tmp_path / "d", 1 << 20, 64, basis_file=file).get(shared)  # unreadable: built again
    assert Basis.load(file).fingerprint == first.store.pool_id


def test_api_servers_load_the_shared_basis_another_one_built_for_that_pool_and_only_that_pool(tmp_path):
    """Several API servers (group.py): the first to need a pool's shared basis builds it and saves it in its
    instance dir; the others find it there by the pool's fingerprint and load it instead of building it,
    never for another pool; a pool change deletes the copy saved for the old pool."""
    owner_dir = tmp_path / "knots-1-000000000000"  # another server's instance dir under the shared cache_dir
    owner = BasisStore(pool(4), "cpu")
    owner.save_dir = owner_dir
    built = owner.basis("knots", "shared", ("t0", "t1"))
    path = owner_dir / SHARED_BASIS.format(owner.pool_id)
    saved = Basis.load(path)
    module = next(iter(saved.modules))
    saved.modules[module].coef[0].add_(1.0)  # a mark only a load can carry (the fingerprint is kept)
    saved.save(path)

    def coef(store):
        return store.basis("knots", "shared", ("t0", "t1")).modules[module].coef[0]

    assert not torch.equal(coef(BasisStore(pool(4), "cpu")), saved.modules[module].coef[0])  # not shared: built
    other = BasisStore(pool(4), "cpu")
    other.shared_root = tmp_path
    assert torch.equal(coef(other), saved.modules[module].coef[0])  # loaded
    five = BasisStore(pool(5), "cpu")
    five.shared_root = tmp_path
    path.rename(owner_dir / SHARED_BASIS.format(five.pool_id))  # pool 4's basis under pool 5's name
    assert not torch.equal(coef(five), saved.modules[module].coef[0])  # refused: built
    owner.install(owner.prepare(pool(3)))
    assert built.fingerprint != owner.pool_id and not list(owner_dir.glob(SHARED_BASIS.format(built.fingerprint)))


def test_servers_sharing_a_cache_dir_remove_only_dead_servers_files(tmp_path):
    root = tmp_path / "cache"
    first = new_cache(pool(), root, 1 << 20, 64)
    merged = first.get(sel("tasks:t0+t1")).path
    basis = first.store.basis_file_for(sel("tasks:t0+t1@knots-ties?basis=shared"), first.cache_dir)
    assert merged.parent == basis.parent == first.cache_dir and first.cache_dir.parent == root
    dead = root / "knots-1-0123456789ab"  # a crashed server's: its lock file is there, nobody holds it
    (dead / ("0" * 20)).mkdir(parents=True)
    (dead / "lock").touch()
    starting = root / "knots-2-0123456789ab"  # a server between mkdir and its lock: not known to be dead
    starting.mkdir()
    (root / "precious.txt").write_text("not ours")
    (root / "notes").mkdir()
    second = new_cache(pool(), root, 1 << 20, 64)
    assert merged.exists() and basis.exists()  # the first server is alive: its files stay
    assert not dead.exists() and starting.exists() and (root / "precious.txt").exists() and (root / "notes").exists()
    assert second.get(sel("tasks:t0+t1")).path.parent == second.cache_dir != first.cache_dir
    first.close()  # a normal exit removes the instance's own directory, nothing else
    assert not first.cache_dir.exists() and second.cache_dir.exists()
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted(["notes", "precious.txt", starting.name, second.cache_dir.name])


def test_a_killed_servers_cache_dir_is_removed_by_the_next_start(tmp_path):
    root = tmp_path / "cache"
    code = (
        f"import os, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from test_composer import new_cache, pool, sel; from pathlib import Path; "
        f"c = new_cache(pool(), Path({str(root)!r}), 1 << 20, 64); c.get(sel('tasks:t0+t1')); "
        "print(c.cache_dir, flush=True); os.kill(os.getpid(), 9)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    killed = Path(out.stdout.strip())
    assert killed.parent == root and any(killed.iterdir()), out.stderr
    new_cache(pool(), root, 1 << 20, 64)
    assert not killed.exists()


def test_merges_are_written_in_the_engines_lora_dtype(tmp_path):
    """A bfloat16 engine converts every LoRA to bfloat16 when it loads it: the merge is written so, half the
    bytes, the values the engine would hold anyway (float32 rounded to nearest)."""
    from safetensors.torch import load_file
    from vllm.config import LoRAConfig

    from knots_serve.serving.server.hub import lora_dtype

    engine = SimpleNamespace(vllm_config=SimpleNamespace(lora_config=LoRAConfig(lora_dtype=torch.bfloat16)))
    assert lora_dtype(engine) == torch.bfloat16 and lora_dtype(None) == torch.float32
    half = new_cache(pool(), tmp_path / "half", 1 << 20, 64, dtype=lora_dtype(engine))
    full = new_cache(pool(), tmp_path / "full", 1 << 20, 64)
    got, want = (c.get(sel("tasks:t0+t2@knots-ties")) for c in (half, full))
    a, b = (load_file(c.path / "adapter_model.safetensors") for c in (got, want))
    assert a.keys() == b.keys()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, b[k].bfloat16()) for k, t in a.items())
    assert got.nbytes < 0.6 * want.nbytes
