"""The residency value policy and its LRU baseline, on hand-made statistics."""

from __future__ import annotations

import time

import pytest

from amem_sgl.residency.policy import ChunkStats, LruPolicy, PolicyWeights, ValuePolicy, make_policy

MiB = 2**20


def test_value_combines_relevance_recency_reuse_and_size():
    policy = ValuePolicy(PolicyWeights(relevance=2.0, recency=1.0, reuse=1.0, size_per_mib=0.5, half_life_s=100))
    now = 1000.0
    fresh = ChunkStats("a", MiB, last_used=now, hits=3, relevance=0.5)
    assert policy.value(fresh, now) == pytest.approx(2.0 * 0.5 + 1.0 + 2.0 - 0.5)
    older = ChunkStats("b", MiB, last_used=now - 100, hits=3, relevance=0.5)
    assert policy.value(older, now) == pytest.approx(policy.value(fresh, now) - 0.5)  # one half-life


def test_value_policy_refuses_a_newcomer_worth_less_than_what_it_would_evict():
    policy = ValuePolicy()
    now = time.time()
    hot = [ChunkStats(f"hot{i}", MiB, last_used=now - 60, hits=5) for i in range(3)]
    one_off = ChunkStats("new", MiB, last_used=now)
    assert policy.victims(hot, one_off, MiB) is None  # not admitted
    stale = ChunkStats("stale", MiB, last_used=now - 3600)
    assert policy.victims(hot + [stale], one_off, MiB) == ["stale"]  # the cheap one goes
    assert policy.victims(hot, one_off, 0) == []


def test_lru_always_admits_and_evicts_least_recent_first():
    now = time.time()
    residents = [ChunkStats("old", MiB, last_used=now - 10, hits=100), ChunkStats("mid", MiB, last_used=now - 5),
                 ChunkStats("new", MiB, last_used=now)]
    assert LruPolicy().victims(residents, ChunkStats("x", MiB), 2 * MiB) == ["old", "mid"]
    assert LruPolicy().victims(residents, ChunkStats("x", MiB), 10 * MiB) is None  # cannot fit at all


def test_make_policy_names():
    assert make_policy("value").name == "value" and make_policy("lru").name == "lru"
    with pytest.raises(ValueError, match="value"):
        make_policy("fifo")
