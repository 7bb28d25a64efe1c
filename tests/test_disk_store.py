"""The safetensors disk tier: durability, checksums, quarantine, budget, restart, kill -9."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from amem_sgl.residency.disk_store import DiskStore
from amem_sgl.residency.keys import StoreKey


def key(chunk_id: str, model_id: str = "m", **fields) -> StoreKey:
    return StoreKey(chunk_id, model_id, **fields)


def kv(seed: int, tokens: int = 20, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"k": torch.randn(4, tokens, 3, 64, generator=gen).to(dtype),
            "v": torch.randn(4, tokens, 3, 64, generator=gen).to(dtype)}


def folder_bytes(store: DiskStore) -> int:
    return sum(p.stat().st_size for p in store.root.glob("*.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trip_is_bit_exact_and_survives_a_restart(tmp_path, dtype):
    store = DiskStore(tmp_path, budget_bytes=10 << 20)
    tensors = kv(torch.seed() % 2**31, dtype=dtype)
    assert store.put(key("c1"), "alice", tensors, {"num_tokens": 20, "canonical_start": 24})
    again = DiskStore(tmp_path, budget_bytes=10 << 20)  # a new process would see the same
    loaded, meta = again.get(key("c1"), "alice")
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    assert loaded["k"].dtype == dtype and meta["canonical_start"] == "24" and meta["namespace"] == "alice"


def test_another_namespace_or_model_is_refused(tmp_path):
    store = DiskStore(tmp_path, budget_bytes=10 << 20)
    store.put(key("c1"), "alice", kv(1))
    assert store.get(key("c1"), "bob") is None and store.get(key("c1", "other-model"), "alice") is None
    assert store.get(key("c1", tp_rank=1, tp_size=2), "alice") is None  # another rank's shard
    assert store.get(key("c1"), "alice") is not None  # refusing did not damage it


def test_budget_is_never_exceeded_over_a_long_stream(tmp_path):
    store = DiskStore(tmp_path, budget_bytes=300_000)
    stored = 0
    for i in range(60):
        stored += store.put(key(f"c{i}"), "ns", kv(i, tokens=5 + (i * 7) % 40))
        assert folder_bytes(store) <= 300_000 and store.bytes_used() == folder_bytes(store)
    assert stored == 60 and 0 < len(store.entries()) < 60  # older chunks were evicted to fit
    assert not store.put(key("huge"), "ns", kv(0, tokens=2000))  # bigger than the whole budget
    assert folder_bytes(store) <= 300_000


def test_the_policy_chooses_what_is_evicted(tmp_path):
    keep = {"hot"}
    store = DiskStore(tmp_path, budget_bytes=130_000,
                      choose_victims=lambda entries, need: [e.name for e in entries if e.chunk_id not in keep])
    store.put(key("hot"), "ns", kv(1))
    for i in range(5):
        store.put(key(f"cold{i}"), "ns", kv(i + 2))
    assert key("hot").name in store and folder_bytes(store) <= 130_000


def test_a_flipped_byte_is_quarantined_not_served(tmp_path, caplog):
    store = DiskStore(tmp_path, budget_bytes=10 << 20)
    store.put(key("c1"), "ns", kv(3))
    path = tmp_path / f"{key('c1').name}.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        assert store.get(key("c1"), "ns") is None
    assert f"quarantined {path.name}" in caplog.text and "checksum mismatch" in caplog.text
    assert not path.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1
    assert key("c1").name not in store and store.find("c1") == []


def test_a_truncated_file_and_a_stale_temporary_are_cleaned_at_start(tmp_path):
    store = DiskStore(tmp_path, budget_bytes=10 << 20)
    store.put(key("good"), "ns", kv(4))
    store.put(key("torn"), "ns", kv(5))
    torn = tmp_path / f"{key('torn').name}.safetensors"
    torn.write_bytes(torn.read_bytes()[:6])
    (tmp_path / ".tmp-half-written").write_bytes(b"partial")
    restarted = DiskStore(tmp_path, budget_bytes=10 << 20)
    assert [e.chunk_id for e in restarted.entries()] == ["good"]
    assert not (tmp_path / ".tmp-half-written").exists()
    assert len(list((tmp_path / "quarantine").iterdir())) == 1


WRITER = textwrap.dedent("""
    import sys, torch
    from amem_sgl.residency.disk_store import DiskStore
from amem_sgl.residency.keys import StoreKey


def key(chunk_id: str, model_id: str = "m", **fields) -> StoreKey:
    return StoreKey(chunk_id, model_id, **fields)
    from tests.test_disk_store import key, kv
    store = DiskStore(sys.argv[1], budget_bytes=1 << 30)
    for i in range(10_000):
        store.put(key(f"c{i}"), "ns", kv(i, tokens=64))
        print(f"ack {i}", flush=True)
""")


def test_kill_9_during_writes_loses_nothing_acknowledged_and_serves_nothing_corrupt(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    acked = []
    for line in proc.stdout:
        acked.append(int(line.split()[1]))
        if len(acked) >= 25:
            break
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: it is writing the next chunk now
    proc.wait()
    store = DiskStore(root, budget_bytes=1 << 30)
    for i in acked:
        (stored,) = store.find(f"c{i}")
        loaded, _ = store.get(stored, "ns")
        expected = kv(i, tokens=64)
        assert torch.equal(loaded["k"], expected["k"]) and torch.equal(loaded["v"], expected["v"])
    for entry in store.entries():  # whatever else made it to disk is complete too
        assert store.get(entry.key, "ns") is not None
    assert not (root / "quarantine").exists()


def test_two_tp_ranks_and_two_dtypes_of_one_chunk_are_separate_files(tmp_path):
    store = DiskStore(tmp_path, budget_bytes=10 << 20)
    rank0, rank1 = key("c1", tp_rank=0, tp_size=2), key("c1", tp_rank=1, tp_size=2)
    fp32 = key("c1", dtype="torch.float32", tp_rank=0, tp_size=2)
    shards = {rank0: kv(10), rank1: kv(11), fp32: kv(12, dtype=torch.float32)}
    for k, tensors in shards.items():
        assert store.put(k, "ns", tensors)
    restarted = DiskStore(tmp_path, budget_bytes=10 << 20)
    assert len(list(tmp_path.glob("c1.*.safetensors"))) == 3 and len(restarted.find("c1")) == 3
    for k, tensors in shards.items():
        loaded, meta = restarted.get(k, "ns")
        assert torch.equal(loaded["k"], tensors["k"]), k
        assert (meta["tp_rank"], meta["tp_size"]) == (str(k.tp_rank), "2")
    assert restarted.delete_chunk("c1") == 3 and not list(tmp_path.glob("c1.*"))


def test_a_file_from_before_rank_and_layout_keys_still_loads_as_rank_0(tmp_path):
    """The old format: <chunk_id>.safetensors with chunk_id/namespace/model_id/checksum only (and the
    cache's layout metadata, or none): renamed to its key at start, served to rank 0 of 1."""
    from safetensors.torch import save_file

    from amem_sgl.residency.disk_store import tensors_checksum

    for cid, extra in (("old1", {"dtype": "torch.bfloat16", "layers": "4", "kv_heads": "3", "head_dim": "64",
                                 "canonical_start": "9"}), ("old2", {})):
        tensors = kv(13)
        save_file(tensors, str(tmp_path / f"{cid}.safetensors"),
                  metadata={**extra, "chunk_id": cid, "namespace": "ns", "model_id": "m",
                            "checksum": tensors_checksum(tensors)})
    store = DiskStore(tmp_path, budget_bytes=10 << 20)
    for cid in ("old1", "old2"):
        (found,) = store.find(cid)
        assert (found.tp_rank, found.tp_size, found.dtype, found.layers, found.kv_heads, found.head_dim) == (
            0, 1, "torch.bfloat16", "4", "3", "64")
        loaded, meta = store.get(found, "ns")
        assert torch.equal(loaded["k"], kv(13)["k"])
        assert not (tmp_path / f"{cid}.safetensors").exists() and (tmp_path / f"{found.name}.safetensors").exists()
    assert store.get(store.find("old1")[0], "ns")[1]["canonical_start"] == "9"
    assert not (tmp_path / "quarantine").exists()


def test_a_tier_chain_answers_from_the_first_tier_holding_a_key(tmp_path):
    """CPU -> disk -> a third tier (a second disk folder standing in for a shared store): batched
    lookups walk the chain in order; each tier admits or refuses by its own budget."""
    from amem_sgl.residency.tiers import CpuTier, DiskTier, PutItem, TierChain

    cpu = CpuTier(budget_bytes=2 * 4 * 20 * 3 * 64 * 2 * 2, pin=False)  # two chunks; full: refuses
    disk, shared = DiskTier(tmp_path / "disk", 10 << 20), DiskTier(tmp_path / "shared", 10 << 20, name="shared")
    chain = TierChain([cpu, disk, shared])
    items = {c: PutItem(key(c), "ns", kv(i), {"canonical_start": str(i)}) for i, c in enumerate("abcd")}
    assert cpu.put([items["a"], items["b"], items["c"]]) == [True, True, False]
    assert disk.put([items["c"]]) == [True] and shared.put([items["a"], items["d"]]) == [True, True]
    keys = [key(c) for c in "abcdz"]
    assert chain.locate(keys) == ["cpu", "cpu", "disk", "shared", None]
    got = chain.get(keys, "ns")
    assert [g[1] if g else None for g in got] == ["cpu", "cpu", "disk", "shared", None]
    assert torch.equal(got[3][0][0]["k"], kv(3)["k"]) and got[2][0][1]["canonical_start"] == "2"
    assert chain.get([key("a")], "other-ns") == [None]  # never across namespaces
    assert [k.name for k in chain.find("a")] == [key("a").name]  # in two tiers, one key
    assert chain.delete([key("a").name]) == 1 and chain.locate([key("a")]) == [None]
