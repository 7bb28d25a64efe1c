"""remember answers once new chunks' KV is durable: amem_sgl.memory.chunk_kv.await_durable against a real
residency service process (Supervisor, ZeroMQ, disk tier), the chunks written through from another
thread the way the scheduler's write-through lands after the register request returned."""

from __future__ import annotations

import threading
import time

import torch

from amem_sgl.config import AmemConfig
from amem_sgl.memory.chunk_kv import await_durable
from tests.test_residency_service import MODEL, chunk, gen, make_service, nbytes  # noqa: F401 -- fixtures


def test_remember_waits_for_write_through_to_reach_the_disk_tier(make_service, gen):
    _sup, client = make_service()
    tensors = {cid: chunk(gen) for cid in ("a", "b", "c")}
    client.store("a", "ns", MODEL, tensors["a"], {"canonical_start": 3}).result(30)

    def late_write_through():  # lands while remember waits
        time.sleep(0.5)
        for cid in ("b", "c"):
            client.store(cid, "ns", MODEL, tensors[cid], {"canonical_start": 3}).result(30)

    writer = threading.Thread(target=late_write_through)
    started = time.monotonic()
    writer.start()
    assert await_durable(client, MODEL, ["a", "b", "c"], 20.0) is True
    waited = time.monotonic() - started
    writer.join()
    assert 0.5 <= waited < 10.0, waited  # it did wait for b and c, and stopped once they landed
    assert client.durable(["a", "b", "c", "never"], MODEL) == {"a", "b", "c"}


def test_a_chunk_that_never_arrives_is_answered_after_the_bound(make_service, gen):
    _sup, client = make_service()
    started = time.monotonic()
    assert await_durable(client, MODEL, ["never-stored"], 0.6) is False
    assert 0.6 <= time.monotonic() - started < 5.0
    # 0 turns the wait off; no residency service, nothing to wait for.
    assert await_durable(client, MODEL, ["never-stored"], 0.0) is True
    assert await_durable(None, MODEL, ["never-stored"], 5.0) is True


def test_a_full_disk_tier_settles_the_wait_at_once(make_service, gen):
    size = nbytes(chunk(torch.Generator()))
    _sup, client = make_service(disk_chunks=1, cpu_chunks=10, size=size)
    # y is twice the disk tier's whole budget: the disk refuses it, the CPU tier takes it.
    replies = [client.store(cid, "ns", MODEL, chunk(gen, tokens=n), {"canonical_start": 3}).result(30)
               for cid, n in (("x", 32), ("y", 64))]
    assert [r["disk"] for r in replies] == [True, False], replies
    started = time.monotonic()
    assert await_durable(client, MODEL, ["x", "y"], 20.0) is True
    assert time.monotonic() - started < 2.0  # refused by the disk: not waited for
    assert client.contains(["y"], MODEL) == {"y": "cpu"}


def test_a_chunk_evicted_from_a_full_disk_by_a_later_one_settles_the_wait(make_service, gen):
    """One chunk's room on disk: the second put evicts the first (the value policy's choice). The
    first's write-through was over when its put was answered: remember does not wait for it."""
    size = nbytes(chunk(torch.Generator()))
    _sup, client = make_service(disk_chunks=1, cpu_chunks=0, size=size)
    replies = [client.store(cid, "ns", MODEL, chunk(gen), {"canonical_start": 3}).result(30) for cid in ("p", "q")]
    assert [r["disk"] for r in replies] == [True, True], replies
    assert client.contains(["p", "q"], MODEL) == {"p": None, "q": "disk"}  # p was evicted for q
    started = time.monotonic()
    assert await_durable(client, MODEL, ["p", "q"], 20.0) is True
    assert time.monotonic() - started < 2.0


def test_the_bound_is_validated_in_config():
    import pytest

    with pytest.raises(ValueError, match="kv_durable_wait_s"):
        AmemConfig.from_dict({"memory": {"kv_durable_wait_s": -1}})
