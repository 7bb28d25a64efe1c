"""The residency service as its own process (started by the Supervisor, spoken to over ZeroMQ)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import zmq

from amem_sgl.residency import protocol
from amem_sgl.residency.client import ResidencyClient
from amem_sgl.residency.supervisor import Supervisor

MODEL = "test-model"
LAYERS, HEADS, DIM = 4, 3, 16


def chunk(gen, tokens: int = 32, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    shape = (LAYERS, tokens, HEADS, DIM)
    return {"k": torch.randn(shape, generator=gen).to(dtype), "v": torch.randn(shape, generator=gen).to(dtype),
            "tokens": torch.randint(0, 50000, (tokens,), generator=gen, dtype=torch.int64)}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(torch.seed())


@pytest.fixture
def make_service(tmp_path):
    started = []

    def start(*, cpu_chunks=100, disk_chunks=100, policy="value", size=nbytes(chunk(torch.Generator())),
              weights=None, name="disk"):
        sup = Supervisor(root=tmp_path / name, address=f"ipc://{tmp_path}/{name}.sock",
                         cpu_bytes=cpu_chunks * size, disk_bytes=disk_chunks * (size + 2048), policy=policy,
                         weights=weights, shm_dir=str(tmp_path / "shm"), log_path=tmp_path / "residency.log").start()
        started.append(sup)
        return sup, ResidencyClient(sup.address, tmp_path / "shm", timeout_s=10)

    yield start
    for sup in started:
        sup.stop()


def bits_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].dtype
                                    != torch.int64 else a[k], b[k].view(torch.uint8) if b[k].dtype != torch.int64
                                    else b[k]) for k in a)


def test_round_trip_is_bit_exact_through_cpu_and_disk_tiers_and_a_restart(make_service, gen, tmp_path):
    sup, client = make_service()
    originals = {f"c{i}": chunk(gen, dtype=dtype) for i, dtype in enumerate([torch.bfloat16, torch.float32,
                                                                             torch.float16])}
    for cid, tensors in originals.items():
        reply = client.store(cid, "ns", MODEL, tensors, {"canonical_start": 7}).result(30)
        assert reply == {"ok": True, "cpu": True, "disk": True, "key": reply["key"]}
        assert reply["key"].startswith(f"{cid}.tp0of1.")
    for cid, tensors in originals.items():
        got, meta, tier = client.fetch(cid, "ns", MODEL)
        assert tier == "cpu" and meta["canonical_start"] == "7" and bits_equal(got, tensors)
    assert not list((tmp_path / "shm").iterdir())  # every transfer file was consumed

    sup.stop()  # restart: the CPU tier is gone, the disk tier is found again
    sup, client = make_service()
    assert client.request("stats")["disk_chunks"] == 3 and client.request("stats")["cpu_chunks"] == 0
    got, _, tier = client.fetch("c1", "ns", MODEL)
    assert tier == "disk" and bits_equal(got, originals["c1"])
    assert client.fetch("c1", "ns", MODEL)[2] == "cpu"  # promoted on use
    assert client.request("prefetch", chunk_ids=["c0", "c2", "nope"], namespace="ns", model_id=MODEL) == {
        "ok": True, "loaded": 2, "missing": ["nope"]}
    got, _, tier = client.fetch("c2", "ns", MODEL)
    assert tier == "cpu" and bits_equal(got, originals["c2"])
    # never across namespaces or models
    assert client.fetch("c0", "other-ns", MODEL) is None and client.fetch("c0", "ns", "other-model") is None


def test_budgets_hold_over_a_long_stream(make_service, gen, tmp_path):
    sup, client = make_service(cpu_chunks=5, disk_chunks=8, policy="lru")
    stats = client.request("stats")
    for i in range(40):
        client.store(f"s{i}", "ns", MODEL, chunk(gen), {}).result(30)
        on_disk = sum(p.stat().st_size for p in (tmp_path / "disk").glob("*.safetensors"))
        stats = client.request("stats")
        assert on_disk <= stats["disk_budget"] and stats["disk_bytes"] == on_disk
        assert stats["cpu_bytes"] <= stats["cpu_budget"]
    assert stats["disk_chunks"] == 8 and stats["cpu_chunks"] == 5  # full, never over


@pytest.mark.parametrize("policy", ["value", "lru"])
def test_value_policy_keeps_a_reused_working_set_under_a_flood_where_lru_loses_it(make_service, gen, policy):
    sup, client = make_service(cpu_chunks=6, disk_chunks=8, policy=policy)
    hot = [f"hot{i}" for i in range(3)]
    for cid in hot:
        client.store(cid, "ns", MODEL, chunk(gen), {}).result(30)
    for _ in range(3):  # the working set is used turn after turn
        for cid in hot:
            assert client.fetch(cid, "ns", MODEL) is not None
    for i in range(30):  # then a flood of chunks that are never used again
        client.store(f"once{i}", "ns", MODEL, chunk(gen), {}).result(30)
    rows = {r["chunk_id"]: r for r in client.request("list", namespace="ns")["chunks"]}
    hot_in_cpu = sum("cpu" in rows.get(cid, {}).get("tiers", []) for cid in hot)
    hot_on_disk = sum("disk" in rows.get(cid, {}).get("tiers", []) for cid in hot)
    stats = client.request("stats")
    assert stats["cpu_chunks"] == 6 and stats["disk_chunks"] == 8
    if policy == "value":
        assert (hot_in_cpu, hot_on_disk) == (3, 3), rows
    else:
        assert (hot_in_cpu, hot_on_disk) == (0, 0), rows


def test_kill_9_during_writes_loses_no_acknowledged_chunk_and_corrupts_none(make_service, gen, tmp_path):
    sup, client = make_service()
    originals = {f"k{i}": chunk(gen, tokens=64) for i in range(60)}
    acked, stop = [], threading.Event()

    def writer():
        for cid, tensors in originals.items():
            if stop.is_set():
                return
            reply = client._store(cid, "ns", MODEL, tensors, {}, None)
            if reply is not None and reply["disk"]:
                acked.append(cid)

    thread = threading.Thread(target=writer)
    thread.start()
    while len(acked) < 10:
        time.sleep(0.01)
    os.kill(sup.process.pid, signal.SIGKILL)  # mid-stream
    stop.set()
    thread.join(60)
    deadline = time.monotonic() + 60
    while sup.restarts == 0 or sup.process.poll() is not None or client.request("ping") is None:
        assert time.monotonic() < deadline, "the supervisor did not restart the service"
        time.sleep(0.1)
    assert len(acked) >= 10
    for cid in acked:
        got = client.fetch(cid, "ns", MODEL)
        assert got is not None and bits_equal(got[0], originals[cid]), cid
    assert client.request("stats")["quarantined"] == 0
    assert not [p for p in (tmp_path / "disk").iterdir() if p.name.startswith(".tmp-")]


def test_a_hand_corrupted_file_is_quarantined_never_served(make_service, gen, tmp_path):
    sup, client = make_service(cpu_chunks=0)
    original = chunk(gen)
    assert client.store("bad", "ns", MODEL, original, {}).result(30)["disk"]
    (path,) = (tmp_path / "disk").glob("bad.*.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    assert client.fetch("bad", "ns", MODEL) is None
    assert client.request("stats")["quarantined"] == 1 and not path.exists()
    assert f"quarantined {path.name}" in (tmp_path / "residency.log").read_text()


def test_malformed_messages_get_an_error_and_the_service_stays_up(make_service, tmp_path):
    sup, client = make_service()
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(sup.address)
    for payload in (b"\xc1garbage", protocol.encode([1, 2]), protocol.encode({"op": "explode"}),
                    protocol.encode({"op": "get", "chunk_id": 5}), protocol.encode({"op": "put", "chunk_id": "x",
                    "namespace": "n", "model_id": "m", "path": "/nonexistent"})):
        sock.send(payload)
        assert sock.poll(10000)
        reply = protocol.decode(sock.recv())
        assert reply["ok"] is False and reply["error"]
    sock.close(linger=0)
    assert client.request("ping")["pid"] == sup.process.pid


def test_a_dead_service_is_a_miss_not_an_error(tmp_path):
    client = ResidencyClient(f"ipc://{tmp_path}/nobody.sock", tmp_path / "shm", timeout_s=0.3)
    assert client.fetch("x", "ns", MODEL) is None and client.request("ping") is None
    assert client.store("x", "ns", MODEL, {"k": torch.ones(2)}, {}).result(10) is None
    assert not list((tmp_path / "shm").iterdir())  # the staged file was not leaked


def test_two_tp_ranks_storing_one_chunk_id_keep_their_own_shards(make_service, gen, tmp_path):
    """A simulated second rank: each rank of a TP=2 server stores its head shard of the same chunk
    id; neither overwrites the other, each fetches its own, a single-GPU request finds neither."""
    sup, client = make_service()
    shards = {rank: chunk(gen) for rank in (0, 1)}
    keys = {rank: client.store("c", "ns", MODEL, shards[rank], {"canonical_start": 3}, tp_rank=rank,
                               tp_size=2).result(30)["key"] for rank in (0, 1)}
    assert keys[0] != keys[1] and len(list((tmp_path / "disk").glob("c.*.safetensors"))) == 2
    assert client.contains(["c", "other"], MODEL, tp_rank=1, tp_size=2) == {"c": "cpu", "other": None}
    assert client.contains(["c"], MODEL) == {"c": None}  # rank 0 of 1: not stored
    assert client.fetch("c", "ns", MODEL) is None and client.fetch("c", "ns", MODEL, tp_rank=0, tp_size=4) is None
    sup.stop()  # and after a restart, from the disk tier
    sup, client = make_service()
    for rank in (0, 1):
        got, meta, tier = client.fetch("c", "ns", MODEL, tp_rank=rank, tp_size=2)
        assert tier == "disk" and bits_equal(got, shards[rank]) and meta["tp_rank"] == str(rank)
    rows = client.request("list", namespace="ns")["chunks"]
    assert sorted((r["chunk_id"], r["tp_rank"], r["tp_size"]) for r in rows) == [("c", 0, 2), ("c", 1, 2)]
    assert client.request("delete", chunk_ids=["c"])["deleted"] == 2
    assert not list((tmp_path / "disk").glob("c.*"))


def test_a_layout_names_the_stored_copy_and_defaults_keep_todays_calls(make_service, gen):
    sup, client = make_service()
    fp32 = chunk(gen, dtype=torch.float32)
    layout = {"dtype": "torch.float32", "layers": str(LAYERS), "kv_heads": str(HEADS), "head_dim": str(DIM)}
    client.store("c", "ns", MODEL, fp32, {}).result(30)  # the call the cache makes today
    assert bits_equal(client.fetch("c", "ns", MODEL)[0], fp32)  # and its fetch: rank 0 of 1, any layout
    assert bits_equal(client.fetch("c", "ns", MODEL, layout=layout)[0], fp32)
    assert client.fetch("c", "ns", MODEL, layout={**layout, "dtype": "torch.bfloat16"}) is None
    assert client.fetch("c", "ns", MODEL, layout={**layout, "kv_heads": "8"}) is None


@pytest.mark.parametrize("report", ["relevance", "relevance-before-store", "none"])
def test_a_highly_relevant_chunk_outlives_a_recent_irrelevant_one(make_service, gen, report):
    """The CPU tier holds two chunks. R is stored first (oldest), I after it, then N arrives and
    one must go. With R's recall score reported (after or before it was stored) the value policy
    keeps R and demotes I, the more recent; without a score, R goes: the relevance term decides."""
    sup, client = make_service(cpu_chunks=2, weights={"half_life_s": 5.0})
    if report == "relevance-before-store":
        assert client.relevance({"R": 0.95}).result(30) == {"ok": True, "updated": 0}
    client.store("R", "ns", MODEL, chunk(gen), {}).result(30)
    if report == "relevance":
        assert client.relevance({"R": 0.95}).result(30) == {"ok": True, "updated": 1}
    time.sleep(0.3)
    client.store("I", "ns", MODEL, chunk(gen), {}).result(30)
    time.sleep(0.3)
    client.store("N", "ns", MODEL, chunk(gen), {}).result(30)
    rows = {r["chunk_id"]: r for r in client.request("list", namespace="ns")["chunks"]}
    in_cpu = {cid for cid, r in rows.items() if "cpu" in r["tiers"]}
    assert len(in_cpu) == 2 and all("disk" in r["tiers"] for r in rows.values())  # demotion, not loss
    if report == "none":
        assert in_cpu == {"I", "N"} and rows["R"]["relevance"] == 0.0
    else:
        assert in_cpu == {"R", "N"} and rows["R"]["relevance"] == 0.95


def test_hit_with_scores_records_relevance_and_reuse(make_service, gen):
    sup, client = make_service()
    client.store("a", "ns", MODEL, chunk(gen), {}).result(30)
    client.hit(["a", "unknown"], relevance=[0.7, 0.2])
    client.flush()
    (row,) = client.request("list", namespace="ns")["chunks"]
    assert (row["hits"], row["relevance"]) == (1, 0.7)
    assert client.request("hit", chunk_ids=["a"], relevance=[0.1, 0.2]) is None  # one score per id, or refused
    assert client.request("relevance", scores={"a": "high"}) is None


def test_an_old_folder_keeps_its_chunks_and_their_statistics(tmp_path, gen):
    """A disk tier written before keys had rank and layout (<chunk_id>.safetensors, a manifest by
    chunk id): the service starts on it, serves the chunk to rank 0 of 1, keeps its hits and score."""
    import json

    from safetensors.torch import save_file

    from amem_sgl.residency.disk_store import tensors_checksum
    from amem_sgl.residency.service import ResidencyService

    root = tmp_path / "old"
    root.mkdir()
    tensors = chunk(gen)
    save_file(tensors, str(root / "c.safetensors"), metadata={"chunk_id": "c", "namespace": "ns", "model_id": MODEL,
                                                               "checksum": tensors_checksum(tensors)})
    (root / "manifest.json").write_text(json.dumps({"version": 1, "chunks": {"c": {"hits": 5, "relevance": 0.4,
                                                                                    "last_used": 1.0}}}))
    service = ResidencyService(root, cpu_bytes=1 << 20, disk_bytes=1 << 20, shm_dir=tmp_path / "shm")
    (row,) = service.handle({"op": "list"})["chunks"]
    assert (row["chunk_id"], row["tp_rank"], row["tp_size"], row["hits"], row["relevance"]) == ("c", 0, 1, 5, 0.4)
    reply = service.handle({"op": "get", "chunk_id": "c", "namespace": "ns", "model_id": MODEL})
    assert reply["found"] and reply["tier"] == "disk"
    from safetensors.torch import load_file

    assert bits_equal({k: v for k, v in load_file(reply["path"]).items()}, tensors)
