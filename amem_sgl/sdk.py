"""Python SDK for a running amem server.

    from amem_sgl import Amem

    amem = Amem("http://127.0.0.1:30000")
    amem.remember("alice", ["Alice's sister Maria lives in Denver.", "Alice works at Boeing."])
    with amem.start_session("alice") as session:
        print(session.ask("Where does my sister live?").text)
        answer = session.ask("Where do I work?")
        print(answer.text, answer.reused_kv)   # the second turn reuses the session's blended KV

Every call raises :class:`AmemError` (``status``, ``message`` from the server) on a refusal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import requests

from amem_sgl.chunks.client import AmemRequestError, error_message


# The server refused a request: ``status`` and the server's ``message`` (shared with ChunkClient).
AmemError = AmemRequestError


@dataclasses.dataclass(frozen=True)
class Chunk:
    id: str
    namespace: str
    text: str
    tokens: int
    metadata: dict
    score: float | None = None


@dataclasses.dataclass(frozen=True)
class Remembered:
    namespace: str
    ids: list[str]
    new: int


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    namespace: str | None
    chunk_ids: list[str]  # the memory chunks the turn used
    prompt_tokens: int
    cached_tokens: int
    usage: dict  # the response's usage.amem (spliced / recomputed / ... tokens)

    @property
    def reused_kv(self) -> bool:
        """Every memory chunk came from reused KV (spliced, or a prefix hit) with nothing recomputed."""
        return bool(self.chunk_ids) and self.usage.get("recomputed_tokens", 0) == 0 and self.cached_tokens > 0

    @property
    def spliced_tokens(self) -> int:
        return int(self.usage.get("spliced_tokens", 0))


class Amem:
    def __init__(self, url: str = "http://127.0.0.1:30000", *, model: str = "default", timeout: float = 600) -> None:
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout

    # ------------------------------------------------------------------ memory

    def remember(self, namespace: str, texts: str | Sequence[str] = (), *, documents: Iterable[dict] = (),
                 metadata: dict | None = None, prefill: str | None = None) -> Remembered:
        """Store texts (and/or ``{"text", "metadata"}`` documents); long ones are split into chunks.
        ``prefill``: "remember" (compute their KV now) or "first_use" (in the first turn that recalls
        them); default: the server's ``amem.memory.prefill``."""
        body: dict[str, Any] = {"namespace": namespace, "metadata": metadata or {}}
        if prefill is not None:
            body["prefill"] = prefill
        if isinstance(texts, str):
            texts = [texts]
        if texts:
            body["texts"] = list(texts)
        documents = list(documents)
        if documents:
            body["documents"] = documents
        data = self._call("POST", "/amem/v1/remember", body)
        return Remembered(namespace, data["ids"], data["new"])

    def forget(self, namespace: str, chunk_id: str | None = None) -> list[str]:
        """Forget one chunk, or the whole namespace (texts, index and KV on every tier)."""
        path = f"/amem/v1/namespaces/{namespace}" + (f"/chunks/{chunk_id}" if chunk_id else "")
        return self._call("DELETE", path)["forgotten"]

    def list(self, namespace: str) -> list[Chunk]:
        return [_chunk(c) for c in self._call("GET", f"/amem/v1/namespaces/{namespace}/chunks")["chunks"]]

    def search(self, namespace: str, query: str, k: int = 4) -> list[Chunk]:
        data = self._call("POST", "/amem/v1/search", {"namespace": namespace, "query": query, "k": k})
        return [_chunk(c) for c in data["results"]]

    def namespaces(self) -> list[str]:
        return self._call("GET", "/amem/v1/namespaces")["namespaces"]

    # ------------------------------------------------------------------ turns

    def start_session(self, namespace: str, *, query: str | None = None, chunk_ids: Sequence[str] | None = None,
                      k: int | None = None) -> "Session":
        """Pin (and warm) a working set: the chunks ``query`` recalls, the given ids, or the latest."""
        body = {"namespace": namespace, "query": query, "chunk_ids": list(chunk_ids) if chunk_ids else None, "k": k}
        data = self._call("POST", "/amem/v1/sessions", {k_: v for k_, v in body.items() if v is not None})
        return Session(self, data["session_id"], namespace, data["chunk_ids"], data.get("warm") or {})

    def ask(self, namespace: str | None, question: str, *, history: Sequence[dict] = (), session: str | None = None,
            max_tokens: int = 64, temperature: float = 0.0) -> Answer:
        """One chat turn through the OpenAI route, with ``namespace``'s memory (or the session's)."""
        messages = [*history, {"role": "user", "content": question}]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature}
        if namespace:
            body["user"] = namespace
        headers = {"X-Amem-Session": session} if session else {}
        reply = self._request("POST", "/v1/chat/completions", body, headers)
        data = reply.json()
        usage = data.get("usage") or {}
        amem = usage.get("amem") or {}
        memory = amem.get("memory") or {}
        chunks = [c for c in reply.headers.get("x-amem-chunks", "").split(",") if c] or memory.get("chunks", [])
        return Answer(data["choices"][0]["message"]["content"], memory.get("namespace", namespace), chunks,
                      usage.get("prompt_tokens", 0), (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                      amem)

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        try:
            reply = requests.request(method, self.url + path, json=body, headers=headers, timeout=self.timeout)
        except requests.RequestException as err:
            raise AmemError(0, f"cannot reach {self.url}: {err}") from None
        if reply.status_code >= 400:
            raise AmemError(reply.status_code, error_message(reply))
        return reply

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        return self._request(method, path, body).json()


@dataclasses.dataclass
class Session:
    client: Amem
    session_id: str
    namespace: str
    chunk_ids: list[str]
    warm: dict = dataclasses.field(default_factory=dict)  # what warming cost (server's session "warm")

    def ask(self, question: str, **kwargs) -> Answer:
        return self.client.ask(None, question, session=self.session_id, **kwargs)

    def end(self) -> None:
        self.client._call("DELETE", f"/amem/v1/sessions/{self.session_id}")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.end()
        except AmemError:
            pass


def _chunk(c: dict) -> Chunk:
    return Chunk(c["id"], c["namespace"], c["text"], c["tokens"], c.get("metadata") or {}, c.get("score"))
