"""ChunkRadixCache on real SGLang CPU pools: it must behave exactly like SGLang's RadixCache.

Requests go through SGLang's own match/lock/alloc/checkpoint/release steps (tests/pools.py).
"""

from __future__ import annotations

import random
from array import array

import pytest
import torch

from amem_sgl import plugin
from amem_sgl import sglang_compat as sgl
from amem_sgl.cache import ChunkRadixCache
from tests.pools import Pools, finish, kv_signature, serve, start


def make(cls=ChunkRadixCache, **pool_kwargs):
    pools = Pools.create(**pool_kwargs)
    return cls(pools.init_params()), pools


def key(ids) -> sgl.RadixKey:
    return sgl.RadixKey(array("q", ids))


def matched(cache, ids) -> int:
    return cache.match_prefix(sgl.MatchPrefixParams(key=key(ids))).device_prefix_len


def tree_dump(cache) -> list:
    """The whole tree: (path tokens, slot values, lock_ref) of every node, in a canonical order."""
    out, stack = [], [((), cache.root_node)]
    while stack:
        path, node = stack.pop()
        for child in node.children.values():
            child_path = path + tuple(child.key.token_ids)
            out.append((child_path, tuple(child.value.tolist()), child.lock_ref))
            stack.append((child_path, child))
    return sorted(out)


def test_prefix_hit_is_served_from_the_kv_the_first_request_wrote():
    cache, pools = make()
    prompt, output = list(range(1, 21)), [50, 51, 52]
    first = serve(cache, pools, prompt, output)
    assert first.prefix_len == 0

    req = start(cache, pools, prompt + output + [99])
    assert req.prefix_len == len(prompt) + len(output)
    slots = cache.prefix_device_indices(req)
    expected = kv_signature(prompt + output, range(len(prompt) + len(output)))
    assert torch.equal(pools.v_at(slots), expected)
    finish(cache, req)


def _random_workload(seed: int, steps: int = 60):
    """Prompts drawn from a few shared stems (so nodes split and share), random outputs,
    requests held open across other steps, and evictions of random size."""
    rng = random.Random(seed)
    stems = [[rng.randrange(1, 40) for _ in range(rng.randrange(3, 12))] for _ in range(4)]
    ops, open_count = [], 0
    for _ in range(steps):
        r = rng.random()
        if r < 0.15:
            ops.append(("evict", rng.randrange(0, 60)))
        elif r < 0.3 or open_count >= 6:
            ops.append(("finish_open",))
            open_count = max(open_count - 1, 0)
        else:
            prompt = rng.choice(stems) + [rng.randrange(1, 40) for _ in range(rng.randrange(1, 10))]
            output = [rng.randrange(1, 40) for _ in range(rng.randrange(0, 5))]
            keep_open = rng.random() < 0.3
            open_count += keep_open
            ops.append(("serve", prompt, output, keep_open))
    return ops


@pytest.mark.parametrize("seed", range(6))
def test_behaves_exactly_like_sglang_radix_cache(seed):
    (ours, our_pools), (theirs, their_pools) = make(size=160), make(sgl.RadixCache, size=160)
    open_reqs: dict[int, list] = {id(ours): [], id(theirs): []}
    for op in _random_workload(seed):
        results = []
        for cache, pools in ((ours, our_pools), (theirs, their_pools)):
            held = open_reqs[id(cache)]
            if op[0] == "evict":
                results.append(cache.evict(sgl.EvictParams(num_tokens=op[1])).num_tokens_evicted)
            elif op[0] == "finish_open":
                if held:
                    finish(cache, held.pop(0))
                results.append(len(held))
            else:
                _, prompt, output, keep_open = op
                if keep_open:
                    req = start(cache, pools, prompt)
                    held.append(req)
                    results.append(req.prefix_len)
                else:
                    results.append(serve(cache, pools, prompt, output).prefix_len)
        assert results[0] == results[1], op
        assert tree_dump(ours) == tree_dump(theirs), op
        for attr in ("evictable_size", "protected_size", "total_size"):
            assert getattr(ours, attr)() == getattr(theirs, attr)(), (attr, op)
        assert our_pools.allocator.available_size() == their_pools.allocator.available_size(), op
        assert torch.equal(our_pools.kv.k_buffer[0], their_pools.kv.k_buffer[0]), op


def test_a_running_request_prefix_survives_eviction_and_everything_is_freed_after():
    cache, pools = make(size=128)
    shared = list(range(1, 31))
    serve(cache, pools, shared, output=[90, 91])  # tree: shared + its output
    serve(cache, pools, list(range(200, 220)))  # an unrelated, evictable request
    running = start(cache, pools, shared + [7, 8, 9])  # locks the path of `shared`
    assert running.prefix_len == len(shared)
    held_slots = cache.prefix_device_indices(running).clone()

    evicted = cache.evict(sgl.EvictParams(num_tokens=10_000)).num_tokens_evicted
    assert evicted == 20 + 2  # the unrelated request and the output tail; never the locked path
    assert cache.protected_size() == len(shared)
    assert matched(cache, shared + [1]) == len(shared)
    assert torch.equal(pools.v_at(held_slots), kv_signature(shared, range(len(shared))))

    finish(cache, running)
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert cache.total_size() == 0
    assert pools.allocator.available_size() == pools.size


def test_eviction_order_is_least_recently_used():
    cache, pools = make()
    x, y, z = list(range(1, 11)), list(range(20, 30)), list(range(40, 50))
    for prompt in (x, y, z):
        serve(cache, pools, prompt)
    serve(cache, pools, x + [5])  # x is used again: y is now the least recently used

    cache.evict(sgl.EvictParams(num_tokens=10))
    assert matched(cache, y) == 0
    # A match is an access too: touch z, then x, so z is now the least recently used.
    assert (matched(cache, z), matched(cache, x)) == (10, 10)
    cache.evict(sgl.EvictParams(num_tokens=10))
    assert (matched(cache, z), matched(cache, x)) == (0, 10)


@pytest.mark.parametrize("seed", range(3))
def test_allocator_free_count_returns_exactly_after_a_long_mixed_workload(seed):
    cache, pools = make(size=200)
    held = []
    for op in _random_workload(seed, steps=120):
        if op[0] == "evict":
            cache.evict(sgl.EvictParams(num_tokens=op[1]))
        elif op[0] == "finish_open" and held:
            finish(cache, held.pop())
        elif op[0] == "serve":
            _, prompt, output, keep_open = op
            if keep_open:
                held.append(start(cache, pools, prompt))
            else:
                serve(cache, pools, prompt, output)
        in_rows = sum(r.kv.kv_allocated_len - r.kv.cache_protected_len for r in held)
        assert pools.allocator.available_size() + cache.total_size() + in_rows == pools.size
    while held:
        finish(cache, held.pop())
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert cache.total_size() == 0 and cache.evictable_size() == 0 and cache.protected_size() == 0
    assert pools.allocator.available_size() == pools.size
    assert pools.req_to_token.available_size() == pools.req_to_token.size


def test_event_counters_obey_conservation():
    cache, pools = make(size=200)
    hits = 0
    for op in _random_workload(11, steps=80):
        if op[0] == "evict":
            cache.evict(sgl.EvictParams(num_tokens=op[1]))
        elif op[0] == "serve":
            hits += serve(cache, pools, op[1], op[2]).prefix_len
    stats = cache.describe()["stats"]
    assert stats["inserted_tokens"] == cache.total_size() + stats["evicted_tokens"]
    assert stats["evicted_tokens"] > 0 and hits > 0
    # Every request's hit went through match_prefix (checkpoint's own re-match counts too).
    assert stats["match_hit_tokens"] >= hits
    assert stats["match_query_tokens"] >= stats["match_hit_tokens"]


def _build_ctx(pools: Pools, **overrides) -> sgl.TreeCacheBuildContext:
    fields = dict(server_args=None, params=pools.init_params(), is_hybrid_swa=False,
                  is_hybrid_ssm=False, enable_hierarchical_cache=False, disable_radix_cache=False,
                  tp_worker=None, model_config=None, tp_size=1, tp_rank=0, tp_group=None)
    fields.update(overrides)
    return sgl.TreeCacheBuildContext(**fields)


def test_plugin_registers_the_amem_backend_once_and_builds_chunk_radix_cache():
    plugin.load()
    plugin.load()
    assert sgl.get_radix_cache_factory("amem") is plugin.build_chunk_radix_cache
    assert sgl.registered_radix_cache_backends().count("amem") == 1
    cache = plugin.build_chunk_radix_cache(_build_ctx(Pools.create()))
    assert isinstance(cache, ChunkRadixCache) and not cache.disable


@pytest.mark.parametrize("flag", ["is_hybrid_swa", "is_hybrid_ssm", "enable_hierarchical_cache"])
def test_plugin_refuses_models_and_modes_it_does_not_support(flag):
    with pytest.raises(ValueError, match="full-attention transformer"):
        plugin.build_chunk_radix_cache(_build_ctx(Pools.create(), **{flag: True}))


def test_chunk_reuse_is_refused_with_a_reason_under_tensor_parallelism():
    cache = plugin.build_chunk_radix_cache(_build_ctx(Pools.create(), tp_size=2, tp_rank=1))
    assert not cache.chunk_reuse_enabled and not cache.disable  # plain prefix caching still works
    assert "tensor parallelism" in cache.describe()["chunk_reuse_reason"]
