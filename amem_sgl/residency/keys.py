"""What a stored chunk's KV is keyed by: the chunk, and everything that makes its bytes what they are.

A chunk id (amem_sgl.chunks.identity) names the tokens of a chunk in a namespace for a model; the
KV bytes also depend on the pool's dtype, its layout (layers, KV heads, head dim) and, with tensor
parallelism, on which shard of the heads a rank holds. :class:`StoreKey` is all of it, and its
:attr:`~StoreKey.name` is the storage key and file stem, ``<chunk_id>.tp<rank>of<size>.<hash>``
(hash over model id, dtype and layout), so two TP ranks, two dtypes or two models never write one
file. Files written before these fields existed (``<chunk_id>.safetensors``) are read as rank 0 of 1
with the layout their header or tensors give.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LAYOUT_FIELDS = ("dtype", "layers", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class StoreKey:
    chunk_id: str
    model_id: str
    dtype: str = ""
    layers: str = ""
    kv_heads: str = ""
    head_dim: str = ""
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if not self.chunk_id or "/" in self.chunk_id or self.chunk_id.startswith(".") or "\x00" in self.chunk_id:
            raise ValueError(f"invalid chunk id {self.chunk_id!r}")
        if not (0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"tp_rank must be in [0, tp_size={self.tp_size}), got {self.tp_rank}")

    @property
    def layout(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in LAYOUT_FIELDS}

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps([self.model_id, *self.layout.values()]).encode()).hexdigest()[:12]
        return f"{self.chunk_id}.tp{self.tp_rank}of{self.tp_size}.{digest}"

    def header(self) -> dict[str, str]:
        """The fields a stored file's metadata carries for this key."""
        return {"chunk_id": self.chunk_id, "model_id": self.model_id, **self.layout,
                "tp_rank": str(self.tp_rank), "tp_size": str(self.tp_size)}

    @classmethod
    def from_header(cls, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> "StoreKey":
        """The key a file's metadata names; layout fields it lacks are read off the ``k`` tensor
        ([layers, tokens, kv_heads, head_dim]); tp fields it lacks mean rank 0 of 1."""
        layout = {f: str(header.get(f, "")) for f in LAYOUT_FIELDS}
        k = (tensors or {}).get("k")
        if k is not None and k.dim() == 4:
            derived = {"dtype": str(k.dtype), "layers": str(k.shape[0]), "kv_heads": str(k.shape[2]),
                       "head_dim": str(k.shape[3])}
            layout = {f: layout[f] or derived[f] for f in LAYOUT_FIELDS}
        return cls(str(header["chunk_id"]), str(header["model_id"]), **layout,
                   tp_rank=int(header.get("tp_rank", 0)), tp_size=int(header.get("tp_size", 1)))

    def matches(self, chunk_id: str, model_id: str, tp_rank: int = 0, tp_size: int = 1,
                layout: dict | None = None) -> bool:
        """Whether this stored key serves a request for ``chunk_id`` on that rank (and, when given,
        that layout; ``None`` accepts any: the caller compares the layout itself)."""
        if (self.chunk_id, self.model_id, self.tp_rank, self.tp_size) != (chunk_id, model_id, tp_rank, tp_size):
            return False
        return layout is None or all(str(layout.get(f, getattr(self, f))) == getattr(self, f) for f in LAYOUT_FIELDS)


_WARNED: set[str] = set()


def private_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory other local users cannot read: created 0700 where it is missing
    (exactly 0700, whatever the umask, and so is each missing parent it creates); an existing one
    must belong to this user (a folder someone else made at a predictable path --
    /dev/shm/amem-<uid> -- is refused, never written into). An existing folder of this user's keeps
    its mode -- the user chose it (a group-shared folder) -- and one that others may read is said in
    a warning."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]  # top-down
    created = False
    for folder in missing:
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile (another process): checked below if it is ``path``
            continue
        os.chmod(folder, 0o700)
        created = folder == path
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {info.st_uid}, not this user ({os.getuid()}): "
                              "refusing to keep memory or KV there")
    if not created and stat.S_IMODE(info.st_mode) & 0o077 and str(path) not in _WARNED:
        _WARNED.add(str(path))
        logger.warning("%s already existed with mode %o: other local users may read the memory or KV kept "
                       "there; it is kept as it is (chmod 700 it to make it private)", path, stat.S_IMODE(info.st_mode))
    return path


def write_private_file(path: str | os.PathLike, data: bytes) -> None:
    """``data`` as ``path`` readable by its owner only (0600, whatever the umask), fsynced; the
    caller renames it into place (a new file: an existing one is an error)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
