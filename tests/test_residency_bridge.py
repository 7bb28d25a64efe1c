"""The residency bridge never blocks scheduling: a fetch slowed to 5 s leaves ``match_prefix`` as
fast as a miss (the chunk is computed meanwhile), and once the fetch is done a later request
restores the chunk at admission. Real SGLang CPU pools; the residency service is stood in for by
an in-memory client with the service client's fetch/store/hit signatures (the real service and
client are exercised end to end in tests/test_residency_e2e.py)."""

from __future__ import annotations

import threading
import time

from amem_sgl import sglang_compat as sgl
from amem_sgl.cache.chunk_index import context_digest
from amem_sgl.chunks import build_kv_hints
from tests.pools import admit, finish, make_req, match, start
from tests.test_chunk_splice import A, assert_chunk_kv_at, compose, make, register

SLOW_S = 5.0


class SlowClient:
    """Stores what it is given; every fetch takes ``delay`` seconds (the slowed service)."""

    def __init__(self, delay: float) -> None:
        self.delay, self.stored, self.fetches = delay, {}, []
        self.started = threading.Event()

    def store(self, cid, namespace, model_id, tensors, meta, relevance=None, *, tp_rank=0, tp_size=1):
        self.stored[cid] = ({k: v.clone() for k, v in tensors.items()},
                            {**{k: str(v) for k, v in meta.items()}, "tp_rank": str(tp_rank), "tp_size": str(tp_size)})

    def fetch(self, cid, namespace, model_id, *, tp_rank=0, tp_size=1, layout=None):
        self.fetches.append(cid)
        self.started.set()
        time.sleep(self.delay)
        got = self.stored.get(cid)
        return None if got is None else (got[0], got[1], "disk")

    def hit(self, chunk_ids, relevance=None):
        pass


def test_a_slow_fetch_never_stalls_matching_and_the_chunk_is_restored_when_ready():
    # Where a blend pass can run (amem's servers), the uncached preamble before a chunk is a gap.
    cache, pools = make(blend=True)
    client = SlowClient(SLOW_S)
    cache.residency = client
    register(cache, pools, A)  # written through to the stand-in service
    assert len(client.stored) == 1
    cache.evict(sgl.EvictParams(num_tokens=10_000))  # the device copy is gone; the tiers have it
    assert cache.resident_chunks() == 0
    prompt, spans = compose([A])
    hints = build_kv_hints("alice", spans)
    t0 = time.monotonic()
    first = start(cache, pools, prompt, hints)
    took = time.monotonic() - t0
    # Waiting for the fetch would take 5 s; this machine is shared (2 cores), so allow half of it.
    assert took < SLOW_S / 2, f"match + admission took {took:.2f}s while a fetch was slow"
    assert client.started.wait(2.0) and first.prefix_len == 0  # computed like an uncached chunk
    finish(cache, first)
    plain = time.monotonic()
    served = start(cache, pools, list(range(120, 160)))  # a concurrent plain request is not held up
    assert time.monotonic() - plain < SLOW_S / 2 and client.fetches and cache.bridge._pending
    finish(cache, served)
    cache.bridge.wait_idle(timeout=SLOW_S + 5)
    assert client.fetches == [client.fetches[0]]  # asked once, not on every match
    cache.evict(sgl.EvictParams(num_tokens=10_000))  # drop the first request's computed sequence too
    again = make_req(prompt, hints)
    match(cache, again)
    assert again.host_hit_length == spans[0][1]  # the preamble as a gap, A staged: restorable
    admit(cache, pools, again)
    assert again.prefix_len == spans[0][1] and cache.stats.chunks_restored == 1
    assert_chunk_kv_at(pools, again, A, spans[0][0])
    # The restored chunk keeps its canonical context: back in its place it is not recomputed.
    assert cache.index.meta[cache.index.id_of("alice", A)].context == context_digest(prompt[: spans[0][0]])
    assert cache.stats.in_place_chunks == 1
    finish(cache, again)
