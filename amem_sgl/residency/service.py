"""The residency service: chunk KV below the device pool, in its own process.

Two bounded tiers under one policy (amem_sgl.residency.policy):
* CPU  -- tensors in this process's memory (pinned when CUDA is present, for fast host-to-device);
* disk -- safetensors files (amem_sgl.residency.disk_store): durable, checksummed, found again at
  start, the source of truth across restarts. ``manifest.json`` beside them keeps the policy's
  per-chunk statistics (hits, relevance, last use) across restarts; it is advisory, the files rule.

A ``put`` (the scheduler registered a chunk) is written through to disk before it is acknowledged,
and admitted to the CPU tier if the policy finds it room; CPU eviction is demotion (the disk copy
stays). A ``get`` serves from CPU, else from disk (verified, then promoted to CPU if admitted).
The device tier is SGLang's KV pool, managed by the scheduler; its hits are reported here so that
reuse counts are true.

    python -m amem_sgl.residency.service --dir DIR --address ipc:///tmp/amem.sock [--policy value]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import torch
import zmq
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from amem_sgl.residency import protocol
from amem_sgl.residency.disk_store import DiskStore, StoredChunk, _header
from amem_sgl.residency.policy import ChunkStats, PolicyWeights, ValuePolicy, make_policy

logger = logging.getLogger("amem_sgl.residency")

MANIFEST = "manifest.json"


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class CpuTier:
    def __init__(self, budget_bytes: int, pin: bool) -> None:
        self.budget_bytes, self.pin = budget_bytes, pin
        self.items: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}
        self.nbytes: dict[str, int] = {}

    def bytes_used(self) -> int:
        return sum(self.nbytes.values())

    def add(self, chunk_id: str, tensors: dict[str, torch.Tensor], header: dict) -> None:
        if self.pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        self.items[chunk_id] = (tensors, header)
        self.nbytes[chunk_id] = tensors_nbytes(tensors)

    def drop(self, chunk_id: str) -> bool:
        self.nbytes.pop(chunk_id, None)
        return self.items.pop(chunk_id, None) is not None


class ResidencyService:
    def __init__(self, root: str | os.PathLike, *, cpu_bytes: int, disk_bytes: int, policy: str = "value",
                 weights: PolicyWeights = PolicyWeights(), shm_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser()
        self.policy: ValuePolicy = make_policy(policy, weights)
        self.disk = DiskStore(self.root, disk_bytes, self._disk_victims)
        self.cpu = CpuTier(cpu_bytes, pin=torch.cuda.is_available())
        self.shm_dir = Path(shm_dir) if shm_dir else default_shm_dir()
        self.shm_dir.mkdir(parents=True, exist_ok=True)
        self.stats: dict[str, ChunkStats] = {}
        self.counters = {k: 0 for k in ("puts", "gets", "cpu_hits", "disk_hits", "misses", "device_hits",
                                        "cpu_evictions", "cpu_refused", "disk_refused", "prefetched")}
        self._newcomer: ChunkStats | None = None
        self._load_manifest()
        self._ops_since_manifest = 0

    # ------------------------------------------------------------------ ops

    def handle(self, message: dict) -> dict:
        op = message.get("op")
        if op not in protocol.OPS:
            raise protocol.ProtocolError(f"unknown op {op!r}; known: {', '.join(protocol.OPS)}")
        reply = getattr(self, f"op_{op}")(message)
        if op in ("put", "get", "hit", "relevance", "delete", "prefetch"):
            self._ops_since_manifest += 1
            if self._ops_since_manifest >= 32:
                self.save_manifest()
        return {"ok": True, **reply}

    def op_ping(self, message: dict) -> dict:
        return {"pid": os.getpid(), "version": protocol.VERSION}

    def op_put(self, message: dict) -> dict:
        chunk_id, namespace, model_id, path = protocol.require(message, chunk_id=str, namespace=str,
                                                               model_id=str, path=str)
        self.counters["puts"] += 1
        try:
            data = Path(path).read_bytes()  # one read: tensors and header from the same bytes
        finally:
            Path(path).unlink(missing_ok=True)
        tensors, header = st_load(data), _header(data)
        meta = {k: v for k, v in header.items() if k not in ("chunk_id", "namespace", "model_id", "checksum")}
        stats = self.stats.get(chunk_id) or ChunkStats(chunk_id, tensors_nbytes(tensors))
        stats.relevance = float(message.get("relevance", stats.relevance))
        stats.last_used = time.time()
        self._newcomer = stats
        try:
            on_disk = self.disk.put(chunk_id, namespace, model_id, tensors, meta)
        finally:
            self._newcomer = None
        if not on_disk:
            self.counters["disk_refused"] += 1
        self.stats[chunk_id] = stats
        in_cpu = self._admit_cpu(chunk_id, tensors, {**meta, "namespace": namespace, "model_id": model_id}, stats)
        if not on_disk and not in_cpu:
            self.stats.pop(chunk_id, None)
        return {"cpu": in_cpu, "disk": on_disk}

    def op_get(self, message: dict) -> dict:
        chunk_id, namespace, model_id = protocol.require(message, chunk_id=str, namespace=str, model_id=str)
        self.counters["gets"] += 1
        tier, item = "cpu", self.cpu.items.get(chunk_id)
        if item is not None and (item[1].get("namespace"), item[1].get("model_id")) != (namespace, model_id):
            item = None  # never served across namespaces or models
        if item is None:
            tier, loaded = "disk", self.disk.get(chunk_id, namespace, model_id)
            if loaded is None:
                self.counters["misses"] += 1
                return {"found": False}
            tensors, header = loaded
            item = (tensors, header)
        stats = self.stats.setdefault(chunk_id, ChunkStats(chunk_id, tensors_nbytes(item[0])))
        stats.hits += 1
        stats.last_used = time.time()
        self.counters[f"{tier}_hits"] += 1
        if tier == "disk":
            self._admit_cpu(chunk_id, item[0], item[1], stats)
        path = self.shm_dir / f"get-{chunk_id[:24]}-{uuid.uuid4().hex}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(item[0], str(tmp), metadata={k: str(v) for k, v in item[1].items()})
        os.replace(tmp, path)
        return {"found": True, "tier": tier, "path": str(path)}

    def op_hit(self, message: dict) -> dict:
        (chunk_ids,) = protocol.require(message, chunk_ids=list)
        now = time.time()
        for cid in chunk_ids:
            stats = self.stats.get(cid)
            if stats is not None:
                stats.hits += 1
                stats.last_used = now
                self.counters["device_hits"] += 1
        return {}

    def op_relevance(self, message: dict) -> dict:
        (scores,) = protocol.require(message, scores=dict)
        updated = 0
        for cid, score in scores.items():
            if cid in self.stats and isinstance(score, (int, float)):
                self.stats[cid].relevance = float(score)
                updated += 1
        return {"updated": updated}

    def op_prefetch(self, message: dict) -> dict:
        chunk_ids, namespace, model_id = protocol.require(message, chunk_ids=list, namespace=str, model_id=str)
        loaded, missing = 0, []
        for cid in chunk_ids:
            if cid in self.cpu.items:
                continue
            got = self.disk.get(cid, namespace, model_id)
            if got is None:
                missing.append(cid)
                continue
            stats = self.stats.setdefault(cid, ChunkStats(cid, tensors_nbytes(got[0])))
            stats.last_used = time.time()
            if self._admit_cpu(cid, got[0], got[1], stats):
                loaded += 1
        self.counters["prefetched"] += loaded
        return {"loaded": loaded, "missing": missing}

    def op_delete(self, message: dict) -> dict:
        if "namespace" in message:
            (namespace,) = protocol.require(message, namespace=str)
            chunk_ids = [e.chunk_id for e in self.disk.entries() if e.namespace == namespace]
            chunk_ids += [cid for cid, (_, h) in self.cpu.items.items() if h.get("namespace") == namespace]
        else:
            (chunk_ids,) = protocol.require(message, chunk_ids=list)
        deleted = 0
        for cid in set(chunk_ids):
            gone = self.disk.delete(cid) | self.cpu.drop(cid)
            self.stats.pop(cid, None)
            deleted += gone
        return {"deleted": deleted}

    def op_list(self, message: dict) -> dict:
        namespace = message.get("namespace")
        seen: dict[str, dict] = {}
        for e in self.disk.entries():
            seen[e.chunk_id] = {"chunk_id": e.chunk_id, "namespace": e.namespace, "tiers": ["disk"],
                                "nbytes": e.nbytes}
        for cid, (tensors, header) in self.cpu.items.items():
            row = seen.setdefault(cid, {"chunk_id": cid, "namespace": header.get("namespace"), "tiers": [],
                                        "nbytes": self.cpu.nbytes[cid]})
            row["tiers"].insert(0, "cpu")
        rows = [r for r in seen.values() if namespace is None or r["namespace"] == namespace]
        for r in rows:
            s = self.stats.get(r["chunk_id"])
            r["hits"], r["relevance"] = (s.hits, s.relevance) if s else (0, 0.0)
        return {"chunks": rows}

    def op_stats(self, message: dict) -> dict:
        return {"policy": self.policy.name, "cpu_bytes": self.cpu.bytes_used(), "cpu_budget": self.cpu.budget_bytes,
                "cpu_chunks": len(self.cpu.items), "disk_bytes": self.disk.bytes_used(),
                "disk_budget": self.disk.budget_bytes, "disk_chunks": len(self.disk.entries()),
                "quarantined": len(list(self.disk.quarantine_dir.glob("*"))) if self.disk.quarantine_dir.exists() else 0,
                **self.counters}

    # ------------------------------------------------------------------ policy

    def _admit_cpu(self, chunk_id: str, tensors, header: dict, stats: ChunkStats) -> bool:
        if chunk_id in self.cpu.items:
            return True
        nbytes = tensors_nbytes(tensors)
        if nbytes > self.cpu.budget_bytes:
            self.counters["cpu_refused"] += 1
            return False
        need = self.cpu.bytes_used() + nbytes - self.cpu.budget_bytes
        residents = [self.stats.get(cid) or ChunkStats(cid, n) for cid, n in self.cpu.nbytes.items()]
        victims = self.policy.victims(residents, stats, need)
        if victims is None:
            self.counters["cpu_refused"] += 1
            return False
        for cid in victims:
            self.cpu.drop(cid)  # demotion: the disk copy (if the disk tier kept one) stays
            self.counters["cpu_evictions"] += 1
        self.cpu.add(chunk_id, tensors, header)
        return True

    def _disk_victims(self, entries: list[StoredChunk], need: int) -> list[str]:
        newcomer = self._newcomer or ChunkStats("?", need)
        residents = [self.stats.get(e.chunk_id) or ChunkStats(e.chunk_id, e.nbytes, e.mtime) for e in entries]
        return self.policy.victims(residents, newcomer, need) or []

    # ------------------------------------------------------------------ manifest

    def save_manifest(self) -> None:
        self._ops_since_manifest = 0
        data = {"version": protocol.VERSION, "policy": self.policy.name,
                "chunks": {cid: s.to_json() for cid, s in self.stats.items()}}
        tmp = self.root / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.root / MANIFEST)

    def _load_manifest(self) -> None:
        path = self.root / MANIFEST
        known = {e.chunk_id: e for e in self.disk.entries()}
        try:
            chunks = json.loads(path.read_text()).get("chunks", {}) if path.exists() else {}
        except (OSError, ValueError) as err:
            logger.warning("amem residency: ignoring unreadable manifest %s (%s)", path, err)
            chunks = {}
        for cid, entry in known.items():
            saved = chunks.get(cid) or {}
            self.stats[cid] = ChunkStats(cid, entry.nbytes, float(saved.get("last_used", entry.mtime)),
                                         int(saved.get("hits", 0)), float(saved.get("relevance", 0.0)))
        logger.info("amem residency: %d chunks on disk (%d bytes) in %s", len(known), self.disk.bytes_used(), self.root)


def default_shm_dir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"amem-{os.getuid()}"


def serve(service: ResidencyService, address: str, *, ready_file: str | None = None,
          parent_pid: int | None = None) -> None:
    """Answer requests on ``address`` until SIGTERM/SIGINT (or until ``parent_pid`` is gone: a
    supervisor that died must not leave the service behind); a bad message gets an error reply."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    stopping = {"flag": False}

    def stop(signum, frame):  # noqa: ARG001
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if ready_file:
        Path(ready_file).write_text(str(os.getpid()))
    logger.info("amem residency: serving on %s (pid %d, policy %s)", address, os.getpid(), service.policy.name)
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    try:
        while not stopping["flag"]:
            if not poller.poll(200):
                if parent_pid is not None and os.getppid() != parent_pid:
                    logger.info("amem residency: parent %d gone; exiting", parent_pid)
                    break
                continue
            frames = socket.recv_multipart()
            identity, payload = frames[0], frames[-1]
            try:
                reply = service.handle(protocol.decode(payload))
            except Exception as err:  # noqa: BLE001 -- one bad request must not stop the service
                if not isinstance(err, protocol.ProtocolError):
                    logger.exception("amem residency: request failed")
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            socket.send_multipart([identity, b"", protocol.encode(reply)])
    finally:
        service.save_manifest()
        socket.close()
        logger.info("amem residency: stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="disk tier folder (safetensors files + manifest)")
    parser.add_argument("--address", required=True, help="ZeroMQ address to bind, e.g. ipc:///tmp/amem.sock")
    parser.add_argument("--cpu-bytes", type=int, default=2 << 30)
    parser.add_argument("--disk-bytes", type=int, default=20 << 30)
    parser.add_argument("--policy", choices=["value", "lru"], default="value")
    parser.add_argument("--weights", default="{}", help="JSON: relevance, recency, reuse, size_per_mib, half_life_s")
    parser.add_argument("--shm-dir", default=None)
    parser.add_argument("--ready-file", default=None, help="written with the pid once the socket is bound")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s] %(name)s %(levelname)s %(message)s")
    service = ResidencyService(args.dir, cpu_bytes=args.cpu_bytes, disk_bytes=args.disk_bytes, policy=args.policy,
                               weights=PolicyWeights(**json.loads(args.weights)), shm_dir=args.shm_dir)
    serve(service, args.address, ready_file=args.ready_file, parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
