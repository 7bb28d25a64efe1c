"""The disk tier: chunk KV as safetensors files, crash-safe, checksummed, bounded in bytes.

One file per stored key (amem_sgl.residency.keys: chunk id + model id, dtype, KV layout, TP
rank/size), ``<chunk_id>.tp<r>of<n>.<hash>.safetensors``, with the tensors (e.g. ``k``/``v``
[layers, tokens, heads, dim]) and string metadata: the key's fields, namespace, a SHA-256 over the
tensor bytes, and whatever the caller adds (token count, canonical start). The files are the
source of truth; the in-memory index is rebuilt from them at start. A file from before keys carried
rank and layout (``<chunk_id>.safetensors``) is renamed to its key's name at start (rank 0 of 1).

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

from amem_sgl.residency.keys import LAYOUT_FIELDS, StoreKey, private_dir, write_private_file

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"


KEY_FIELDS = ("chunk_id", "model_id", "namespace", "checksum", "tp_rank", "tp_size", *LAYOUT_FIELDS)


@dataclasses.dataclass(frozen=True)
class StoredChunk:
    key: StoreKey
    namespace: str
    nbytes: int
    mtime: float
    meta: dict

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def chunk_id(self) -> str:
        return self.key.chunk_id

    @property
    def model_id(self) -> str:
        return self.key.model_id


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
        private_dir(self.root)  # chunk KV and tokens: 0700, ours
        self.budget_bytes = budget_bytes
        self.choose_victims = choose_victims or _oldest_first
        self._index: dict[str, StoredChunk] = {}
        self._scan()

    # ------------------------------------------------------------------ queries

    def __contains__(self, name: str) -> bool:
        """Whether a stored key of this name (:attr:`StoreKey.name`) is here."""
        return name in self._index

    def find(self, chunk_id: str) -> list[StoreKey]:
        """Every stored key of ``chunk_id`` (one per rank / dtype / layout it was stored for)."""
        return [e.key for e in self._index.values() if e.key.chunk_id == chunk_id]

    def entries(self) -> list[StoredChunk]:
        return list(self._index.values())

    def bytes_used(self) -> int:
        return sum(e.nbytes for e in self._index.values())

    # ------------------------------------------------------------------ writes

    def put(self, key: StoreKey, namespace: str, tensors: dict[str, torch.Tensor],
            meta: dict[str, str] | None = None) -> bool:
        """Store a chunk durably; returns False (storing nothing) if it cannot fit in the budget."""
        extra = {k: str(v) for k, v in (meta or {}).items() if k not in KEY_FIELDS}
        header = {**extra, **key.header(), "namespace": namespace, "checksum": tensors_checksum(tensors)}
        data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=header)
        if len(data) > self.budget_bytes:
            logger.warning("amem disk store: chunk %s (%d bytes) exceeds the whole budget (%d)",
                           key.name, len(data), self.budget_bytes)
            return False
        self.delete(key.name)
        need = self.bytes_used() + len(data) - self.budget_bytes
        if need > 0:
            for victim in self.choose_victims(self.entries(), need):
                self.delete(victim)
            if self.bytes_used() + len(data) > self.budget_bytes:
                return False
        path = self._write(key.name, data)
        self._index[key.name] = StoredChunk(key, namespace, len(data), path.stat().st_mtime, extra)
        return True

    def delete(self, name: str) -> bool:
        """Delete the stored key ``name``; see :meth:`delete_chunk` for every key of a chunk."""
        entry = self._index.pop(name, None)
        if entry is None:
            return False
        self._path(name).unlink(missing_ok=True)
        self._fsync_dir()
        return True

    def delete_chunk(self, chunk_id: str) -> int:
        return sum(self.delete(key.name) for key in self.find(chunk_id))

    # ------------------------------------------------------------------ reads

    def get(self, key: StoreKey, namespace: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The stored key's tensors and metadata, verified; None if absent, foreign or corrupt."""
        entry = self._index.get(key.name)
        if entry is None:
            return None
        if (entry.namespace, entry.key) != (namespace, key):
            logger.warning("amem disk store: %s belongs to namespace %r / model %r, refused for %r / %r",
                           key.name, entry.namespace, entry.model_id, namespace, key.model_id)
            return None
        path = self._path(key.name)
        try:
            data = path.read_bytes()
            tensors = st_load(data)
            header = _header(data)
            if header.get("checksum") != tensors_checksum(tensors):
                raise ValueError("checksum mismatch")
            if (header.get("namespace"), StoreKey.from_header(header)) != (namespace, key):
                raise ValueError("metadata does not match the file name")
        except Exception as err:  # corrupt, truncated, unreadable: never served
            self._quarantine(path, err)
            self._index.pop(key.name, None)
            return None
        return tensors, header

    # ------------------------------------------------------------------ start-up

    def _scan(self) -> None:
        for tmp in self.root.glob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)  # an interrupted write: never acknowledged
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            try:
                header = _header_of_file(path)
                if path.name == f"{header['chunk_id']}{SUFFIX}":  # written before keys had rank and layout
                    path = self._migrate(path, StoreKey.from_header(header, st_load(path.read_bytes())))
                    header = _header_of_file(path)
                key = StoreKey.from_header(header)
                if path.name != key.name + SUFFIX:
                    raise ValueError(f"file name does not match its key {key.name}")
            except Exception as err:
                self._quarantine(path, err)
                continue
            meta = {k: v for k, v in header.items() if k not in KEY_FIELDS}
            self._index[key.name] = StoredChunk(key, header["namespace"], path.stat().st_size,
                                                path.stat().st_mtime, meta)

    def _migrate(self, path: Path, key: StoreKey) -> Path:
        """Rewrite a file from before rank/layout keys under its key's name, its header completed
        with the key's fields (rank 0 of 1; layout from the header or the tensors). Tensor bytes and
        checksum are unchanged; written like any put (temporary, fsync, rename), then the old name
        is removed, so a crash in between leaves one of the two complete."""
        data = path.read_bytes()
        header = {**_header(data), **key.header()}
        target = self._write(key.name, st_save(st_load(data), metadata=header))
        path.unlink()
        self._fsync_dir()
        logger.info("amem disk store: %s -> %s (key with TP rank and layout)", path.name, target.name)
        return target

    def _quarantine(self, path: Path, err: Exception) -> None:
        private_dir(self.quarantine_dir)
        target = self.quarantine_dir / f"{path.name}.{time.time_ns()}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        logger.error("amem disk store: quarantined %s (%s: %s) -> %s", path.name, type(err).__name__, err, target)

    def _write(self, name: str, data: bytes) -> Path:
        """``data`` as the file of stored key ``name``: a temporary in the same folder, fsync, atomic
        rename, fsync of the folder."""
        path = self._path(name)
        tmp = self.root / f"{TMP_PREFIX}{name}-{os.getpid()}-{time.monotonic_ns()}"
        write_private_file(tmp, data)  # chunk KV: 0600, like its folder
        os.replace(tmp, path)
        self._fsync_dir()
        return path

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid stored key {name!r}")
        return self.root / f"{name}{SUFFIX}"

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
        victims.append(entry.name)
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

