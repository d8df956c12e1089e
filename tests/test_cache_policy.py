"""The merge cache's eviction policy (serving/merges/cache_policy.py), on its own: GreedyDual-Size-Frequency."""

from knots_serve.serving.merges.cache_policy import GreedyDualSizeFrequency


def filled(*entries):
    policy = GreedyDualSizeFrequency()
    for key, cost, size in entries:
        policy.add(key, cost, size)
    return policy


def test_frequency_cost_and_size_each_decide_what_goes_first():
    policy = filled(("often", 1.0, 100), ("once", 1.0, 100))
    for _ in range(3):
        policy.hit("often")
    assert policy.victims(100, lambda k: True) == ["once"]
    assert filled(("cheap", 0.1, 100), ("dear", 5.0, 100)).victims(100, lambda k: True) == ["cheap"]
    assert filled(("big", 1.0, 1000), ("small", 1.0, 100)).victims(100, lambda k: True) == ["big"]


def test_it_evicts_until_the_bytes_fit_and_passes_over_what_is_in_use():
    policy = filled(("a", 1.0, 100), ("b", 2.0, 100), ("c", 3.0, 100), ("d", 4.0, 100))
    assert policy.victims(400, lambda k: True) == []
    assert policy.victims(200, lambda k: k != "a") == ["b", "c"]  # a is in use: passed over
    assert sorted(policy.entries) == ["a", "d"]
    assert policy.victims(0, lambda k: False) == []  # nothing evictable: nothing goes, over the bound


def test_the_clock_ages_out_an_entry_that_was_hot_long_ago():
    policy = filled(("old", 1.0, 100))
    for _ in range(4):
        policy.hit("old")  # priority 5 × 1/100
    for i in range(10):  # later traffic: each new merge evicts the cheapest, and L rises with it
        policy.add(f"new{i}", 1.0, 100)
        policy.hit(f"new{i}")
        policy.victims(200, lambda k, i=i: k != f"new{i}")
    assert "old" not in policy.entries  # once L passed its priority, recent merges outrank it


def test_a_zero_cost_still_counts_frequency():
    policy = filled(("linked", 0.0, 100), ("other", 0.0, 100))
    policy.hit("linked")
    assert policy.victims(100, lambda k: True) == ["other"]
