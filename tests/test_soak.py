"""A short soak (benchmarks/soak.py) on the guarded server: concurrent clients asking random merges — more
than the LoRA slots and than the compose cache holds — while a task is registered/unregistered and a merge
pinned/unpinned; every answer equals the one computed alone; memory and cache stay bounded."""

import asyncio
import os
import shutil
import sys

from conftest import ADMIN_KEY

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from soak import Soak, merge_models

SOAK_SECONDS = float(os.environ.get("KNOTS_SOAK_SECONDS", 30))


def test_short_soak_serves_every_request_right_under_eviction_pinning_and_registry_changes(guarded, tiny_adapters):
    extra = guarded.root / "extra"
    shutil.copytree(tiny_adapters["alpha"], extra / "delta", dirs_exist_ok=True)
    models = merge_models(["alpha", "beta", "gamma"], limit=16) + ["tiny", "alpha", "tasks:beta"]
    soak = Soak(guarded.url, models, ["the cat sat on the", "one two three"], guarded.api_key, ADMIN_KEY, guarded.pid)
    side = os.environ.get("KNOTS_SOAK_SIDE", "pin,register").split(",")
    stats = asyncio.run(
        soak.run(
            SOAK_SECONDS,
            clients=8,
            pin=models[0] if "pin" in side else None,
            task=("delta", extra / "delta") if "register" in side else None,
            check="alpha",
        )
    )
    print(stats)
    assert stats["failures"] == 0, soak.failures[:10]
    assert stats["requests"] > 50 and stats["pins"] >= 1 and stats["registrations"] >= 1
    merges = {m for m in soak.served if m.startswith("tasks:") and "@" in m}
    slots, cache = guarded.config["max_loras"], guarded.config["cache_bytes"]
    assert len(merges) > 3 * slots
    # the cache holds ~2 merges; it may exceed its bound only by merges in use (at most one per client)
    assert 0 < stats["peak_cache_kib"] << 10 <= cache + 8 * 200_000
    assert stats["peak_rss_mib"] < 16 << 10
