"""The cache's side of the residency tiers: write-through, and fetches that never block scheduling.

* :meth:`ResidencyBridge.write_through` -- a new chunk's KV (every layer, copied now: the slots may be
  reused later) goes to the residency service in the client's background thread.
* :meth:`ResidencyBridge.lookup` -- a question from the scheduler's thread: is this chunk staged
  here (fetched, in host memory, ready to copy to the device)? If it was never asked for, a fetch
  starts in this bridge's own thread; the match that started it waits for it until a shared
  deadline (:data:`FIRST_FETCH_WAIT_S` after the match began, so a healthy service's chunks are
  used at once), and past it the answer is "not yet": the request computes the chunk like an
  uncached gap (or prefills it), and a later request finds it staged. The scheduler thread never
  waits longer than that on the service (a fetch slowed to seconds only delays the reuse).
* :meth:`ResidencyBridge.restore` -- at admission: a staged chunk is checked against this server's
  KV layout and TP rank, copied into fresh slots and registered as a chunk node.

Uses amem_sgl.residency.client.ResidencyClient (store/fetch/hit, keyed by TP rank and size).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time

import torch

from amem_sgl.cache.splice import pool_layers

logger = logging.getLogger(__name__)

FIRST_FETCH_WAIT_S = 0.2  # per match: how long a fetch started by it may take and still be used now
ABSENT_TTL_S = 5.0  # a chunk the tiers did not have is not asked for again for this long
MAX_STAGED = 64  # fetched chunks kept in host memory awaiting admission (oldest dropped first)


class ResidencyBridge:
    def __init__(self, client, support, stats) -> None:
        self.client = client
        self.support = support
        self.stats = stats
        self._lock = threading.Lock()
        self._staged: collections.OrderedDict[str, tuple[dict, dict]] = collections.OrderedDict()
        self._pending: set[str] = set()
        self._absent: dict[str, float] = {}
        self._fetcher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="amem-fetch")

    # ------------------------------------------------------------------ layout / keys

    def layout(self) -> dict[str, str]:
        pool = self.support.kv_pool
        k = pool.get_key_buffer(pool.start_layer)
        return {"layers": str(pool.layer_num), "kv_heads": str(k.shape[1]), "head_dim": str(k.shape[2]),
                "dtype": str(k.dtype)}

    def _rank(self) -> dict:
        return {"tp_rank": self.support.tp_rank, "tp_size": self.support.tp_size}

    # ------------------------------------------------------------------ write-through

    def write_through(self, cid: str, namespace: str, tokens, slots: torch.Tensor, canonical_start: int,
                      context: str = "") -> None:
        pool = self.support.kv_pool
        layers = pool_layers(pool)
        k = torch.stack([pool.get_key_buffer(layer)[slots] for layer in layers]).cpu()
        v = torch.stack([pool.get_value_buffer(layer)[slots] for layer in layers]).cpu()
        self.client.store(cid, namespace, self.support.model_id,
                          {"k": k, "v": v, "tokens": torch.tensor(list(tokens), dtype=torch.int64)},
                          {"canonical_start": canonical_start, "context": context, **self.layout()}, **self._rank())
        self.stats.chunks_stored += 1

    def hit(self, chunk_ids: list[str]) -> None:
        self.client.hit(chunk_ids)

    # ------------------------------------------------------------------ fetch (background)

    def lookup(self, cid: str, namespace: str, deadline: float | None = None) -> bool:
        """Whether ``cid`` is staged (restorable at admission now). A chunk not staged, not being
        fetched and not recently absent starts a background fetch, waited for until ``deadline``
        (``time.monotonic()``; None: not at all); a fetch already under way is not waited for."""
        with self._lock:
            if cid in self._staged:
                return True
            if cid in self._pending or time.monotonic() - self._absent.get(cid, -1e9) < ABSENT_TTL_S:
                return False
            self._pending.add(cid)
        self.stats.fetches_started += 1
        future = self._fetcher.submit(self._fetch, cid, namespace)
        if deadline is not None:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                pass
        with self._lock:
            return cid in self._staged

    def _fetch(self, cid: str, namespace: str) -> None:
        try:
            got = self.client.fetch(cid, namespace, self.support.model_id, layout=self.layout(), **self._rank())
        except Exception as err:  # noqa: BLE001 -- a failed fetch is a miss
            logger.warning("amem residency: fetch of %s failed (%s)", cid, err)
            got = None
        with self._lock:
            self._pending.discard(cid)
            if got is None:
                self._absent[cid] = time.monotonic()
                return
            tensors, meta, _tier = got
            self._staged[cid] = (tensors, meta)
            while len(self._staged) > MAX_STAGED:
                self._staged.popitem(last=False)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait for the fetches started so far (tests)."""
        self._fetcher.submit(lambda: None).result(timeout=timeout)

    # ------------------------------------------------------------------ restore (admission)

    def restore(self, index, alloc, namespace: str, cid: str, tokens):
        """Copy staged chunk ``cid`` into fresh slots (``alloc(n)``) and register it in ``index``;
        the chunk's node, or None (not staged, does not fit this server, or no slots)."""
        with self._lock:
            staged = self._staged.pop(cid, None)
        if staged is None:
            return None
        tensors, meta = staged
        layout = {**self.layout(), **{k: str(v) for k, v in self._rank().items()}}
        stored_tokens = tensors.get("tokens")
        mismatch = {k: meta.get(k) for k, v in layout.items() if k in meta and meta.get(k) != v}
        if (stored_tokens is None or stored_tokens.tolist() != list(tokens) or mismatch
                or any(k not in meta for k in self.layout())):
            logger.warning("amem: stored chunk %s does not fit this server (%s vs %s); recomputing", cid,
                           mismatch, layout)
            self.stats.restore_rejected += 1
            return None
        slots = alloc(len(tokens))
        if slots is None:
            with self._lock:  # keep it staged for a later admission
                self._staged[cid] = staged
            return None
        pool = self.support.kv_pool
        k, v = tensors["k"], tensors["v"]
        for i, layer in enumerate(pool_layers(pool)):
            k_buffer, v_buffer = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
            k_buffer[slots] = k[i].to(k_buffer.device)
            v_buffer[slots] = v[i].to(v_buffer.device)
        index.register(namespace, tokens, slots, int(meta["canonical_start"]), str(meta.get("context") or ""))
        self.stats.chunks_restored += 1
        self.stats.restored_tokens += len(tokens)
        return index.find(cid, tokens)

    def close(self) -> None:
        self._fetcher.shutdown(wait=False, cancel_futures=True)
