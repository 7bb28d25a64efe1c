"""Chunk nodes and splicing in ChunkRadixCache, on real SGLang CPU pools with a real SGLang rotary
embedding, through SGLang's own request steps (tests/pools.py)."""

from __future__ import annotations

import pytest
import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.cache import chunk_index
from amem_sgl.cache.chunk_radix_cache import ChunkRadixCache, ChunkSupport
from amem_sgl.cache.splice import find_rope
from amem_sgl.chunks import build_kv_hints
from tests.pools import Pools, admit, finish, kv_signature, make_req, match, row_slots, serve, start

PRE = list(range(200, 206))  # the canonical context chunks are computed behind (a chat preamble)
A, B, C = list(range(10, 22)), list(range(30, 39)), list(range(50, 57))
X = list(range(70, 75))  # never registered
Q = [90, 91, 92]  # the question after the chunks


def make(size: int = 512, registered=(), blend: bool = False):
    """A chunk-enabled cache on fresh pools, with ``registered`` chunks registered in "alice";
    ``blend``: as where a blend pass can run (gaps are spliced and left to it)."""
    pools = Pools.create(size=size)
    support = ChunkSupport(kv_pool=pools.kv, rope=find_rope(pools.rope), model_id="test-model",
                           enabled=True, max_chunk_tokens=64, blend_available=blend)
    cache = ChunkRadixCache(pools.init_params(), chunks=support)
    for chunk in registered:
        register(cache, pools, chunk)
    return cache, pools


def register(cache, pools, chunk, namespace="alice", pre=PRE):
    prompt = pre + chunk
    hints = build_kv_hints(namespace, [(len(pre), len(prompt))], register=True)
    return serve(cache, pools, prompt, kv_hints=hints)


def compose(chunks, pre=PRE, question=Q):
    ids, spans = list(pre), []
    for chunk in chunks:
        spans.append((len(ids), len(ids) + len(chunk)))
        ids += chunk
    return ids + question, spans


def assert_chunk_kv_at(pools, req, chunk, position, canonical=len(PRE)):
    """The row holds ``chunk``'s KV moved to ``position``: K rotated there, V copied from canonical."""
    slots = row_slots(pools, req, position, position + len(chunk))
    for layer in range(pools.kv.layer_num):
        torch.testing.assert_close(pools.k_at(slots, layer),
                                   pools.expected_k(chunk, range(position, position + len(chunk))),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(pools.v_at(slots, layer),
                           kv_signature(chunk, range(canonical, canonical + len(chunk))))


def test_registration_keeps_the_span_as_a_chunk_node_and_the_context_as_a_prefix():
    cache, pools = make()
    register(cache, pools, A)
    assert cache.resident_chunks() == 1 and cache.stats.chunks_registered == 1
    assert pools.allocator.available_size() == pools.size - len(PRE) - len(A)
    # The context is an ordinary prefix under alice's salted key; the chunk itself is not in it.
    probe = make_req(PRE + [1, 2], build_kv_hints("alice", [(len(PRE), len(PRE) + 2)]))
    match(cache, probe)
    assert probe.prefix_len == len(PRE)
    cache.release_aborted_request(sgl.CacheRequestHandle(probe.rid, 0))
    plain = make_req(PRE + [1])
    match(cache, plain)
    assert plain.prefix_len == 0  # a request without chunk spans never sees amem's entries
    register(cache, pools, A)  # again: nothing new is kept, nothing leaks
    assert cache.resident_chunks() == 1 and cache.stats.chunks_registered == 1
    assert pools.allocator.available_size() == pools.size - len(PRE) - len(A)


@pytest.mark.parametrize("order", [(A, B, C), (C, A, B), (B, C, A)], ids=["abc", "cab", "bca"])
def test_spliced_in_any_order_keys_are_rotated_to_the_new_positions(order):
    cache, pools = make(registered=(A, B, C))
    prompt, spans = compose(order)
    req = start(cache, pools, prompt, build_kv_hints("alice", spans))
    assert req.prefix_len == len(PRE) + len(A) + len(B) + len(C)
    for chunk, (s, _) in zip(order, spans):
        assert_chunk_kv_at(pools, req, chunk, s)
    finish(cache, req)
    assert cache.stats.spliced_tokens == len(A) + len(B) + len(C) and cache.stats.chunk_hits == 3


def test_the_next_request_over_the_same_chunks_is_an_exact_prefix_hit():
    cache, pools = make(registered=(A, B))
    prompt, spans = compose([B, A])
    serve(cache, pools, prompt, output=[5, 6], kv_hints=build_kv_hints("alice", spans))
    spliced = cache.stats.spliced_tokens
    again = start(cache, pools, prompt[:-1] + [99], build_kv_hints("alice", spans))
    assert again.prefix_len == len(prompt) - 1  # everything but the changed last token, from the tree
    assert cache.stats.spliced_tokens == spliced  # nothing was spliced or recomputed this time
    assert_chunk_kv_at(pools, again, B, len(PRE))
    finish(cache, again)


def test_repeated_chunk_at_offset_zero():
    cache, pools = make()
    register(cache, pools, A)
    prompt, spans = compose([A, A], pre=[])
    req = start(cache, pools, prompt, build_kv_hints("alice", spans))
    assert req.prefix_len == 2 * len(A)
    assert_chunk_kv_at(pools, req, A, 0)  # delta = -len(PRE)
    assert_chunk_kv_at(pools, req, A, len(A))
    finish(cache, req)


def test_an_unregistered_chunk_falls_back_to_prefill_from_there():
    cache, pools = make(registered=(A, B))
    prompt, spans = compose([A, X, B])
    req = start(cache, pools, prompt, build_kv_hints("alice", spans))
    assert req.prefix_len == len(PRE) + len(A)  # X and everything after it are prefilled
    assert cache.stats.chunk_misses == 2  # X and B: declared, not spliced, computed
    # The driver "prefilled" X and B at their true positions: B's V says so.
    b_start = spans[2][0]
    assert torch.equal(pools.v_at(row_slots(pools, req, b_start, b_start + len(B))),
                       kv_signature(B, range(b_start, b_start + len(B))))
    finish(cache, req)


@pytest.mark.parametrize("hints", [
    {"protocol_version": "1", "message_id": "m", "actions": [{
        "action_id": "a", "action_type": "amem.chunks", "action_version": "1",
        "payload": {"namespace": "alice", "spans": [[6, 18], [18, 999]]}}]},  # past the prompt
    {"protocol_version": "1", "message_id": "m", "actions": [{
        "action_id": "a", "action_type": "amem.chunks", "action_version": "1",
        "payload": {"namespace": "alice", "spans": [[6, 18]], "bogus": 1}}]},
    {"protocol_version": "1", "message_id": "m", "actions": [{
        "action_id": "a", "action_type": "amem.chunks", "action_version": "2", "payload": {}}]},
], ids=["span-past-prompt", "unknown-field", "unknown-version"])
def test_malformed_spans_are_ignored_and_the_request_is_prefilled(hints):
    cache, pools = make()
    register(cache, pools, A)
    prompt, _ = compose([A])
    before = pools.allocator.available_size()
    req = start(cache, pools, prompt, hints)
    assert req.prefix_len == 0 and cache.stats.spliced_tokens == 0  # served as a plain request
    finish(cache, req)
    assert pools.allocator.available_size() == before - len(prompt)


def test_a_chunk_longer_than_the_limit_is_not_registered():
    cache, pools = make()
    long_chunk = list(range(300, 380))  # 80 tokens > max_chunk_tokens 64
    register(cache, pools, long_chunk)
    assert cache.resident_chunks() == 0
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert pools.allocator.available_size() == pools.size


def test_another_namespace_never_sees_the_chunk_or_its_context():
    cache, pools = make()
    register(cache, pools, A, namespace="alice")
    prompt, spans = compose([A])
    req = start(cache, pools, prompt, build_kv_hints("carol", spans))
    assert req.prefix_len == 0 and cache.stats.spliced_tokens == 0  # not even alice's context
    finish(cache, req)
    register(cache, pools, B, namespace="bob")  # bob's own context is cached now...
    req = start(cache, pools, prompt, build_kv_hints("bob", spans))
    # ...but alice's chunk is not his (a miss, as it was carol's)
    assert req.prefix_len == len(PRE) and cache.stats.chunk_misses == 2
    finish(cache, req)


def test_spliced_sequences_serve_only_their_namespace_and_never_plain_requests():
    cache, pools = make(registered=(A, B))
    prompt, spans = compose([A, B])
    serve(cache, pools, prompt, kv_hints=build_kv_hints("alice", spans))  # now an (alice) prefix
    plain = start(cache, pools, prompt)
    assert plain.prefix_len == 0  # same tokens, but it asked for a full prefill
    finish(cache, plain)
    other = start(cache, pools, prompt, build_kv_hints("bob", spans))
    assert other.prefix_len == 0
    finish(cache, other)
    again = start(cache, pools, prompt, build_kv_hints("alice", spans))
    assert again.prefix_len == len(prompt) - 1


def test_an_id_collision_never_serves_another_chunks_kv(monkeypatch):
    cache, pools = make()
    monkeypatch.setattr(chunk_index, "chunk_id", lambda namespace, model, tokens: "same-id")
    register(cache, pools, A)
    prompt, spans = compose([B])  # B hashes to A's id here; the stored tokens differ
    req = start(cache, pools, prompt, build_kv_hints("alice", spans))
    assert req.prefix_len == len(PRE) and cache.stats.chunk_hits == 0
    finish(cache, req)


def tree_state(cache):
    """Every node's (key, slots, lock count) and the chunk nodes' LRU times: what a pure query must
    not change (RadixCache's own match refreshes the LRU time of the prefix it matched)."""
    out, stack = [], [cache.root_node]
    while stack:
        node = stack.pop()
        out.append((node.key.extra_key, tuple(node.key.token_ids), tuple(torch.as_tensor(node.value).tolist()) if node.value is not None
                    else None, node.lock_ref,
                    node.last_access_time if (node.key.extra_key or "").startswith("amem:chunk:") else None))
        stack.extend(node.children.values())
    return sorted(out, key=repr), cache.evictable_size(), cache.protected_size()


def test_match_is_a_query_and_admission_splices_once():
    cache, pools = make(registered=(A, B))
    prompt, spans = compose([B, A])
    req = make_req(prompt, build_kv_hints("alice", spans))
    match(cache, req)  # once to salt-split the preamble node as RadixCache would, then compare
    free, tree, kv_hints = pools.allocator.available_size(), tree_state(cache), req.kv_hints
    for _ in range(3):  # a waiting request is matched again every scheduling round
        match(cache, req)
        assert pools.allocator.available_size() == free and tree_state(cache) == tree
        assert req.kv_hints is kv_hints and req.extra_key is None and req.customized_info is None
        assert req.prefix_len == len(PRE) and req.host_hit_length == len(A) + len(B)
    allocs = []
    original = pools.allocator.alloc
    pools.allocator.alloc = lambda n: allocs.append(n) or original(n)
    admit(cache, pools, req)  # SGLang's admission: init_load_back once, then the row
    assert allocs == [len(A) + len(B), len(Q)]  # the splice once, then the extend
    assert req.prefix_len == spans[-1][1] and req.kv.cache_protected_len == len(PRE)
    assert_chunk_kv_at(pools, req, B, spans[0][0])
    assert_chunk_kv_at(pools, req, A, spans[1][0])
    finish(cache, req)
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert pools.allocator.available_size() == pools.size


def test_an_aborted_waiting_request_never_held_slots():
    cache, pools = make(registered=(A,))
    free = pools.allocator.available_size()
    prompt, spans = compose([A])
    req = make_req(prompt, build_kv_hints("alice", spans))
    match(cache, req)
    assert req.host_hit_length == len(A) and pools.allocator.available_size() == free
    cache.release_aborted_request(sgl.CacheRequestHandle(req.rid, 0))
    assert pools.allocator.available_size() == free and not cache.describe()["pending_splices"]


def test_admission_falls_back_to_computing_when_the_chunk_is_gone_or_no_slots():
    # A chunk evicted between the match and admission: the load-back commits nothing and the
    # request computes the span (SGLang re-selects the admission without the host hit).
    cache, pools = make(registered=(A,))
    prompt, spans = compose([A])
    req = make_req(prompt, build_kv_hints("alice", spans))
    match(cache, req)
    assert req.host_hit_length == len(A)
    pin = cache.lock(req.last_node)  # the PrefillAdder pins the matched prefix while it admits
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert cache.resident_chunks() == 0
    admit(cache, pools, req)
    cache.unlock(pin)
    assert req.prefix_len == len(PRE) and cache.stats.splice_fallbacks == 1
    assert torch.equal(pools.v_at(row_slots(pools, req, len(PRE), len(prompt))),
                       kv_signature(prompt[len(PRE):], range(len(PRE), len(prompt))))  # computed here
    finish(cache, req)
    # No slots for the splice: nothing taken, nothing corrupted, the request computes it.
    cache, pools = make(size=64, registered=(A,))
    req = make_req(prompt, build_kv_hints("alice", spans))
    match(cache, req)
    lock = cache.lock(req.last_node)
    hog = pools.allocator.alloc(pools.allocator.available_size())
    free = pools.allocator.available_size()
    loaded, _ = cache.init_load_back(sgl.InitLoadBackParams(best_match_node=req.best_match_node,
                                                            host_hit_length=req.host_hit_length, req=req))
    assert loaded == 0 and pools.allocator.available_size() == free and cache.resident_chunks() == 1
    pools.allocator.free(hog)
    cache.unlock(lock)


def test_the_idle_leak_check_stays_silent_after_spliced_blended_and_aborted_requests():
    """SGLang's idle check (scheduler invariant checker, full pool): free + evictable + protected
    slots == pool size once no request runs."""
    cache, pools = make(registered=(A, B, C), blend=True)
    for order in ((A, B), (C, X, A), (B, C, A)):
        prompt, spans = compose(order)
        waiting = make_req(prompt, build_kv_hints("alice", spans, capture=True))
        match(cache, waiting)
        cache.release_aborted_request(sgl.CacheRequestHandle(waiting.rid, 0))
        served = serve(cache, pools, prompt, [7, 8], kv_hints=build_kv_hints("alice", spans, capture=True))
        assert served.prefix_len > len(PRE)
        assert not cache.blend_plans or served.req.rid in cache.blend_plans
        cache.blend_plans.clear()  # no model here: the blend pass's batch never runs
        assert (pools.allocator.available_size() + cache.evictable_size() + cache.protected_size()
                == pools.size), "token_to_kv_pool memory leak"
        assert len(pools.req_to_token.free_slots) == pools.req_to_token.size


def test_a_running_spliced_request_keeps_its_kv_when_chunk_nodes_are_evicted():
    cache, pools = make(registered=(A, B))
    prompt, spans = compose([A, B])
    req = start(cache, pools, prompt, build_kv_hints("alice", spans))
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert cache.resident_chunks() == 0  # the chunk nodes were not locked by the request...
    assert_chunk_kv_at(pools, req, A, spans[0][0])  # ...but its spliced copies are its own
    assert_chunk_kv_at(pools, req, B, spans[1][0])
    in_row = len(prompt) - len(PRE)
    assert pools.allocator.available_size() + cache.total_size() + in_row == pools.size
    finish(cache, req)
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert cache.total_size() == 0 and pools.allocator.available_size() == pools.size


def test_splicing_evicts_other_entries_for_space_but_never_the_chunks_it_reads():
    cache, pools = make(size=64)
    register(cache, pools, A)  # 6 + 12 tokens in the tree
    for i in range(3):  # fill the rest with unrelated, evictable prefixes
        serve(cache, pools, list(range(100 + 12 * i, 112 + 12 * i)))
    assert pools.allocator.available_size() < len(A)
    prompt, spans = compose([A])
    req = make_req(prompt, build_kv_hints("alice", spans))
    match(cache, req)
    assert req.prefix_len + req.host_hit_length == len(PRE) + len(A)
    admit(cache, pools, req)  # the splice's slots come from evicting the unrelated prefixes
    assert req.prefix_len == len(PRE) + len(A) and cache.resident_chunks() == 1
    assert_chunk_kv_at(pools, req, A, len(PRE))
    finish(cache, req)


def test_splicing_stops_at_plain_tokens_between_chunks():
    cache, pools = make(registered=(A, B))
    gap = [77, 78, 79]
    prompt = PRE + A + gap + B + Q
    spans = [(len(PRE), len(PRE) + len(A)), (len(PRE) + len(A) + len(gap), len(PRE) + len(A) + len(gap) + len(B))]
    req = start(cache, pools, prompt, build_kv_hints("alice", spans))
    assert req.prefix_len == len(PRE) + len(A)  # B sits after uncached tokens: prefilled, not spliced
    b_start = spans[1][0]
    assert torch.equal(pools.v_at(row_slots(pools, req, b_start, b_start + len(B))),
                       kv_signature(B, range(b_start, b_start + len(B))))
    finish(cache, req)


def test_a_prefix_that_runs_into_a_chunk_span_is_cut_back_to_the_span_start():
    """An earlier spliced sequence [PRE][A...] is an ordinary prefix; A2 starts with A's first token,
    so the ordinary match runs one token into A2's span. Registering and splicing A2 must still use
    A2's own KV, and no slot may end up owned twice (found by SGLang's idle leak check)."""
    cache, pools = make()
    register(cache, pools, A)
    prompt, spans = compose([A])
    serve(cache, pools, prompt, kv_hints=build_kv_hints("alice", spans))  # [PRE][A][Q] now a prefix
    a2 = [A[0]] + list(range(140, 150))
    register(cache, pools, a2)
    assert cache.resident_chunks() == 2
    prompt2, spans2 = compose([a2])
    req = start(cache, pools, prompt2, build_kv_hints("alice", spans2))
    assert req.prefix_len == len(PRE) + len(a2)
    assert_chunk_kv_at(pools, req, a2, len(PRE))
    finish(cache, req)
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert cache.total_size() == 0 and pools.allocator.available_size() == pools.size
    assert torch.unique(pools.allocator.free_pages).numel() == pools.size  # no slot freed twice


def test_capture_keeps_the_chunks_a_request_computed_and_the_next_request_splices_them():
    cache, pools = make(registered=(A,))
    prompt, spans = compose([A, X, B])
    served = serve(cache, pools, prompt, output=[5], kv_hints=build_kv_hints("alice", spans, capture=True))
    assert served.prefix_len == len(PRE) + len(A)  # A spliced; X and B prefilled in place...
    assert cache.resident_chunks() == 3  # ...and kept as their chunks' nodes
    assert cache.stats.chunks_captured == 2 and cache.stats.captured_tokens == len(X) + len(B)
    assert cache.stats.registered_tokens == len(A)  # only A's register request prefilled a chunk
    # Another turn over [B, X] (another order, other positions): both spliced from the captured KV,
    # K rotated from where they were computed, V as computed there.
    prompt2, spans2 = compose([B, X], question=[93, 94])
    req = start(cache, pools, prompt2, build_kv_hints("alice", spans2))
    assert req.prefix_len == len(PRE) + len(B) + len(X)
    assert_chunk_kv_at(pools, req, B, spans2[0][0], canonical=spans[2][0])
    assert_chunk_kv_at(pools, req, X, spans2[1][0], canonical=spans[1][0])
    finish(cache, req)
    cache.evict(sgl.EvictParams(num_tokens=10_000))  # every slot comes back exactly once
    assert cache.total_size() == 0 and pools.allocator.available_size() == pools.size
    assert torch.unique(pools.allocator.free_pages).numel() == pools.size


def test_without_capture_or_for_spliced_and_cached_spans_nothing_is_captured():
    cache, pools = make(registered=(A, B))
    prompt, spans = compose([A, B, X])
    serve(cache, pools, prompt, kv_hints=build_kv_hints("alice", spans))  # no capture flag
    assert cache.resident_chunks() == 2 and cache.stats.chunks_captured == 0
    # Same chunks again with capture: A and B come from the cached blended prefix or their nodes,
    # only X (computed now) is captured, once, however often the request is checkpointed.
    req = start(cache, pools, prompt[:-1] + [99], build_kv_hints("alice", spans, capture=True))
    cache.checkpoint(req, up_to=len(prompt))
    cache.checkpoint(req, up_to=len(prompt))
    finish(cache, req)
    assert cache.stats.chunks_captured == 0  # X was in the cached prefix: not computed by this request
    fresh = compose([X, B])[0]
    serve(cache, pools, fresh, kv_hints=build_kv_hints("alice", compose([X, B])[1], capture=True))
    assert cache.stats.chunks_captured == 1 and cache.resident_chunks() == 3
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    assert cache.total_size() == 0 and pools.allocator.available_size() == pools.size


def test_capture_is_refused_on_register_and_forget_actions():
    with pytest.raises(ValueError, match="capture"):
        build_kv_hints("alice", [(0, 3)], register=True, capture=True)
    with pytest.raises(ValueError, match="capture"):
        build_kv_hints("alice", [], forget=["*"], capture=True)


def test_with_blending_a_missing_chunk_is_computed_by_the_blend_pass_and_captured():
    """Where a blend pass can run, a chunk nobody has prefilled yet does not end the splice: its span
    is a gap the blend pass computes, chunks after it are still spliced, and the span is captured."""
    cache, pools = make(registered=(A, B), blend=True)
    prompt, spans = compose([A, X, B])
    req = start(cache, pools, prompt, build_kv_hints("alice", spans, capture=True))
    assert req.prefix_len == spans[2][1]  # A, X and B all come before the computed tail
    plan = cache.blend_plans[req.rid]
    assert set(range(*spans[1])) <= set(plan.positions) and plan.gaps == tuple(range(*spans[1]))
    x_slots = row_slots(pools, req, *spans[1])
    pools.write_kv(x_slots, X, range(*spans[1]))  # what the blend pass writes at X's positions
    finish(cache, req)
    assert cache.stats.chunks_captured == 1 and cache.resident_chunks() == 3
    prompt2, spans2 = compose([X])
    again = start(cache, pools, prompt2, build_kv_hints("alice", spans2))
    assert again.prefix_len == spans2[0][1]
    assert_chunk_kv_at(pools, again, X, spans2[0][0], canonical=spans[1][0])
    finish(cache, again)


def test_a_chunk_back_in_its_canonical_place_is_never_recomputed():
    """The first chunk after the preamble sits where and behind what its KV was computed: its KV is
    the prefill's (no bit changed by the splice) and the blend plan recomputes none of it; the same
    chunk later in the prompt, or at its canonical position behind other tokens, is blended."""
    policy = BlendPolicy.parse("edges:2")
    cache, pools = make(registered=(A, B), blend=True)
    prompt, spans = compose([A, B])
    req = start(cache, pools, prompt, build_kv_hints("alice", spans, blend=policy))
    plan = cache.blend_plans[req.rid]
    assert not set(range(*spans[0])) & set(plan.positions)  # A: in place
    assert set(plan.positions) == set(policy.select([(spans[1][0], len(B))]))  # B: its edges
    assert cache.stats.in_place_chunks == 1
    slots = row_slots(pools, req, *spans[0])
    for layer in range(pools.kv.layer_num):  # exactly the registered KV, bit for bit
        assert torch.equal(pools.k_at(slots, layer), pools.expected_k(A, range(*spans[0])))
        assert torch.equal(pools.v_at(slots, layer), kv_signature(A, range(*spans[0])))
    usage = req.customized_info["amem"][0]
    assert usage["in_place_tokens"] == len(A) and usage["recomputed_tokens"] == len(plan.positions)
    finish(cache, req)

    other = [7] * len(PRE)  # same length, other tokens before A: not the context A was computed behind
    prompt2, spans2 = compose([A], pre=other)
    req2 = start(cache, pools, prompt2, build_kv_hints("alice", spans2, blend=policy))
    assert set(policy.select([(spans2[0][0], len(A))])) <= set(cache.blend_plans[req2.rid].positions)
    assert cache.stats.in_place_chunks == 1
    finish(cache, req2)


def test_only_exact_captures_and_registrations_remember_their_context():
    cache, pools = make(registered=(A,), blend=True)
    cid_a = cache.index.id_of("alice", A)
    assert cache.index.meta[cid_a].context == chunk_index.context_digest(PRE)
    prompt, spans = compose([A, X])
    req = start(cache, pools, prompt, build_kv_hints("alice", spans, capture=True))
    pools.write_kv(row_slots(pools, req, *spans[1]), X, range(*spans[1]))
    finish(cache, req)
    assert cache.index.meta[cache.index.id_of("alice", X)].context == ""  # captured behind spliced KV
    prompt2, spans2 = compose([C])
    serve(cache, pools, prompt2, kv_hints=build_kv_hints("alice", spans2, capture=True, exact=True))
    assert cache.index.meta[cache.index.id_of("alice", C)].context == chunk_index.context_digest(PRE)
