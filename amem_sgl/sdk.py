"""Python SDK for a running amem server.

    from amem_sgl import Amem

    amem = Amem("http://127.0.0.1:30000")
    amem.remember("alice", ["Alice's sister Maria lives in Denver.", "Alice works at Boeing."])
    with amem.start_session("alice") as session:
        print(session.ask("Where does my sister live?").text)
        answer = session.ask("Where do I work?")
        print(answer.text, answer.reused_kv)   # the second turn reuses the session's blended KV

    # The call shape of the product amem imitates works too: a session object or its id.
    session = amem.start_session("alice")
    print(amem.ask("alice", "Where does my sister live?", session=session))   # str(answer) is the text

Errors: the server's refusals raise :class:`AmemError` (``status`` and the server's ``message``);
a server that cannot be reached raises ``AmemError`` with status 0 ("cannot reach ..."); wrong
arguments are caught before anything is sent (``TypeError`` for a wrong type, ``ValueError`` for a
bad value). ``api_key`` (or ``$AMEM_API_KEY``) is sent as ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from typing import Any, Iterable, Sequence, Union

import requests

from amem_sgl.chunks.client import AmemRequestError, error_message
from amem_sgl.chunks.identity import is_chunk_id, validate_namespace
from amem_sgl.config import FIDELITY_LEVELS


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

    def __str__(self) -> str:
        return self.text

    @property
    def reused_kv(self) -> bool:
        """Every memory chunk came from reused KV (spliced, or a prefix hit) with nothing recomputed:
        the server reports no chunk token prefilled in this turn (``computed_chunk_tokens`` 0; a
        server that does not report it: False) and no blend recompute."""
        return (bool(self.chunk_ids) and self.usage.get("computed_chunk_tokens") == 0
                and self.usage.get("recomputed_tokens", 0) == 0)

    @property
    def spliced_tokens(self) -> int:
        return int(self.usage.get("spliced_tokens", 0))


API_KEY_ENV = "AMEM_API_KEY"


class Amem:
    def __init__(self, url: str = "http://127.0.0.1:30000", *, api_key: str | None = None, model: str = "default",
                 timeout: float = 600) -> None:
        _require(url, str, "url")
        _require(model, str, "model")
        if api_key is not None:
            _require(api_key, str, "api_key")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        try:
            parts = urllib.parse.urlsplit(url)
            host, _ = parts.hostname, parts.port  # .port: a ValueError for a port that is not a number
        except ValueError as err:
            raise ValueError(f"url {url!r} is not a valid URL: {err}") from None
        if not host:
            raise ValueError(f"url {url!r} names no host")
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)

    # ------------------------------------------------------------------ memory

    def remember(self, namespace: str, texts: str | Sequence[str] = (), *, documents: Iterable[dict] = (),
                 metadata: dict | None = None, prefill: str | None = None) -> Remembered:
        """Store texts (and/or ``{"text", "metadata"}`` documents); long ones are split into chunks.
        ``prefill``: "remember" (compute their KV now) or "first_use" (in the first turn that recalls
        them); default: the server's ``amem.memory.prefill``."""
        _require_namespace(namespace)
        if metadata is not None:
            _require(metadata, dict, "metadata")
        if prefill not in (None, "remember", "first_use"):
            raise ValueError(f"prefill must be 'remember' or 'first_use', got {prefill!r}")
        body: dict[str, Any] = {"namespace": namespace, "metadata": metadata or {}}
        if prefill is not None:
            body["prefill"] = prefill
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, text in enumerate(texts):
            _require(text, str, f"texts[{i}]")
        if texts:
            body["texts"] = list(texts)
        documents = list(documents)
        if documents:
            body["documents"] = documents
        data = self._call("POST", "/amem/v1/remember", body)
        return Remembered(namespace, data["ids"], data["new"])

    def forget(self, namespace: str, chunk_id: str | None = None) -> list[str]:
        """Forget one chunk (``chunk_id``: 64 lowercase hex, as :meth:`remember` returns), or, with
        ``chunk_id=None`` only, the whole namespace (texts, index and KV on every tier). Any other
        chunk id -- ``""`` included -- is a ValueError, never "the whole namespace"."""
        path = f"/amem/v1/namespaces/{_segment(_require_namespace(namespace))}"
        if chunk_id is not None:
            path += f"/chunks/{_segment(_require_chunk_id(chunk_id))}"
        return self._call("DELETE", path)["forgotten"]

    def list(self, namespace: str) -> list[Chunk]:
        path = f"/amem/v1/namespaces/{_segment(_require_namespace(namespace))}/chunks"
        return [_chunk(c) for c in self._call("GET", path)["chunks"]]

    def search(self, namespace: str, query: str, k: int = 4) -> list[Chunk]:
        _require_namespace(namespace)
        _require(query, str, "query")
        _require_count(k, "k")
        data = self._call("POST", "/amem/v1/search", {"namespace": namespace, "query": query, "k": k})
        return [_chunk(c) for c in data["results"]]

    def namespaces(self) -> list[str]:
        return self._call("GET", "/amem/v1/namespaces")["namespaces"]

    # ------------------------------------------------------------------ turns

    def start_session(self, namespace: str, *, query: str | None = None, chunk_ids: Sequence[str] | None = None,
                      k: int | None = None, fidelity: str | None = None) -> "Session":
        """Pin (and warm) a working set: the chunks ``query`` recalls, the given ids, or the latest.
        The returned :class:`Session` is accepted by :meth:`ask` (``session=``), as is its id.
        ``fidelity``: the session's level (default: the server's ``amem.blend.fidelity``); an
        ``exact`` session's working set is prefilled exactly, any other is spliced and blended."""
        _require_namespace(namespace)
        if query is not None:
            _require(query, str, "query")
        if chunk_ids is not None:
            if isinstance(chunk_ids, str):
                raise TypeError("chunk_ids must be a list of chunk id strings, not one string")
            for i, cid in enumerate(chunk_ids):
                _require_chunk_id(cid, f"chunk_ids[{i}]")
        if k is not None:
            _require_count(k, "k")
        _require_fidelity(fidelity)
        body = {"namespace": namespace, "query": query, "chunk_ids": list(chunk_ids) if chunk_ids else None, "k": k,
                "fidelity": fidelity}
        data = self._call("POST", "/amem/v1/sessions", {k_: v for k_, v in body.items() if v is not None})
        return Session(self, data["session_id"], namespace, data["chunk_ids"], data.get("warm") or {})

    def ask(self, namespace: str | None, question: str, *, history: Sequence[dict] = (),
            session: Union["Session", str, None] = None, max_tokens: int = 64, temperature: float = 0.0,
            fidelity: str | None = None) -> Answer:
        """One chat turn through the OpenAI route, with ``namespace``'s memory (or the session's:
        ``session`` is a :class:`Session` from :meth:`start_session` or its id). ``fidelity``
        (``exact | guarded | fast``) overrides the server's ``amem.blend.fidelity`` for this turn."""
        if namespace is not None:
            _require(namespace, str, "namespace")
        _require(question, str, "question")
        if isinstance(history, (str, bytes, dict)):
            raise TypeError("history must be a list of {'role', 'content'} messages")
        for i, message in enumerate(history):
            _require(message, dict, f"history[{i}]")
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise ValueError(f"history[{i}] must have string 'role' and 'content'")
        _require_count(max_tokens, "max_tokens")
        if type(temperature) not in (int, float) or temperature < 0:
            raise (TypeError if type(temperature) not in (int, float) else ValueError)(
                f"temperature must be a number >= 0, got {temperature!r}")
        if isinstance(session, Session):
            if namespace is not None and namespace != session.namespace:
                raise ValueError(f"session {session.session_id} belongs to namespace {session.namespace!r}, "
                                 f"not {namespace!r}")
            session = session.session_id
        elif session is not None:
            _require(session, str, "session")
        _require_fidelity(fidelity)
        messages = [*history, {"role": "user", "content": question}]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature}
        if namespace:
            body["user"] = namespace
        headers = {"X-Amem-Session": session} if session else {}
        if fidelity is not None:
            headers["X-Amem-Fidelity"] = fidelity
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
        headers = dict(headers or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            reply = requests.request(method, self.url + path, json=body, headers=headers, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            # Only a connection failure is "cannot reach"; anything else is a bug to surface as such.
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

    @property
    def id(self) -> str:
        return self.session_id

    def __str__(self) -> str:
        return self.session_id

    def end(self) -> None:
        self.client._call("DELETE", f"/amem/v1/sessions/{_segment(self.session_id)}")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.end()
        except AmemError:
            pass


def _require(value, kind: type, name: str) -> None:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__} ({value!r:.60})")


def _require_namespace(namespace) -> str:
    """The server's namespace rule (amem_sgl.chunks.identity.validate_namespace), checked here too: a
    namespace goes into URL paths, where ``../bob`` would name another one."""
    _require(namespace, str, "namespace")
    return validate_namespace(namespace)


def _require_chunk_id(chunk_id, name: str = "chunk_id") -> str:
    _require(chunk_id, str, name)
    if not is_chunk_id(chunk_id):  # the server's check
        raise ValueError(f"{name} must be a chunk id (64 lowercase hex characters), got {chunk_id!r:.80}")
    return chunk_id


def _segment(value: str) -> str:
    """One URL path segment: nothing in it (/, ?, #, %) can change which route it names, nor can it be
    a dot segment (which the URL library would resolve away)."""
    if value in ("", ".", ".."):
        raise ValueError(f"{value!r} cannot be a URL path segment")
    return urllib.parse.quote(value, safe="")


def _require_fidelity(fidelity) -> None:
    if fidelity is not None:
        _require(fidelity, str, "fidelity")
        if fidelity not in FIDELITY_LEVELS:
            raise ValueError(f"fidelity must be one of {', '.join(FIDELITY_LEVELS)}, got {fidelity!r}")


def _require_count(value, name: str) -> None:
    _require(value, int, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _chunk(c: dict) -> Chunk:
    return Chunk(c["id"], c["namespace"], c["text"], c["tokens"], c.get("metadata") or {}, c.get("score"))
