"""The residency service: chunk KV below the device pool, in its own process.

Two bounded tiers (amem_sgl.residency.tiers, one interface, looked up in order) under one policy
(amem_sgl.residency.policy):
* CPU  -- tensors in this process's memory (pinned when CUDA is present, for fast host-to-device);
* disk -- safetensors files (amem_sgl.residency.disk_store): durable, checksummed, found again at
  start, the source of truth across restarts. ``manifest.json`` beside them keeps the policy's
  per-key statistics (hits, relevance, last use) across restarts; it is advisory, the files rule.

Everything is stored under a key (amem_sgl.residency.keys): chunk id, model id, dtype, KV layout
and TP rank/size, so each rank of a tensor-parallel server keeps its own head shard of a chunk. A
request names the chunk and, optionally, its rank (default 0 of 1) and layout (default: any).
The memory layer reports recall scores (``relevance``, or ``hit`` with scores): the value policy's
relevance term, kept per chunk id (also for chunks stored later).

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
from amem_sgl.residency.disk_store import _header
from amem_sgl.residency.keys import LAYOUT_FIELDS, StoreKey, private_dir
from amem_sgl.residency.policy import ChunkStats, PolicyWeights, ValuePolicy, make_policy
from amem_sgl.residency.tiers import CpuTier, DiskTier, Entry, PutItem, TierChain, tensors_nbytes

logger = logging.getLogger("amem_sgl.residency")

MANIFEST = "manifest.json"
PUT_ANSWERED_KEPT = 100_000  # chunk ids whose put was answered, kept to answer ``contains``
MAX_PENDING_RELEVANCE = 100_000  # scores reported for chunks not stored yet, kept for their put


def _rank_fields(message: dict) -> tuple[int, int, dict | None]:
    """A request's optional TP rank/size (default rank 0 of 1) and layout (default: any)."""
    tp_rank, tp_size, layout = message.get("tp_rank", 0), message.get("tp_size", 1), message.get("layout")
    if not isinstance(tp_rank, int) or not isinstance(tp_size, int) or not 0 <= tp_rank < tp_size:
        raise protocol.ProtocolError(f"{message.get('op')}: tp_rank/tp_size must be ints, 0 <= rank < size")
    if layout is not None and (not isinstance(layout, dict) or set(layout) - set(LAYOUT_FIELDS)):
        raise protocol.ProtocolError(f"{message.get('op')}: layout must be a map of {', '.join(LAYOUT_FIELDS)}")
    return tp_rank, tp_size, layout


class ResidencyService:
    def __init__(self, root: str | os.PathLike, *, cpu_bytes: int, disk_bytes: int, policy: str = "value",
                 weights: PolicyWeights = PolicyWeights(), shm_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser()
        self.policy: ValuePolicy = make_policy(policy, weights)
        self.cpu = CpuTier(cpu_bytes, pin=torch.cuda.is_available(), choose_victims=self._victims)
        self.disk = DiskTier(self.root, disk_bytes, choose_victims=self._victims_or_none)
        self.chain = TierChain([self.cpu, self.disk])  # lookup order; a shared store would go last
        self.shm_dir = private_dir(Path(shm_dir) if shm_dir else default_shm_dir())  # staged KV: 0700, ours
        self.stats: dict[str, ChunkStats] = {}  # by stored key name (StoreKey.name)
        self.relevance: dict[str, float] = {}  # by chunk id: the memory layer's last recall score
        self.put_answered: dict[str, None] = {}  # chunk ids whose put was answered since start (bounded)
        self.counters = {k: 0 for k in ("puts", "gets", "cpu_hits", "disk_hits", "misses", "device_hits",
                                        "cpu_evictions", "cpu_refused", "disk_refused", "prefetched",
                                        "relevance_reports")}
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
        key = StoreKey.from_header({**header, "chunk_id": chunk_id, "model_id": model_id}, tensors)
        meta = {k: v for k, v in header.items() if k not in ("chunk_id", "namespace", "model_id", "checksum")}
        if "relevance" in message:
            self._set_relevance(chunk_id, float(message["relevance"]))
        stats = self.stats.get(key.name) or ChunkStats(key.name, tensors_nbytes(tensors))
        stats.relevance = self.relevance.get(chunk_id, stats.relevance)
        stats.last_used = time.time()
        self.stats[key.name] = stats  # the policy values the newcomer from here
        item = PutItem(key, namespace, tensors, meta)
        (on_disk,) = self.disk.put([item])
        if not on_disk:
            self.counters["disk_refused"] += 1
        # Answered: on disk (written, fsynced, renamed) or refused by the disk tier; either way the
        # write-through is over (a later eviction is the policy's choice, not a loss).
        self.put_answered.pop(chunk_id, None)
        self.put_answered[chunk_id] = None
        while len(self.put_answered) > PUT_ANSWERED_KEPT:
            self.put_answered.pop(next(iter(self.put_answered)))
        in_cpu = self._admit_cpu(item)
        if not on_disk and not in_cpu:
            self.stats.pop(key.name, None)
        return {"cpu": in_cpu, "disk": on_disk, "key": key.name}

    def _matching(self, message: dict, chunk_id: str, model_id: str) -> list[StoreKey]:
        tp_rank, tp_size, layout = _rank_fields(message)
        return [k for k in self.chain.find(chunk_id) if k.matches(chunk_id, model_id, tp_rank, tp_size, layout)]

    def op_get(self, message: dict) -> dict:
        chunk_id, namespace, model_id = protocol.require(message, chunk_id=str, namespace=str, model_id=str)
        self.counters["gets"] += 1
        found = None
        for key in self._matching(message, chunk_id, model_id):  # never across namespaces, models or ranks
            (found,) = self.chain.get([key], namespace)
            if found is not None:
                break
        if found is None:
            self.counters["misses"] += 1
            return {"found": False}
        (tensors, header), tier = found
        stats = self.stats.setdefault(key.name, ChunkStats(key.name, tensors_nbytes(tensors)))
        stats.hits += 1
        stats.last_used = time.time()
        self.counters[f"{tier}_hits"] += 1
        if tier != "cpu":
            self._admit_cpu(PutItem(key, namespace, tensors, _caller_meta(header)))
        path = self.shm_dir / f"get-{chunk_id[:24]}-{uuid.uuid4().hex}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in header.items()})
        os.replace(tmp, path)
        return {"found": True, "tier": tier, "path": str(path), "key": key.name}

    def op_contains(self, message: dict) -> dict:
        chunk_ids, model_id = protocol.require(message, chunk_ids=list, model_id=str)
        tiers, on_disk, answered = {}, [], []
        for cid in chunk_ids:
            keys = self._matching(message, str(cid), model_id)
            located = self.chain.locate(keys)
            tiers[cid] = "cpu" if "cpu" in located else next((t for t in located if t), None)
            if keys and any(self.disk.contains(keys)):
                on_disk.append(cid)
            if cid in self.put_answered:
                answered.append(cid)
        return {"tiers": tiers, "on_disk": on_disk, "put_answered": answered}

    def op_hit(self, message: dict) -> dict:
        (chunk_ids,) = protocol.require(message, chunk_ids=list)
        relevance = message.get("relevance")
        if relevance is not None and (not isinstance(relevance, list) or len(relevance) != len(chunk_ids)):
            raise protocol.ProtocolError("hit: relevance must be a list with one score per chunk id")
        now = time.time()
        for i, cid in enumerate(chunk_ids):
            if relevance is not None:
                self._set_relevance(cid, relevance[i])
            for key in self.chain.find(cid):
                stats = self.stats.get(key.name)
                if stats is not None:
                    stats.hits += 1
                    stats.last_used = now
                    self.counters["device_hits"] += 1
        return {}

    def op_relevance(self, message: dict) -> dict:
        (scores,) = protocol.require(message, scores=dict)
        return {"updated": sum(self._set_relevance(cid, score) for cid, score in scores.items())}

    def _set_relevance(self, chunk_id, score) -> int:
        """Record a recall score (0..1) for every stored key of the chunk, and for its future puts;
        returns how many stored keys it reached."""
        if not isinstance(chunk_id, str) or isinstance(score, bool) or not isinstance(score, (int, float)):
            raise protocol.ProtocolError("relevance: scores map chunk ids to numbers")
        score = min(max(float(score), 0.0), 1.0)
        self.counters["relevance_reports"] += 1
        self.relevance.pop(chunk_id, None)
        self.relevance[chunk_id] = score
        while len(self.relevance) > MAX_PENDING_RELEVANCE:
            self.relevance.pop(next(iter(self.relevance)))
        updated = 0
        for key in self.chain.find(chunk_id):
            if key.name in self.stats:
                self.stats[key.name].relevance = score
                updated += 1
        return updated

    def op_prefetch(self, message: dict) -> dict:
        chunk_ids, namespace, model_id = protocol.require(message, chunk_ids=list, namespace=str, model_id=str)
        loaded, missing = 0, []
        for cid in chunk_ids:
            keys = self._matching(message, cid, model_id)
            if any(self.cpu.contains(keys)):
                continue
            got = next(((k, g) for k in keys for g in self.disk.get([k], namespace) if g is not None), None)
            if got is None:
                missing.append(cid)
                continue
            key, (tensors, header) = got
            stats = self.stats.setdefault(key.name, ChunkStats(key.name, tensors_nbytes(tensors)))
            stats.last_used = time.time()
            if self._admit_cpu(PutItem(key, namespace, tensors, _caller_meta(header))):
                loaded += 1
        self.counters["prefetched"] += loaded
        return {"loaded": loaded, "missing": missing}

    def op_delete(self, message: dict) -> dict:
        if "namespace" in message:
            (namespace,) = protocol.require(message, namespace=str)
            names = [e.name for tier in self.chain.tiers for e in tier.entries() if e.namespace == namespace]
        else:
            (chunk_ids,) = protocol.require(message, chunk_ids=list)
            names = [k.name for cid in chunk_ids for k in self.chain.find(cid)]
        names = list(dict.fromkeys(names))
        for name in names:
            self.stats.pop(name, None)
        return {"deleted": self.chain.delete(names)}

    def op_list(self, message: dict) -> dict:
        namespace = message.get("namespace")
        rows: dict[str, dict] = {}
        for tier in self.chain.tiers:
            for e in tier.entries():
                row = rows.setdefault(e.name, {"chunk_id": e.key.chunk_id, "key": e.name, "namespace": e.namespace,
                                               "tp_rank": e.key.tp_rank, "tp_size": e.key.tp_size,
                                               "tiers": [], "nbytes": e.nbytes})
                row["tiers"].append(tier.name)
        out = [r for r in rows.values() if namespace is None or r["namespace"] == namespace]
        for r in out:
            s = self.stats.get(r["key"])
            r["hits"], r["relevance"] = (s.hits, s.relevance) if s else (0, 0.0)
        return {"chunks": out}

    def op_stats(self, message: dict) -> dict:
        quarantine = self.disk.quarantine_dir
        return {"policy": self.policy.name, "cpu_bytes": self.cpu.bytes_used(), "cpu_budget": self.cpu.budget_bytes,
                "cpu_chunks": len(self.cpu.entries()), "disk_bytes": self.disk.bytes_used(),
                "disk_budget": self.disk.budget_bytes, "disk_chunks": len(self.disk.entries()),
                "quarantined": len(list(quarantine.glob("*"))) if quarantine.exists() else 0, **self.counters}

    # ------------------------------------------------------------------ policy

    def _admit_cpu(self, item: PutItem) -> bool:
        before = len(self.cpu.entries())
        (admitted,) = self.cpu.put([item])
        if admitted:
            self.counters["cpu_evictions"] += before + 1 - len(self.cpu.entries())
        else:
            self.counters["cpu_refused"] += 1
        return admitted

    def _victims(self, entries: list[Entry], newcomer: str, need: int) -> list[str] | None:
        """The policy's pick among a tier's residents (demotion from CPU: the disk copy stays)."""
        now = time.time()
        residents = [self.stats.get(e.name) or ChunkStats(e.name, e.nbytes, e.mtime or now) for e in entries]
        return self.policy.victims(residents, self.stats.get(newcomer) or ChunkStats(newcomer, need), need)

    def _victims_or_none(self, entries: list[Entry], newcomer: str, need: int) -> list[str]:
        return self._victims(entries, newcomer, need) or []

    # ------------------------------------------------------------------ manifest

    def save_manifest(self) -> None:
        self._ops_since_manifest = 0
        data = {"version": protocol.VERSION, "policy": self.policy.name,
                "chunks": {name: s.to_json() for name, s in self.stats.items()}}
        tmp = self.root / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.root / MANIFEST)

    def _load_manifest(self) -> None:
        path = self.root / MANIFEST
        try:
            chunks = json.loads(path.read_text()).get("chunks", {}) if path.exists() else {}
        except (OSError, ValueError) as err:
            logger.warning("amem residency: ignoring unreadable manifest %s (%s)", path, err)
            chunks = {}
        for e in self.disk.entries():
            saved = chunks.get(e.name) or chunks.get(e.key.chunk_id) or {}  # by chunk id: an older manifest
            self.stats[e.name] = ChunkStats(e.name, e.nbytes, float(saved.get("last_used", e.mtime)),
                                            int(saved.get("hits", 0)), float(saved.get("relevance", 0.0)))
        logger.info("amem residency: %d chunks on disk (%d bytes) in %s", len(self.stats), self.disk.bytes_used(),
                    self.root)


def _caller_meta(header: dict) -> dict:
    return {k: v for k, v in header.items() if k not in ("chunk_id", "namespace", "model_id", "checksum")}


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
