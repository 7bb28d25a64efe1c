"""Residency tiers behind one interface, and the ordered chain the service looks chunks up in.

A :class:`Tier` holds chunk KV under :class:`~amem_sgl.residency.keys.StoreKey` s, batched:
``contains(keys)``, ``get(keys, namespace)``, ``put(items)`` (each item admitted or refused by the
tier's budget and its ``choose_victims`` callback: the residency policy), ``delete(names)``,
``find(chunk_id)`` (the stored keys of a chunk: one per TP rank / dtype / layout), ``entries()``.

* :class:`CpuTier`  -- tensors in the service's memory (pinned when CUDA is present);
* :class:`DiskTier` -- the durable safetensors store (amem_sgl.residency.disk_store);
* :class:`TierChain` -- tiers in lookup order (CPU, then disk; a shared store would be appended
  last): ``locate`` / ``get`` answer from the first tier holding a key.

A tier is told nothing about the others; promotion (disk -> CPU on use) is the service's decision.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import torch

from amem_sgl.residency.disk_store import DiskStore
from amem_sgl.residency.keys import StoreKey

Item = tuple[dict[str, torch.Tensor], dict]  # tensors, header (namespace, key fields, caller's metadata)
# (resident entries, the newcomer's key name, bytes needed) -> names to evict, or None: refuse the newcomer
Victims = Callable[[list["Entry"], str, int], "list[str] | None"]


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclasses.dataclass(frozen=True)
class Entry:
    key: StoreKey
    namespace: str
    nbytes: int
    mtime: float = 0.0

    @property
    def name(self) -> str:
        return self.key.name


@dataclasses.dataclass(frozen=True)
class PutItem:
    key: StoreKey
    namespace: str
    tensors: dict[str, torch.Tensor]
    meta: dict  # the caller's metadata (canonical start, ...), strings


class Tier(Protocol):
    name: str
    budget_bytes: int

    def contains(self, keys: Sequence[StoreKey]) -> list[bool]: ...
    def get(self, keys: Sequence[StoreKey], namespace: str) -> list[Item | None]: ...
    def put(self, items: Sequence[PutItem]) -> list[bool]: ...
    def delete(self, names: Sequence[str]) -> int: ...
    def find(self, chunk_id: str) -> list[StoreKey]: ...
    def entries(self) -> list[Entry]: ...
    def bytes_used(self) -> int: ...


def _refuse_when_full(entries: list[Entry], newcomer: str, need: int) -> list[str] | None:
    return None


class CpuTier:
    name = "cpu"

    def __init__(self, budget_bytes: int, *, pin: bool, choose_victims: Victims = _refuse_when_full) -> None:
        self.budget_bytes, self.pin, self.choose_victims = budget_bytes, pin, choose_victims
        self._items: dict[str, tuple[Entry, Item]] = {}

    def contains(self, keys):
        return [k.name in self._items for k in keys]

    def get(self, keys, namespace):
        out = []
        for k in keys:
            got = self._items.get(k.name)
            out.append(got[1] if got is not None and got[0].namespace == namespace else None)
        return out

    def put(self, items):
        return [self._put_one(item) for item in items]

    def _put_one(self, item: PutItem) -> bool:
        if item.key.name in self._items:
            return True
        nbytes = tensors_nbytes(item.tensors)
        if nbytes > self.budget_bytes:
            return False
        need = self.bytes_used() + nbytes - self.budget_bytes
        victims = self.choose_victims(self.entries(), item.key.name, need) if need > 0 else []
        if victims is None:
            return False
        self.delete(victims)
        if self.bytes_used() + nbytes > self.budget_bytes:
            return False
        tensors = {n: t.pin_memory() for n, t in item.tensors.items()} if self.pin else item.tensors
        header = {**item.meta, **item.key.header(), "namespace": item.namespace}
        self._items[item.key.name] = (Entry(item.key, item.namespace, nbytes), (tensors, header))
        return True

    def delete(self, names):
        return sum(self._items.pop(n, None) is not None for n in names)

    def find(self, chunk_id):
        return [e.key for e, _ in self._items.values() if e.key.chunk_id == chunk_id]

    def entries(self):
        return [e for e, _ in self._items.values()]

    def bytes_used(self):
        return sum(e.nbytes for e, _ in self._items.values())


class DiskTier:
    name = "disk"

    def __init__(self, root, budget_bytes: int, *, choose_victims: Victims | None = None, name: str = "disk") -> None:
        self.name, self.choose_victims = name, choose_victims
        self._newcomer = ""
        self.store = DiskStore(root, budget_bytes, self._victims if choose_victims else None)

    @property
    def budget_bytes(self) -> int:
        return self.store.budget_bytes

    @property
    def quarantine_dir(self):
        return self.store.quarantine_dir

    def _victims(self, stored, need):
        entries = [Entry(s.key, s.namespace, s.nbytes, s.mtime) for s in stored]
        return self.choose_victims(entries, self._newcomer, need) or []

    def contains(self, keys):
        return [k.name in self.store for k in keys]

    def get(self, keys, namespace):
        return [self.store.get(k, namespace) for k in keys]

    def put(self, items):
        done = []
        for item in items:
            self._newcomer = item.key.name
            try:
                done.append(self.store.put(item.key, item.namespace, item.tensors, item.meta))
            finally:
                self._newcomer = ""
        return done

    def delete(self, names):
        return sum(self.store.delete(n) for n in names)

    def find(self, chunk_id):
        return self.store.find(chunk_id)

    def entries(self):
        return [Entry(s.key, s.namespace, s.nbytes, s.mtime) for s in self.store.entries()]

    def bytes_used(self):
        return self.store.bytes_used()


class TierChain:
    """Tiers in lookup order; the first holding a key answers for it."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        self.tiers = list(tiers)
        self.by_name = {t.name: t for t in self.tiers}

    def locate(self, keys: Sequence[StoreKey]) -> list[str | None]:
        """The first tier holding each key (None: no tier)."""
        found: list[str | None] = [None] * len(keys)
        for tier in self.tiers:
            missing = [i for i, f in enumerate(found) if f is None]
            if not missing:
                break
            for i, has in zip(missing, tier.contains([keys[i] for i in missing])):
                if has:
                    found[i] = tier.name
        return found

    def get(self, keys: Sequence[StoreKey], namespace: str) -> list[tuple[Item, str] | None]:
        """Each key's item and the tier it came from, walking the chain until every key is found."""
        out: list[tuple[Item, str] | None] = [None] * len(keys)
        for tier in self.tiers:
            missing = [i for i, o in enumerate(out) if o is None]
            if not missing:
                break
            for i, item in zip(missing, tier.get([keys[i] for i in missing], namespace)):
                if item is not None:
                    out[i] = (item, tier.name)
        return out

    def find(self, chunk_id: str) -> list[StoreKey]:
        """Every stored key of a chunk in any tier, in chain order, without repeats."""
        seen: dict[str, StoreKey] = {}
        for tier in self.tiers:
            for key in tier.find(chunk_id):
                seen.setdefault(key.name, key)
        return list(seen.values())

    def delete(self, names: Sequence[str]) -> int:
        """Keys removed from at least one tier."""
        gone = set()
        for tier in self.tiers:
            for name in names:
                if tier.delete([name]):
                    gone.add(name)
        return len(gone)
