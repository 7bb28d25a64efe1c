"""Internal Python API over the native ``/generate`` endpoint: register chunks, compose prompts from
them, and generate with the chunk spans declared. The memory/OpenAI layer builds on this.

Chunks are tokenized **alone** (never re-tokenized inside a prompt, where separators would merge)
and placed in the user turn of the model's chat template, right after the preamble the template puts
before the user's content. A chunk's KV is computed once behind that same preamble (its canonical
context), so a prompt composed here starts with an ordinary prefix hit on the preamble and
continues through the spliced chunks::

    client = ChunkClient("http://127.0.0.1:30000")
    a = client.register("Maria, Alice's sister, lives in Denver.\\n", namespace="alice")
    b = client.register("Alice works at Boeing in Seattle.\\n", namespace="alice")
    prompt = client.layout.compose([b.token_ids, a.token_ids], "Where does Alice's sister live?")
    answer = client.generate(prompt, namespace="alice")   # answer.cached_tokens covers a and b
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Sequence

import requests

from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.chunks.compose import ComposedPrompt, Composer, place  # noqa: F401 -- ComposedPrompt re-exported
from amem_sgl.chunks.hints import build_kv_hints


class AmemRequestError(RuntimeError):
    """The server refused a request; ``status`` and the server's ``message`` are kept."""

    def __init__(self, status: int, message: str) -> None:
        # status 0: no HTTP answer at all (the server could not be reached).
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status, self.message = status, message


@dataclasses.dataclass(frozen=True)
class ChatLayout:
    """Token ids the chat template puts before and after the user's content."""

    preamble: tuple[int, ...]
    suffix: tuple[int, ...]
    tokenizer: object = dataclasses.field(compare=False, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer, system: str | None = None) -> "ChatLayout":
        preamble, suffix = Composer(tokenizer).user_layout(system)  # amem_sgl.chunks.compose
        return cls(preamble, suffix, tokenizer)

    def tokens(self, text: str) -> list[int]:
        return Composer(self.tokenizer).encode(text)

    def registration(self, chunk_ids: Sequence[int]) -> ComposedPrompt:
        """The prompt that computes a chunk's KV in its canonical context (the preamble)."""
        return place(self.preamble, [chunk_ids], ())

    def compose(self, chunks: Sequence[Sequence[int]], question: str) -> ComposedPrompt:
        return place(self.preamble, chunks, self.tokens(question) + list(self.suffix))


@dataclasses.dataclass(frozen=True)
class RegisteredChunk:
    namespace: str
    token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    output_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    latency_s: float
    # Time to the first streamed output (only when generated with ttft=True).
    ttft_s: float | None = None
    # The server's per-request report (meta_info["amem"]): spliced_tokens, recomputed_tokens, ...
    amem: dict = dataclasses.field(default_factory=dict)
    # The response's whole meta_info (logprobs when asked for with ``extra``).
    meta_info: dict = dataclasses.field(default_factory=dict, repr=False)
    # Its scheduler phases (queue_s, splice_s, blend_s, extend_s, ...; amem_timings).
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def computed_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class ChunkClient:
    def __init__(self, url: str, tokenizer=None, *, system: str | None = None, timeout: float = 600) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self._get("/get_model_info")["tokenizer_path"])
        self.layout = ChatLayout.from_tokenizer(tokenizer, system)

    def register(self, chunk: str | Sequence[int], namespace: str) -> RegisteredChunk:
        """Compute a chunk's KV once and keep it as a chunk node (no-op if already resident)."""
        ids = self.layout.tokens(chunk) if isinstance(chunk, str) else list(chunk)
        prompt = self.layout.registration(ids)
        self._post("/generate", {"input_ids": prompt.input_ids, "sampling_params": {"max_new_tokens": 0},
                                 "kv_hints": build_kv_hints(namespace, prompt.spans, register=True)})
        return RegisteredChunk(namespace, ids)

    def generate(self, prompt: ComposedPrompt, namespace: str | None = None, *, max_new_tokens: int = 32,
                 isolated: bool = False, blend: BlendPolicy | None = None, ttft: bool = False,
                 cache_salt: str | None = None, extra: dict | None = None) -> Generation:
        """Greedy generation. With ``namespace`` the chunk spans are declared (spliced where resident,
        blended by ``blend`` or the server's policy); ``isolated`` runs it under a fresh cache salt:
        a full prefill that shares no KV with anything; ``cache_salt`` keeps its ordinary prefix
        apart from other requests' (chunk nodes are still shared); ``ttft`` streams it and records
        the time to the first output; ``extra`` adds fields to the /generate body (e.g.
        ``return_logprob``)."""
        body = {"input_ids": prompt.input_ids,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0}, **(extra or {})}
        if namespace is not None and prompt.spans:
            body["kv_hints"] = build_kv_hints(namespace, prompt.spans, blend=blend)
        if isolated or cache_salt is not None:
            body["cache_salt"] = uuid.uuid4().hex if isolated else cache_salt
        t0 = time.perf_counter()
        first = None
        if ttft:
            out, first = self._stream("/generate", {**body, "stream": True})
        else:
            out = self._post("/generate", body)
        meta = out["meta_info"]
        return Generation(out["text"], list(out.get("output_ids") or []), meta["prompt_tokens"],
                          meta.get("cached_tokens", 0), time.perf_counter() - t0,
                          first - t0 if first is not None else None, amem_usage(meta), meta, amem_timings(meta))

    def _stream(self, path: str, body: dict) -> tuple[dict, float | None]:
        """POST a streaming request; the last event (with all output ids) and the first event's time."""
        first, last, ids = None, None, []
        with requests.post(self.url + path, json=body, timeout=self.timeout, stream=True) as reply:
            if reply.status_code != 200:
                raise AmemRequestError(reply.status_code, error_message(reply))
            for line in reply.iter_lines():
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                if first is None:
                    first = time.perf_counter()
                last = json.loads(line[5:])
                if "error" in last:
                    raise AmemRequestError(500, str(last["error"]))
                ids.extend(last.get("output_ids") or [])
        if last is None:
            raise AmemRequestError(502, "stream ended without output")
        total = last["meta_info"].get("completion_tokens", len(ids))
        if len(last.get("output_ids") or []) != total:  # incremental events: join them
            last = {**last, "output_ids": ids}
        return last, first

    def _post(self, path: str, body: dict) -> dict:
        reply = requests.post(self.url + path, json=body, timeout=self.timeout)
        if reply.status_code != 200:
            raise AmemRequestError(reply.status_code, error_message(reply))
        return reply.json()

    def _get(self, path: str) -> dict:
        reply = requests.get(self.url + path, timeout=self.timeout)
        if reply.status_code != 200:
            raise AmemRequestError(reply.status_code, error_message(reply))
        return reply.json()


def amem_usage(meta_info: dict) -> dict:
    """What the cache did for a /generate request (its ``meta_info["amem"]`` without the phase
    timings, :func:`amem_timings`; {} when nothing)."""
    usage = meta_info.get("amem") or [{}]
    usage = usage[0] if isinstance(usage, list) else usage
    return {k: v for k, v in usage.items() if k != "timings"}


def amem_timings(meta_info: dict) -> dict:
    """The scheduler's phases of a spliced request (amem_sgl.cache.usage; seconds, plus the
    ``recv_at``/``done_at`` clock stamps); {} when nothing was spliced."""
    usage = meta_info.get("amem") or [{}]
    usage = usage[0] if isinstance(usage, list) else usage
    return dict(usage.get("timings") or {})


def error_message(reply: requests.Response) -> str:
    """The server's error message: OpenAI routes put it at the top level, /generate under "error"."""
    try:
        data = reply.json()
    except ValueError:
        return reply.text
    if not isinstance(data, dict):
        return reply.text
    nested = data.get("error") if isinstance(data.get("error"), dict) else {}
    detail = data.get("detail")
    if isinstance(detail, list):  # FastAPI validation errors: where and what
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}"
                           for d in detail if isinstance(d, dict))
    return data.get("message") or nested.get("message") or detail or reply.text
