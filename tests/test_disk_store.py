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
    assert store.put("c1", "alice", "m", tensors, {"num_tokens": 20, "canonical_start": 24})
    again = DiskStore(tmp_path, budget_bytes=10 << 20)  # a new process would see the same
    loaded, meta = again.get("c1", "alice", "m")
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    assert loaded["k"].dtype == dtype and meta["canonical_start"] == "24" and meta["namespace"] == "alice"


def test_another_namespace_or_model_is_refused(tmp_path):
    store = DiskStore(tmp_path, budget_bytes=10 << 20)
    store.put("c1", "alice", "m", kv(1))
    assert store.get("c1", "bob", "m") is None and store.get("c1", "alice", "other-model") is None
    assert store.get("c1", "alice", "m") is not None  # refusing did not damage it


def test_budget_is_never_exceeded_over_a_long_stream(tmp_path):
    store = DiskStore(tmp_path, budget_bytes=300_000)
    stored = 0
    for i in range(60):
        stored += store.put(f"c{i}", "ns", "m", kv(i, tokens=5 + (i * 7) % 40))
        assert folder_bytes(store) <= 300_000 and store.bytes_used() == folder_bytes(store)
    assert stored == 60 and 0 < len(store.entries()) < 60  # older chunks were evicted to fit
    assert not store.put("huge", "ns", "m", kv(0, tokens=2000))  # bigger than the whole budget
    assert folder_bytes(store) <= 300_000


def test_the_policy_chooses_what_is_evicted(tmp_path):
    keep = {"hot"}
    store = DiskStore(tmp_path, budget_bytes=130_000,
                      choose_victims=lambda entries, need: [e.chunk_id for e in entries if e.chunk_id not in keep])
    store.put("hot", "ns", "m", kv(1))
    for i in range(5):
        store.put(f"cold{i}", "ns", "m", kv(i + 2))
    assert "hot" in store and folder_bytes(store) <= 130_000


def test_a_flipped_byte_is_quarantined_not_served(tmp_path, caplog):
    store = DiskStore(tmp_path, budget_bytes=10 << 20)
    store.put("c1", "ns", "m", kv(3))
    path = tmp_path / "c1.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        assert store.get("c1", "ns", "m") is None
    assert "quarantined c1.safetensors" in caplog.text and "checksum mismatch" in caplog.text
    assert not path.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1
    assert "c1" not in store


def test_a_truncated_file_and_a_stale_temporary_are_cleaned_at_start(tmp_path):
    store = DiskStore(tmp_path, budget_bytes=10 << 20)
    store.put("good", "ns", "m", kv(4))
    store.put("torn", "ns", "m", kv(5))
    (tmp_path / "torn.safetensors").write_bytes((tmp_path / "torn.safetensors").read_bytes()[:6])
    (tmp_path / ".tmp-half-written").write_bytes(b"partial")
    restarted = DiskStore(tmp_path, budget_bytes=10 << 20)
    assert [e.chunk_id for e in restarted.entries()] == ["good"]
    assert not (tmp_path / ".tmp-half-written").exists()
    assert len(list((tmp_path / "quarantine").iterdir())) == 1


WRITER = textwrap.dedent("""
    import sys, torch
    from amem_sgl.residency.disk_store import DiskStore
    from tests.test_disk_store import kv
    store = DiskStore(sys.argv[1], budget_bytes=1 << 30)
    for i in range(10_000):
        store.put(f"c{i}", "ns", "m", kv(i, tokens=64))
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
        loaded, _ = store.get(f"c{i}", "ns", "m")
        expected = kv(i, tokens=64)
        assert torch.equal(loaded["k"], expected["k"]) and torch.equal(loaded["v"], expected["v"])
    for entry in store.entries():  # whatever else made it to disk is complete too
        assert store.get(entry.chunk_id, "ns", "m") is not None
    assert not (root / "quarantine").exists()
