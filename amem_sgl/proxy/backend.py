"""Where the proxy's memory lives: a local store folder (``--store DIR``: the project's MemoryStore,
same embedder, hybrid recall, per-namespace hnswlib index, persisted) or a running amem server
(``--memory URL``: its ``/amem/v1`` API). Memory is text here: no KV, no SGLang in this process.

Both answer :meth:`recall` (the top-k chunks for a query, as dicts with id, text, tokens, created)
and :meth:`inventory` (every chunk id of a namespace with its token count). ``headers`` carry the
amem key the remote server is shown (amem_sgl.proxy.guard.memory_headers); the local store ignores
them (the proxy checked the caller itself).
"""

from __future__ import annotations

import asyncio
import types

import httpx

from amem_sgl.chunks.compose import Composer
from amem_sgl.chunks.identity import check_text, chunk_id
from amem_sgl.memory.store import MemoryStore, UnknownNamespace

TEXT_MODEL_ID = "amem-proxy-text"  # chunk ids of text memory: (namespace, this, the text's UTF-8 bytes)


class BackendError(RuntimeError):
    """The memory backend could not answer (``status``: what the proxy answers with)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def recallable(query: str) -> str:
    """A turn's text as a recall query: a lone surrogate (not valid unicode; a client can send one as a
    JSON escape) becomes U+FFFD, so the rest of the turn is still recalled on."""
    try:
        query.encode("utf-8")
        return query
    except UnicodeEncodeError:
        return query.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class LocalBackend:
    """The server's own limits apply (amem_sgl.memory.layer.MemoryLayer.remember): every text a
    non-empty valid-unicode string, at most ``max_chunks`` chunks in one request (413)."""

    def __init__(self, root, chunk_tokens: int = 128, max_chunks: int = 1024) -> None:
        self.store = MemoryStore(root)
        self.config = types.SimpleNamespace(chunk_tokens=chunk_tokens, max_chunks=max_chunks)

    @property
    def tokenizer(self):
        return self.store.embedder.model.tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def composer(self) -> Composer:
        """The server's composition module over the embedder's tokenizer (what the splitter counts)."""
        if getattr(self, "_composer", None) is None:
            self._composer = Composer(self.tokenizer)
        return self._composer

    def split(self, text: str) -> list[str]:
        """The server's own splitter (sentence-bounded chunks of at most ``chunk_tokens`` tokens), here
        counting the embedder's tokens."""
        return self.composer.split_text(text, self.config.chunk_tokens)

    def remember(self, namespace: str, docs: list[tuple[str, dict]]) -> list[dict]:
        for text, _ in docs:
            check_text(text)
        pieces = [(piece, meta) for text, meta in docs for piece in self.split(text)]
        if len(pieces) > self.config.max_chunks:
            raise BackendError(413, f"{len(pieces)} chunks in one request; the limit is {self.config.max_chunks}")
        items = [(chunk_id(namespace, TEXT_MODEL_ID, list(piece.encode("utf-8"))), piece, self.encode(piece), meta)
                 for piece, meta in pieces]
        new = set(self.store.add(namespace, items))
        return [{"id": cid, "tokens": len(ids), "new": cid in new, "text": text} for cid, text, ids, _ in items]

    def search(self, namespace: str, query: str, k: int):
        check_text(query, "query")
        return self.store.search(namespace, query, k)

    async def recall(self, namespace: str, query: str, k: int, headers: dict | None = None) -> list[dict]:
        if not self.store.has_namespace(namespace):
            return []
        hits = await asyncio.to_thread(self.store.search, namespace, recallable(query), k)
        return [{**c.to_json(), "score": s} for c, s in hits]

    async def inventory(self, namespace: str, headers: dict | None = None) -> dict[str, int]:
        try:
            return {c.chunk_id: c.tokens for c in self.store.list(namespace)}
        except UnknownNamespace:
            return {}


class RemoteBackend:
    """An amem server's memory API (``/amem/v1/search`` and the chunk list)."""

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url, self.client = url.rstrip("/"), client

    async def send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request to the memory server, read whole; BackendError 504/502 when it cannot answer."""
        try:
            return await self.client.request(method, self.url + path, **kwargs)
        except httpx.TimeoutException as err:
            raise BackendError(504, f"memory server {self.url} timed out: {err}") from None
        except httpx.HTTPError as err:
            raise BackendError(502, f"memory server {self.url} unreachable: {err!r}") from None

    async def _call(self, method: str, path: str, **kwargs) -> dict | None:
        reply = await self.send(method, path, **kwargs)
        if reply.status_code == 404:
            return None  # no memory in this namespace yet
        if reply.status_code in (401, 403):  # the memory server refused the key it was shown: said as it said
            raise BackendError(reply.status_code, f"memory server {self.url}: {_message(reply)}")
        if reply.status_code >= 400:
            raise BackendError(502, f"memory server {self.url} answered {reply.status_code}: {reply.text[:300]}")
        return reply.json()

    async def recall(self, namespace: str, query: str, k: int, headers: dict | None = None) -> list[dict]:
        data = await self._call("POST", "/amem/v1/search", json={"namespace": namespace, "query": recallable(query), "k": k},
                                headers=headers)
        return list((data or {}).get("results", []))

    async def inventory(self, namespace: str, headers: dict | None = None) -> dict[str, int]:
        data = await self._call("GET", f"/amem/v1/namespaces/{namespace}/chunks", headers=headers)
        return {c["id"]: int(c.get("tokens", 0)) for c in (data or {}).get("chunks", [])}


def _message(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:300]
