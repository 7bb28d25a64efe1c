"""``usage.amem`` on the proxy's responses, and the SSE rewriting that puts it into streams.

The upstream's usage is kept as it is; ``amem`` adds the chunks used, the memory tokens injected,
the cached / cache-read / cache-written tokens as the upstream reported them, and the cost estimate
(amem_sgl.proxy.pricing). An upstream that reports no cache writes (a plain SGLang server, or OpenAI,
which has none) gets, on Anthropic requests that carry breakpoints, every uncached token counted as
written: an upper bound on the write premium, so the estimate never flatters the proxy.
"""

from __future__ import annotations

import dataclasses
import json
from typing import AsyncIterator, Callable

from amem_sgl.proxy import pricing
from amem_sgl.proxy.layout import Turn


@dataclasses.dataclass
class Report:
    """Everything the usage block needs besides the upstream's own numbers."""

    api: str
    model: str | None
    namespace: str
    session: str
    turn: Turn
    injected_tokens: int
    namespace_tokens: int
    ttl: str
    prices: dict

    def amem(self, usage: dict | None) -> dict:
        usage = usage or {}
        if self.api == "openai":
            total = int(usage.get("prompt_tokens") or 0)
            read = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            written, source = 0, "none (OpenAI bills no cache writes)"
        else:
            read = int(usage.get("cache_read_input_tokens") or 0)
            reported = usage.get("cache_creation_input_tokens")
            total = int(usage.get("input_tokens") or 0) + read + int(reported or 0)
            if reported is not None:
                written, source = int(reported), "upstream"
            elif self.turn.breakpoints_client + self.turn.breakpoints_added:
                written, source = total - read, "upper bound: every uncached token (upstream reports no writes)"
            else:
                written, source = 0, "none (no breakpoints)"
        t = self.turn
        out = {"namespace": self.namespace, "session": self.session, "chunks_used": len(t.chunk_ids),
               "chunk_ids": t.chunk_ids, "block_chunks": len(t.block_ids), "new_chunks": len(t.new_ids),
               "block_rebuilt": t.rebuilt, "drift": round(t.drift, 4), "replayed_turns": t.replayed,
               "tokens_injected": self.injected_tokens, "prompt_tokens": total, "cached_tokens": read,
               "cache_write_tokens": written, "cache_write_source": source,
               "cost": pricing.estimate(self.prices, self.api, self.model, total=total, read=read, written=written,
                                        ttl=self.ttl, injected=self.injected_tokens,
                                        namespace_tokens=self.namespace_tokens)}
        if self.api == "anthropic":
            out["breakpoints"] = {"client": t.breakpoints_client, "added": t.breakpoints_added}
        return out

    def add_to(self, data: dict) -> dict:
        if isinstance(data, dict) and isinstance(data.get("usage"), dict):
            data["usage"]["amem"] = self.amem(data["usage"])
        return data


def _events(buffer: bytearray) -> list[bytes]:
    """Complete SSE events (each with its blank-line terminator) taken off the front of ``buffer``."""
    out = []
    while True:
        cut = buffer.find(b"\n\n")
        if cut < 0:
            return out
        out.append(bytes(buffer[: cut + 2]))
        del buffer[: cut + 2]


def _rewrite(event: bytes, edit: Callable[[dict], bool]) -> bytes:
    """``event`` with its data JSON edited in place when ``edit`` says it changed it; else as it came."""
    lines = event.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if not payload.startswith(b"{"):
                return event
            try:
                data = json.loads(payload)
            except ValueError:
                return event
            if edit(data):
                lines[i] = b"data: " + json.dumps(data, separators=(",", ":")).encode()
                return b"\n".join(lines)
            return event
    return event


async def stream_with_usage(chunks: AsyncIterator[bytes], report: Report) -> AsyncIterator[bytes]:
    """The upstream's SSE stream, events passed on as they complete; the one carrying the final usage
    (OpenAI: the ``include_usage`` chunk; Anthropic: ``message_delta``, with ``message_start``'s input
    counts) gets ``usage.amem``."""
    buffer, start_usage = bytearray(), {}

    def edit(data: dict) -> bool:
        if report.api == "openai":
            if isinstance(data.get("usage"), dict):
                report.add_to(data)
                return True
            return False
        if data.get("type") == "message_start":
            start_usage.update((data.get("message") or {}).get("usage") or {})
        elif data.get("type") == "message_delta" and isinstance(data.get("usage"), dict):
            data["usage"]["amem"] = report.amem({**start_usage, **data["usage"]})
            return True
        return False

    async for chunk in chunks:
        buffer += chunk.replace(b"\r\n", b"\n")
        for event in _events(buffer):
            yield _rewrite(event, edit)
    if buffer:
        yield bytes(buffer)
