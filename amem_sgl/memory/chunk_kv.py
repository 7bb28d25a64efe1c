"""What the memory layer asks of its own server about chunk KV: compute new chunks' KV once (a
``register`` action to this server's ``/generate``), wait until their background write-through to
the residency tiers is over, and drop a namespace's device KV (a ``forget`` action).
:class:`MemoryError_` is the refusal the memory layer answers with (``status``: the HTTP status)."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import httpx

from amem_sgl.chunks.hints import build_kv_hints

logger = logging.getLogger("amem_sgl.memory.layer")


class MemoryError_(ValueError):
    """A request the memory layer refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def register(base_url: str, headers: dict, preamble: list[int], namespace: str,
                   todo: list[tuple[str, list[int]]]) -> None:
    """Compute each new chunk's KV once, behind ``preamble`` (``todo``: (chunk id, token ids))."""
    if not todo:
        return
    started, done = time.monotonic(), 0
    step = max(1, len(todo) // 10)
    semaphore = asyncio.Semaphore(int(os.environ.get("AMEM_SGL_REGISTER_CONCURRENCY", "8")))
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        async def one(tokens: list[int]) -> None:
            nonlocal done
            body = {"input_ids": preamble + tokens, "sampling_params": {"max_new_tokens": 0},
                    "kv_hints": build_kv_hints(namespace, [(len(preamble), len(preamble) + len(tokens))],
                                               register=True)}
            async with semaphore:
                reply = await client.post(f"{base_url}/generate", json=body)
            if reply.status_code != 200:
                raise MemoryError_(reply.status_code, f"registering a chunk failed: {reply.text[:300]}")
            done += 1
            if done % step == 0 or done == len(todo):
                logger.info("amem memory: namespace %s: %d/%d chunks prefilled (%.1f s)", namespace, done,
                            len(todo), time.monotonic() - started)

        await asyncio.gather(*(one(tokens) for _, tokens in todo))


def await_durable(residency, model_id: str, chunk_ids: list[str], wait_s: float) -> bool:
    """Wait (up to ``wait_s``, ``memory.kv_durable_wait_s``) until these chunks' write-through is
    over: their KV on the residency disk tier, or their put answered (a full disk tier may refuse
    it, or evict it again for a newer chunk). The scheduler writes it through in the background
    after the register request returned, and a crash in between would lose it. True when all are
    settled (or nothing is to be waited for: no residency service, no chunks, ``wait_s`` 0)."""
    if residency is None or not chunk_ids or wait_s <= 0:
        return True
    deadline, missing = time.monotonic() + wait_s, list(chunk_ids)
    while True:
        settled = residency.durable(missing, model_id)
        if settled is not None:
            missing = [cid for cid in missing if cid not in settled]
        if not missing:
            return True
        if time.monotonic() >= deadline:
            logger.warning("amem memory: %d of %d new chunks' KV not on the residency disk tier after %.1f s "
                           "(answered anyway; the first turn that recalls one computes it)",
                           len(missing), len(chunk_ids), wait_s)
            return False
        time.sleep(0.02)


async def device_forget(base_url: str, headers: dict, body: dict, attempts: int = 1) -> bool:
    """Send a forget action to this server's scheduler; False when it did not answer 200."""
    for attempt in range(attempts):
        try:
            async with httpx.AsyncClient(timeout=120, headers=headers) as client:
                reply = await client.post(f"{base_url}/generate", json=body)
            if reply.status_code == 200:
                return True
            logger.warning("amem memory: device forget failed: HTTP %d %s", reply.status_code, reply.text[:300])
        except httpx.HTTPError as err:
            logger.warning("amem memory: device forget failed (%s: %s)", type(err).__name__, err)
        if attempt + 1 < attempts:
            await asyncio.sleep(2.0 * (attempt + 1))
    return False
