"""The scheduler's side of the residency service: requests with deadlines, stores in the background.

* :meth:`ResidencyClient.request` -- one op, answered within ``timeout_s`` or ``None`` (the service
  is down or slow: the caller treats it as a miss, serving goes on). A REQ socket that timed out is
  discarded and a fresh one connects on the next call (a restarted service is picked up).
* :meth:`ResidencyClient.store` -- hands a chunk's KV to a background thread that writes it as a
  safetensors file into the shared-memory folder and sends ``put``; the scheduler never waits.
* :meth:`ResidencyClient.fetch` -- ``get`` + reading the file the service wrote (then deleted).
* :meth:`ResidencyClient.contains` -- which tier holds each of a batch of chunks (no transfer).
* :meth:`ResidencyClient.relevance` / :meth:`ResidencyClient.hit` -- the memory layer's recall
  scores and the device's hits, for the value policy (fire and forget).

Chunk KV is stored per TP rank: ``store``/``fetch``/``contains`` take ``tp_rank`` and ``tp_size``
(default rank 0 of 1, a single-GPU or CPU server); ``fetch`` optionally a ``layout`` (dtype,
layers, kv_heads, head_dim) to match, else any layout stored for that rank (the caller compares).

Every thread gets its own socket (ZeroMQ sockets are not thread-safe).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import uuid
from pathlib import Path

import torch
import zmq
from safetensors import safe_open
from safetensors.torch import save_file

from amem_sgl.residency import protocol
from amem_sgl.residency.keys import private_dir

logger = logging.getLogger(__name__)


class ResidencyClient:
    def __init__(self, address: str, shm_dir: str | os.PathLike, *, timeout_s: float = 2.0) -> None:
        self.address, self.timeout_s = address, timeout_s
        self.shm_dir = private_dir(shm_dir)  # staged KV: 0700, ours
        self._local = threading.local()
        self._context = zmq.Context.instance()
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="amem-residency")
        self.failures = 0

    def _socket(self):
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.address)
            self._local.socket = sock
        return sock

    def _reset(self) -> None:
        sock = getattr(self._local, "socket", None)
        if sock is not None:
            sock.close(linger=0)
        self._local.socket = None

    def request(self, op: str, **fields) -> dict | None:
        """The service's reply, or None when it did not answer in time (or answered an error)."""
        sock = self._socket()
        try:
            sock.send(protocol.encode({"op": op, **fields}))
            if not sock.poll(int(self.timeout_s * 1000), zmq.POLLIN):
                raise TimeoutError(f"no reply to {op!r} in {self.timeout_s}s")
            reply = protocol.decode(sock.recv())
        except Exception as err:  # noqa: BLE001 -- the service may be down; the caller sees a miss
            self.failures += 1
            self._reset()
            logger.warning("amem residency: %s failed (%s); treated as a miss", op, err)
            return None
        if not reply.get("ok"):
            logger.warning("amem residency: %s refused: %s", op, reply.get("error"))
            return None
        return reply

    def store(self, chunk_id: str, namespace: str, model_id: str, tensors: dict[str, torch.Tensor],
              meta: dict[str, str], relevance: float | None = None, *, tp_rank: int = 0,
              tp_size: int = 1) -> concurrent.futures.Future:
        """Write-through in the background; the future gives the put's reply (None on failure).
        ``meta``'s dtype/layers/kv_heads/head_dim (else the ``k`` tensor's) and the TP rank/size
        are the stored key: another rank storing the same chunk id keeps its own copy."""
        return self._writer.submit(self._store, chunk_id, namespace, model_id, tensors, meta, relevance,
                                   tp_rank, tp_size)

    def _store(self, chunk_id, namespace, model_id, tensors, meta, relevance, tp_rank=0, tp_size=1) -> dict | None:
        path = self.shm_dir / f"put-{chunk_id[:24]}-{uuid.uuid4().hex}.safetensors"
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                      metadata={**{k: str(v) for k, v in meta.items()}, "chunk_id": chunk_id,
                                "namespace": namespace, "model_id": model_id, "tp_rank": str(int(tp_rank)),
                                "tp_size": str(int(tp_size))})
        except OSError as err:
            logger.warning("amem residency: cannot stage chunk %s (%s)", chunk_id, err)
            return None
        fields = {"chunk_id": chunk_id, "namespace": namespace, "model_id": model_id, "path": str(path)}
        if relevance is not None:
            fields["relevance"] = float(relevance)
        reply = self.request("put", **fields)
        if reply is None:
            path.unlink(missing_ok=True)  # not taken: do not leak shared memory
        return reply

    def fetch(self, chunk_id: str, namespace: str, model_id: str, *, tp_rank: int = 0, tp_size: int = 1,
              layout: dict | None = None) -> tuple[dict[str, torch.Tensor], dict, str] | None:
        """This rank's copy of the chunk: tensors, metadata and the tier it came from; None if not
        stored anywhere (for this rank, and this layout when one is given)."""
        reply = self.request("get", chunk_id=chunk_id, namespace=namespace, model_id=model_id,
                             **_rank(tp_rank, tp_size, layout))
        if reply is None or not reply.get("found"):
            return None
        path = Path(reply["path"])
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as err:  # noqa: BLE001 -- an unreadable transfer is a miss
            logger.warning("amem residency: unreadable transfer %s (%s)", path, err)
            return None
        finally:
            path.unlink(missing_ok=True)
        return tensors, meta, reply.get("tier", "?")

    def contains(self, chunk_ids: list[str], model_id: str, *, tp_rank: int = 0, tp_size: int = 1,
                 layout: dict | None = None) -> dict[str, str | None] | None:
        """{chunk_id: "cpu" | "disk" | None} for this rank, in one round trip; None if the service
        did not answer in time."""
        reply = self.request("contains", chunk_ids=list(chunk_ids), model_id=model_id,
                             **_rank(tp_rank, tp_size, layout))
        return None if reply is None else reply["tiers"]

    def durable(self, chunk_ids: list[str], model_id: str, *, tp_rank: int = 0, tp_size: int = 1) -> set[str] | None:
        """Of ``chunk_ids``, those whose write-through is over on this rank: on the disk tier (a
        crash cannot take them back), or their put answered (stored then, or refused by a full disk
        tier: they will not get there); None if the service did not answer in time."""
        reply = self.request("contains", chunk_ids=list(chunk_ids), model_id=model_id,
                             **_rank(tp_rank, tp_size, None))
        return None if reply is None else set(reply.get("on_disk", ())) | set(reply.get("put_answered", ()))

    def hit(self, chunk_ids: list[str], relevance: list[float] | None = None) -> None:
        """Report device hits (fire and forget, in the background thread); ``relevance``, one
        recall score per chunk id, also records the scores (see :meth:`relevance`)."""
        if chunk_ids:
            fields = {"chunk_ids": list(chunk_ids)}
            if relevance is not None:
                fields["relevance"] = [float(r) for r in relevance]
            self._writer.submit(self.request, "hit", **fields)

    def relevance(self, scores: dict[str, float]) -> concurrent.futures.Future | None:
        """Report recall scores {chunk_id: 0..1} for the value policy's relevance term (fire and
        forget; the future gives the reply). Scores for chunks not stored yet apply when they are."""
        if not scores:
            return None
        return self._writer.submit(self.request, "relevance", scores={str(k): float(v) for k, v in scores.items()})

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for the background stores queued so far."""
        self._writer.submit(lambda: None).result(timeout=timeout)

    def close(self) -> None:
        self._writer.shutdown(wait=False, cancel_futures=True)
        self._reset()


def _rank(tp_rank: int, tp_size: int, layout: dict | None) -> dict:
    fields = {"tp_rank": int(tp_rank), "tp_size": int(tp_size)}
    if layout is not None:
        fields["layout"] = {k: str(v) for k, v in layout.items()}
    return fields
