"""Capture (register on first use) on a full pool, as SGLang's scheduler releases requests.

SGLang's batch-result processors open a free group (``free_group_begin``) before they checkpoint and
release finished requests and close it after: slots freed inside it (the tree's evictions too)
become allocatable only at ``free_group_end``. A capture copies each computed span into fresh slots
at that checkpoint, so on a pool with no free slots left (the steady state of a server: SGLang
evicts only on demand) its allocation used to fail and the chunk was silently not kept -- the
harness's ``ctx:`` arms then computed their chunks instead of splicing them (benchmarks/results/void/).

Real SGLang CPU pools and request steps (tests/pools.py); the free group is SGLang's allocator's own.
"""

from __future__ import annotations

import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.cache.chunk_radix_cache import ChunkRadixCache, ChunkSupport, usage_of
from amem_sgl.cache.splice import find_rope
from amem_sgl.chunks import build_kv_hints
from tests.pools import Pools, decode, finish, kv_signature, row_slots, serve, start

PRE = list(range(200, 206))
A, B = list(range(10, 22)), list(range(30, 39))
Q = [90, 91, 92]
SIZE = 96


def make(blend: bool = False):
    pools = Pools.create(size=SIZE)
    support = ChunkSupport(kv_pool=pools.kv, rope=find_rope(pools.rope), model_id="test-model",
                           enabled=True, max_chunk_tokens=64, blend_available=blend)
    return ChunkRadixCache(pools.init_params(), chunks=support), pools


def compose(chunks, question=Q):
    ids, spans = list(PRE), []
    for chunk in chunks:
        spans.append((len(ids), len(ids) + len(chunk)))
        ids += chunk
    return ids + question, spans


def fill(cache, pools, leave_free: int) -> None:
    """Ordinary cached prefixes (evictable, older than anything after) until ``leave_free`` slots are free."""
    filler = list(range(100, 100 + pools.allocator.available_size() - leave_free))
    serve(cache, pools, filler)
    assert pools.allocator.available_size() == leave_free


def finish_in_free_group(cache, pools, req) -> None:
    """What SGLang's process_batch_result_prefill/decode does around a finished request's release."""
    pools.allocator.free_group_begin()
    try:
        finish(cache, req)
    finally:
        pools.allocator.free_group_end()


def assert_kv_moved(pools, req, chunk, position, canonical):
    slots = row_slots(pools, req, position, position + len(chunk))
    for layer in range(pools.kv.layer_num):
        torch.testing.assert_close(pools.k_at(slots, layer), pools.expected_k(chunk, range(position, position + len(chunk))),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(pools.v_at(slots, layer), kv_signature(chunk, range(canonical, canonical + len(chunk))))


def assert_no_leak(cache, pools) -> None:
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert cache.total_size() == 0 and pools.allocator.available_size() == pools.size
    assert torch.unique(pools.allocator.free_pages).numel() == pools.size  # no slot freed twice


def test_capture_on_a_full_pool_keeps_the_chunks_and_the_next_request_splices_them():
    cache, pools = make()
    first, first_spans = compose([B, A])  # the first use: another order (as the harness's ctx arm)
    fill(cache, pools, leave_free=len(first) + 1)  # room for the capture request's prompt and one token
    req = start(cache, pools, first, build_kv_hints("ctx", first_spans, capture=True))
    decode(cache, pools, req, 5)
    assert pools.allocator.available_size() == 0  # nothing free: the copies need evictions
    finish_in_free_group(cache, pools, req)
    assert cache.stats.chunks_captured == 2 and cache.stats.captured_tokens == len(A) + len(B)
    assert cache.resident_chunks() == 2

    # The compared prompt: [PRE][A][B][Q] splices both captured chunks (PRE is the capture's prefix).
    prompt, spans = compose([A, B], question=[93, 94])
    again = start(cache, pools, prompt, build_kv_hints("ctx", spans))
    assert again.prefix_len == spans[-1][1]
    assert usage_of(again)["spliced_tokens"] == len(A) + len(B)
    assert_kv_moved(pools, again, A, spans[0][0], canonical=first_spans[1][0])
    assert_kv_moved(pools, again, B, spans[1][0], canonical=first_spans[0][0])
    finish_in_free_group(cache, pools, again)
    assert_no_leak(cache, pools)


def test_capture_at_the_prefill_checkpoint_of_an_unfinished_request_on_a_full_pool():
    """A memory turn with more tokens to generate is checkpointed after its prefill (inside the same
    free group) and captures there; a blend-capable server splices the chunks with the preamble as a gap."""
    cache, pools = make(blend=True)
    first, first_spans = compose([A, B])
    fill(cache, pools, leave_free=len(first))
    req = start(cache, pools, first, build_kv_hints("ctx", first_spans, capture=True))
    assert pools.allocator.available_size() == 0
    pools.allocator.free_group_begin()
    try:
        cache.checkpoint(req, up_to=len(first))  # SGLang's checkpoint_kv_cache after a prefill
    finally:
        pools.allocator.free_group_end()
    assert cache.stats.chunks_captured == 2 and cache.resident_chunks() == 2
    decode(cache, pools, req, 5)
    finish_in_free_group(cache, pools, req)
    assert cache.stats.chunks_captured == 2  # captured once

    prompt, spans = compose([B, A])
    again = start(cache, pools, prompt, build_kv_hints("ctx", spans))
    assert usage_of(again)["spliced_tokens"] == len(A) + len(B)
    assert_kv_moved(pools, again, B, spans[0][0], canonical=first_spans[1][0])
    finish_in_free_group(cache, pools, again)
    assert_no_leak(cache, pools)
