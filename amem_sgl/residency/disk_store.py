"""The disk tier: chunk KV as safetensors files, crash-safe, checksummed, bounded in bytes.

One file per chunk, ``<chunk_id>.safetensors`` (the id already hashes namespace and model id),
with the tensors (e.g. ``k``/``v`` [layers, tokens, heads, dim]) and string metadata: namespace,
model id, a SHA-256 over the tensor bytes, and whatever the caller adds (token count, canonical
start). The files are the source of truth; the in-memory index is rebuilt from them at start.

* Writes: a temporary file in the same folder, fsync, atomic rename, fsync of the folder. A crash
  leaves either the old state or the complete new file; stale temporaries are removed at start.
* Reads: the checksum, namespace and model id are verified; a corrupt, truncated or unreadable file
  is moved to ``quarantine/`` with a log line and never served.
* Budget: ``put`` never takes the folder over ``budget_bytes``; it first evicts what
  ``choose_victims`` picks (the residency policy's job; oldest-first by default) and refuses a file
  that cannot fit at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"


@dataclasses.dataclass(frozen=True)
class StoredChunk:
    chunk_id: str
    namespace: str
    model_id: str
    nbytes: int
    mtime: float
    meta: dict


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DiskStore:
    def __init__(self, root: str | os.PathLike, budget_bytes: int,
                 choose_victims: Callable[[list[StoredChunk], int], Iterable[str]] | None = None) -> None:
        self.root = Path(root)
        self.quarantine_dir = self.root / "quarantine"
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self.choose_victims = choose_victims or _oldest_first
        self._index: dict[str, StoredChunk] = {}
        self._scan()

    # ------------------------------------------------------------------ queries

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._index

    def entries(self) -> list[StoredChunk]:
        return list(self._index.values())

    def bytes_used(self) -> int:
        return sum(e.nbytes for e in self._index.values())

    # ------------------------------------------------------------------ writes

    def put(self, chunk_id: str, namespace: str, model_id: str, tensors: dict[str, torch.Tensor],
            meta: dict[str, str] | None = None) -> bool:
        """Store a chunk durably; returns False (storing nothing) if it cannot fit in the budget."""
        extra = {k: str(v) for k, v in (meta or {}).items()}
        header = {**extra, "chunk_id": chunk_id, "namespace": namespace, "model_id": model_id,
                  "checksum": tensors_checksum(tensors)}
        data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=header)
        if len(data) > self.budget_bytes:
            logger.warning("amem disk store: chunk %s (%d bytes) exceeds the whole budget (%d)",
                           chunk_id, len(data), self.budget_bytes)
            return False
        self.delete(chunk_id)
        need = self.bytes_used() + len(data) - self.budget_bytes
        if need > 0:
            for victim in self.choose_victims(self.entries(), need):
                self.delete(victim)
            if self.bytes_used() + len(data) > self.budget_bytes:
                return False
        path = self._path(chunk_id)
        tmp = self.root / f"{TMP_PREFIX}{chunk_id}-{os.getpid()}-{time.monotonic_ns()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._fsync_dir()
        self._index[chunk_id] = StoredChunk(chunk_id, namespace, model_id, len(data), path.stat().st_mtime, extra)
        return True

    def delete(self, chunk_id: str) -> bool:
        entry = self._index.pop(chunk_id, None)
        if entry is None:
            return False
        self._path(chunk_id).unlink(missing_ok=True)
        self._fsync_dir()
        return True

    # ------------------------------------------------------------------ reads

    def get(self, chunk_id: str, namespace: str, model_id: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The chunk's tensors and metadata, verified; None if absent, foreign or corrupt."""
        entry = self._index.get(chunk_id)
        if entry is None:
            return None
        if (entry.namespace, entry.model_id) != (namespace, model_id):
            logger.warning("amem disk store: chunk %s belongs to namespace %r / model %r, refused for "
                           "%r / %r", chunk_id, entry.namespace, entry.model_id, namespace, model_id)
            return None
        path = self._path(chunk_id)
        try:
            data = path.read_bytes()
            tensors = st_load(data)
            header = _header(data)
            if header.get("checksum") != tensors_checksum(tensors):
                raise ValueError("checksum mismatch")
            if (header.get("chunk_id"), header.get("namespace"), header.get("model_id")) != (
                    chunk_id, namespace, model_id):
                raise ValueError("metadata does not match the file name")
        except Exception as err:  # corrupt, truncated, unreadable: never served
            self._quarantine(path, err)
            self._index.pop(chunk_id, None)
            return None
        return tensors, header

    # ------------------------------------------------------------------ start-up

    def _scan(self) -> None:
        for tmp in self.root.glob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)  # an interrupted write: never acknowledged
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            try:
                header = _header_of_file(path)
                chunk_id = header["chunk_id"]
                if path.name != chunk_id + SUFFIX:
                    raise ValueError(f"file name does not match chunk id {chunk_id}")
            except Exception as err:
                self._quarantine(path, err)
                continue
            meta = {k: v for k, v in header.items() if k not in ("chunk_id", "namespace", "model_id", "checksum")}
            self._index[chunk_id] = StoredChunk(chunk_id, header["namespace"], header["model_id"],
                                                path.stat().st_size, path.stat().st_mtime, meta)

    def _quarantine(self, path: Path, err: Exception) -> None:
        self.quarantine_dir.mkdir(exist_ok=True)
        target = self.quarantine_dir / f"{path.name}.{time.time_ns()}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        logger.error("amem disk store: quarantined %s (%s: %s) -> %s", path.name, type(err).__name__, err, target)

    def _path(self, chunk_id: str) -> Path:
        if not chunk_id or "/" in chunk_id or chunk_id.startswith("."):
            raise ValueError(f"invalid chunk id {chunk_id!r}")
        return self.root / f"{chunk_id}{SUFFIX}"

    def _fsync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _oldest_first(entries: list[StoredChunk], need: int) -> list[str]:
    victims, freed = [], 0
    for entry in sorted(entries, key=lambda e: e.mtime):
        if freed >= need:
            break
        victims.append(entry.chunk_id)
        freed += entry.nbytes
    return victims


def _header(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (its first 8 bytes give the JSON header length)."""
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or size > len(data) - 8:
        raise ValueError("truncated safetensors header")
    return json.loads(data[8: 8 + size]).get("__metadata__", {})


def _header_of_file(path: Path) -> dict:
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = int.from_bytes(head, "little")
        if len(head) < 8 or size <= 0 or size > path.stat().st_size - 8:
            raise ValueError("truncated safetensors header")
        return json.loads(fh.read(size)).get("__metadata__", {})
