"""The memory layer inside the HTTP server: remember / recall / compose / sessions / forget.

* remember: documents are split on sentence boundaries into chunks of at most
  ``memory.chunk_tokens`` tokens; each chunk is tokenized alone and its text, token ids and
  embedding stored per namespace (amem_sgl.memory.store). Its KV is computed once: with
  ``memory.prefill: remember`` now, behind the memory system prompt (a ``register`` request to this
  server's own ``/generate``); with ``first_use`` in the first turn that recalls it (the turn's
  request captures it, see amem_sgl.chunks.hints), so memory never prefilled is never paid for.
* compose: a chat turn becomes [system][recalled chunks][history][turn] as token ids, the chunks'
  spans declared in ``kv_hints`` so the scheduler splices (and blends) their KV. Recalled chunks are
  placed in the order they were remembered, so the same working set gives the same prompt prefix
  and the next turn is a plain prefix hit.
* sessions: a pinned working set (recalled once, or given), warmed at start (residency prefetch and
  one splice+blend that leaves the blended prefix in the tree); turns in the session reuse it.
* exact mode (``fidelity="exact"``, per session or per plan; amem_sgl.memory.exact): the working
  set grows in a stable order (each turn's newly recalled chunks appended, bounded), turns go out as
  ordinary prefills -- an exact prefix hit plus the new chunks, identical to a full prefill.
* forget: chunk texts and index entries, KV on the device (a forget action to the scheduler) and
  in the residency tiers.

One instance per server process: :data:`ACTIVE` (the OpenAI hooks read it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from typing import Sequence

import httpx

from amem_sgl.chunks.client import amem_usage, error_message
from amem_sgl.chunks.compose import Composer
from amem_sgl.chunks.hints import build_kv_hints
from amem_sgl.chunks.identity import check_text, chunk_id, validate_namespace
from amem_sgl.config import AmemConfig
from amem_sgl.memory import chunk_kv
from amem_sgl.memory.chunk_kv import MemoryError_  # noqa: F401 -- re-exported (memory.layer.MemoryError_)
from amem_sgl.memory.exact import DEFAULT_MAX_TOKENS, plan_exact_turn, validate_fidelity
from amem_sgl.memory.fit import FittedPlan, fit_chunks
from amem_sgl.memory.store import Embedder, MemoryChunk, MemoryStore, UnknownNamespace
from amem_sgl.memory.turns import Plan, Session, embedding_threads, message_dicts, phases  # noqa: F401 -- re-exported

logger = logging.getLogger(__name__)

# What follows every chunk's text in its token ids (chunks read apart in a prompt); counted in chunk_tokens.
CHUNK_END = "\n"

ACTIVE: "MemoryLayer | None" = None


class MemoryLayer:
    def __init__(self, config: AmemConfig, *, base_url: str, model_id: str, tokenizer_path: str,
                 residency=None) -> None:
        self.config = config.memory
        self.base_url = base_url.rstrip("/")
        self.model_id = model_id
        self.tokenizer_path = tokenizer_path
        embedder = Embedder(self.config.embedder or None, self.config.embed_dtype)
        self.store = MemoryStore(self.config.resolved_dir(), embedder, lexical_weight=self.config.lexical_weight)
        self.residency = residency  # ResidencyClient or None
        # Sent with the requests to this server's own /generate (the launcher sets its internal API token).
        self.request_headers: dict[str, str] = {}
        self.sessions: dict[str, Session] = {}
        self.plans: collections.OrderedDict[str, Plan] = collections.OrderedDict()  # by request id
        self._lock = threading.Lock()
        self._composer: Composer | None = None

    # ------------------------------------------------------------------ tokens

    @property
    def composer(self) -> Composer:
        """Prompt composition over this server's tokenizer (amem_sgl.chunks.compose): loaded once."""
        if self._composer is None:
            from transformers import AutoTokenizer

            self._composer = Composer(AutoTokenizer.from_pretrained(self.tokenizer_path))
        return self._composer

    @property
    def tokenizer(self):
        return self.composer.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.composer.encode(text)

    @property
    def preamble(self) -> list[int]:
        """Tokens before the chunks with the memory system prompt: where chunk KV is computed."""
        return self.composer.preamble(self.config.system_prompt)

    def split(self, text: str) -> list[str]:
        """Sentence-boundary chunks of at most ``chunk_tokens`` tokens as stored (:meth:`chunk_ids`);
        a longer sentence is cut."""
        try:
            return self.composer.split_text(text, self.config.chunk_tokens, suffix=CHUNK_END)
        except ValueError as err:
            raise MemoryError_(400, f"{err} (amem.memory.chunk_tokens)") from None

    def chunk_ids(self, piece: str) -> list[int]:
        """A chunk's token ids, as registered and stored: its text and :data:`CHUNK_END`, tokenized alone."""
        return self.encode(piece + CHUNK_END)

    # ------------------------------------------------------------------ remember / forget

    async def remember(self, namespace: str, documents: Sequence[tuple[str, dict]],
                       prefill: str | None = None) -> list[dict]:
        validate_namespace(namespace)
        # Splitting and tokenizing (seconds for a large request) run off the event loop.
        pieces, token_ids, ids, known = await asyncio.to_thread(self._prepare, namespace, documents)
        todo = [(cid, t) for cid, t in zip(ids, token_ids) if cid not in known]
        if (prefill or self.config.prefill) == "remember":
            await chunk_kv.register(self.base_url, self.request_headers, self.preamble, namespace, todo)
            await asyncio.to_thread(chunk_kv.await_durable, self.residency, self.model_id,
                                    [cid for cid, _ in todo], self.config.kv_durable_wait_s)
        new = set(await asyncio.to_thread(self.store.add, namespace,
                                          [(cid, text, t, meta) for cid, (text, meta), t in zip(ids, pieces, token_ids)]))
        return [{"id": cid, "tokens": len(t), "new": cid in new, "text": text}
                for cid, (text, _), t in zip(ids, pieces, token_ids)]

    def _prepare(self, namespace: str, documents: Sequence[tuple[str, dict]]):
        """A remember request's chunks: (pieces, token ids, chunk ids, ids already stored), each chunk
        once -- a text given twice in one request (or two parts that tokenize the same) is one chunk,
        its first occurrence's metadata kept, so ``new`` counts it once."""
        try:
            self.store.check_spelling(namespace)  # before any KV is prefilled for it
        except ValueError as err:
            raise MemoryError_(400, str(err)) from None
        pieces: list[tuple[str, dict]] = []
        for text, metadata in documents:
            try:
                check_text(text)
            except ValueError as err:
                raise MemoryError_(400, str(err)) from None
            parts = self.split(text)
            for i, part in enumerate(parts):
                meta = dict(metadata or {})
                if len(parts) > 1:
                    meta.update({"part": i, "parts": len(parts)})
                pieces.append((part, meta))
        if len(pieces) > self.config.max_chunks_per_request:
            raise MemoryError_(413, f"{len(pieces)} chunks in one request; the limit is "
                               f"{self.config.max_chunks_per_request} (amem.memory.max_chunks_per_request)")
        unique: dict[str, tuple[tuple[str, dict], list[int]]] = {}
        for piece in pieces:
            tokens = self.chunk_ids(piece[0])
            unique.setdefault(chunk_id(namespace, self.model_id, tokens), (piece, tokens))
        ids = list(unique)
        pieces, token_ids = [p for p, _ in unique.values()], [t for _, t in unique.values()]
        known = set()
        if self.store.has_namespace(namespace):
            known = {c.chunk_id for c in self.store.list(namespace)}
        self.preamble  # noqa: B018 -- the first use computes (and caches) it here, off the loop
        return pieces, token_ids, ids, known

    async def forget(self, namespace: str, chunk_ids: Sequence[str] | None) -> list[str]:
        gone = await asyncio.to_thread(self.store.forget, namespace, chunk_ids)
        # The device tree (a forget action), then the residency tiers.
        body = {"input_ids": self.preamble[:1] or [0], "sampling_params": {"max_new_tokens": 0},
                "kv_hints": build_kv_hints(namespace, [], forget=["*"] if chunk_ids is None else list(chunk_ids))}
        server = self.base_url, self.request_headers
        if not await chunk_kv.device_forget(*server, body):
            # Texts and index are gone already; the device KV is dropped in the background (a
            # saturated scheduler answered too late) -- until then no request can name it.
            asyncio.get_running_loop().create_task(chunk_kv.device_forget(*server, body, attempts=5))
        if self.residency is not None:
            fields = {"namespace": namespace} if chunk_ids is None else {"chunk_ids": list(gone)}
            await asyncio.to_thread(self.residency.request, "delete", **fields)
        # A forgotten chunk leaves every session's working set (no later turn may use it); the
        # sessions themselves go on. Forgetting the whole namespace ends its sessions.
        forgotten = set(gone)
        with self._lock:
            for sid in [s for s, sess in self.sessions.items() if sess.namespace == namespace]:
                if chunk_ids is None:
                    del self.sessions[sid]
                else:
                    self.sessions[sid].chunk_ids = [c for c in self.sessions[sid].chunk_ids if c not in forgotten]
        return gone

    # ------------------------------------------------------------------ recall / compose

    def recall(self, namespace: str, query: str, k: int | None = None) -> list[tuple[MemoryChunk, float]]:
        k = k or self.config.top_k
        query.encode("utf-8")  # a lone surrogate: UnicodeEncodeError (a ValueError, 400), not a 500 in the embedder
        with embedding_threads():
            found = self.store.search(namespace, query, k)
        hits = [(c, s) for c, s in found if s >= self.config.min_score]
        if self.residency is not None and hits:
            # The value policy's relevance term: a chunk recalled with a high score is kept in the
            # CPU tier over a more recent irrelevant one (fire and forget, off the request path).
            self.residency.relevance({c.chunk_id: min(max(s, 0.0), 1.0) for c, s in hits})
        return hits

    def compose(self, namespace: str, messages: Sequence[dict], chunks: Sequence[MemoryChunk]) -> tuple[list[int], list]:
        """A chat turn's token ids and chunk spans (amem_sgl.chunks.compose.Composer.chat)."""
        prompt = self.composer.chat(messages, [c.token_ids for c in chunks], self.config.system_prompt)
        return prompt.input_ids, prompt.spans

    @staticmethod
    def hints(namespace: str, spans, exact: bool = False) -> dict:
        """kv_hints of a memory turn: splice resident chunks (``exact``: none, an exact prefill under
        the namespace's exact salt); capture the ones computed in place (a chunk remembered but never
        prefilled, or gone from every tier) as their chunk nodes."""
        return build_kv_hints(namespace, spans, capture=True, exact=exact)

    @property
    def exact_max_tokens(self) -> int:  # amem.memory.exact_working_set_tokens, when configured
        return int(getattr(self.config, "exact_working_set_tokens", DEFAULT_MAX_TOKENS))

    def fit(self, chunks: Sequence[MemoryChunk], scores: Sequence[float], compose, reserve_tokens: int = 0):
        """:func:`amem_sgl.memory.fit.fit_chunks` against the model's context as served."""
        return fit_chunks(chunks, scores, compose, self.context_tokens, reserve_tokens)

    def plan_chat(self, namespace: str | None, messages: Sequence[dict], session_id: str | None,
                  fidelity: str | None = None, *, reserve_tokens: int = 0) -> Plan | None:
        """The memory plan of a chat turn, or None (no memory: plain SGLang). ``fidelity="exact"``
        (or a session started with it) makes it an exact-mode turn (amem_sgl.memory.exact).
        ``reserve_tokens`` (the tokens the request will generate, its ``max_tokens``) is kept free of
        the model's context: recalled chunks that would not fit are dropped (:meth:`fit`)."""
        session = self._session(session_id) if session_id else None
        if session is not None:
            namespace = session.namespace
        if not namespace or not self.store.has_namespace(validate_namespace(namespace)):
            return None  # no namespace, or nothing remembered for this user: a plain turn
        if (_fidelity(fidelity) or (session.fidelity if session is not None else None)) == "exact":
            return plan_exact_turn(self, namespace, messages, session, reserve_tokens)
        started = time.perf_counter()
        if session is not None:
            chunks, scores = self._session_chunks(session), [1.0] * len(session.chunk_ids)
            session.turns += 1
        else:
            query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            hits = sorted(self.recall(namespace, query), key=lambda h: h[0].created)
            chunks, scores = [c for c, _ in hits], [s for _, s in hits]
        if not chunks:
            return None
        return self._fitted_plan(namespace, chunks, scores, lambda cs: self.compose(namespace, messages, cs),
                                 reserve_tokens, session, started)

    def plan_completion(self, namespace: str | None, prompt: str, session_id: str | None = None, *,
                        reserve_tokens: int = 0) -> Plan | None:
        """A text completion's memory plan: the chunks recalled for its prompt, or a session's working
        set (``session_id``, as on the chat route: the session's namespace wins). ``reserve_tokens``:
        as for :meth:`plan_chat`."""
        session = self._session(session_id) if session_id else None
        if session is not None:
            namespace = session.namespace
        if not namespace or not self.store.has_namespace(validate_namespace(namespace)):
            return None
        started = time.perf_counter()
        if session is not None:
            hits = [(c, 1.0) for c in self._session_chunks(session)]
            session.turns += 1
        else:
            hits = sorted(self.recall(namespace, prompt), key=lambda h: h[0].created)
        if not hits:
            return None

        def compose(chunks):
            composed = self.composer.completion(self.config.system_prompt, [c.token_ids for c in chunks], prompt)
            return composed.input_ids, composed.spans

        return self._fitted_plan(namespace, [c for c, _ in hits], [s for _, s in hits], compose, reserve_tokens,
                                 session, started)

    def _fitted_plan(self, namespace: str, chunks, scores, compose, reserve_tokens: int, session: Session | None,
                     started: float) -> Plan | None:
        """A splice turn's plan: its recalled ``chunks`` fitted to the context (:meth:`fit`), composed
        by ``compose(chunks) -> (ids, spans)``; None when no chunk fits."""
        recalled = time.perf_counter()
        fitted = self.fit(chunks, scores, compose, reserve_tokens)
        if fitted is None:
            return None
        chunks, scores, (ids, spans), dropped = fitted
        return FittedPlan(ids, self.hints(namespace, spans), namespace, [c.chunk_id for c in chunks], scores,
                          session.session_id if session else None,
                          timings=phases(started, recalled, time.perf_counter()), dropped_chunks=dropped)

    def remember_plan(self, rid: str, plan: Plan) -> None:
        with self._lock:
            self.plans[rid] = plan
            while len(self.plans) > 4096:
                self.plans.popitem(last=False)

    def plan_for(self, rid: str | None) -> Plan | None:
        with self._lock:
            return self.plans.get(rid) if rid else None

    # ------------------------------------------------------------------ sessions

    def _session(self, session_id: str) -> Session:
        self._expire()
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise MemoryError_(404, f"unknown or expired session {session_id!r}")
            session.last_used = time.time()
            return session

    def live_session(self, session_id: str) -> Session | None:
        """The session if it exists and has not idled past ``session_idle_s`` (None otherwise); a
        look-up only (its idle clock is not reset)."""
        self._expire()
        with self._lock:
            return self.sessions.get(session_id)

    def _session_chunks(self, session: Session) -> list[MemoryChunk]:
        return [self.store.get(session.namespace, cid) for cid in session.chunk_ids]

    def _expire(self) -> None:
        cutoff = time.time() - self.config.session_idle_s
        with self._lock:
            for sid in [s for s, sess in self.sessions.items() if sess.last_used < cutoff]:
                del self.sessions[sid]

    async def start_session(self, namespace: str, query: str | None, chunk_ids: Sequence[str] | None,
                            k: int | None, fidelity: str | None = None) -> Session:
        validate_namespace(namespace)
        _fidelity(fidelity)
        if not self.store.has_namespace(namespace):
            raise UnknownNamespace(namespace)
        if chunk_ids:
            chunks = [self.store.get(namespace, cid) for cid in chunk_ids]
        elif query:
            chunks = [c for c, _ in await asyncio.to_thread(self.recall, namespace, query, k)]
        else:
            chunks = self.store.list(namespace)[-(k or self.config.top_k):]
        chunks = sorted({c.chunk_id: c for c in chunks}.values(), key=lambda c: c.created)
        # The working set as every turn sends it (behind the memory system prompt, before the turn):
        # one that does not fit the model's context could serve no turn -- refused here.
        composed = await asyncio.to_thread(self.compose, namespace, [{"role": "user", "content": ""}], chunks)
        limit = self.context_tokens
        if chunks and limit is not None and len(composed[0]) >= limit:
            raise MemoryError_(413, f"the session's working set is {len(composed[0])} tokens ({len(chunks)} chunks "
                               f"with the memory prompt); the model's context is {limit} tokens: start the "
                               "session with fewer chunks (k or chunk_ids)")
        now = time.time()
        session = Session(uuid.uuid4().hex, namespace, [c.chunk_id for c in chunks], now, now, fidelity=fidelity)
        with self._lock:
            self.sessions[session.session_id] = session
        try:
            await self._warm(session, chunks, composed)
        except MemoryError_:
            self.end_session(session.session_id)
            raise
        return session

    @property
    def context_tokens(self) -> int | None:
        """The model's context length as this server serves it (SGLang's tokenizer manager, in this
        HTTP process); None where it cannot be read (then the warm request's refusal is the check)."""
        from amem_sgl import sglang_compat

        return sglang_compat.served_context_len()

    async def _warm(self, session: Session, chunks: Sequence[MemoryChunk], composed) -> None:
        """Prefetch the working set into the CPU tier, then splice + blend it once so the blended
        prefix is in the tree before the first turn (exact mode: prefill it exactly). The server
        refusing the working set itself (400/413) refuses the session; a failure of its own is logged."""
        if not chunks:
            return
        if self.residency is not None:
            await asyncio.to_thread(self.residency.request, "prefetch", chunk_ids=session.chunk_ids,
                                    namespace=session.namespace, model_id=self.model_id)
        ids, spans = composed
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0},
                "kv_hints": self.hints(session.namespace, spans, exact=session.fidelity == "exact")}
        async with httpx.AsyncClient(timeout=600, headers=self.request_headers) as client:
            reply = await client.post(f"{self.base_url}/generate", json=body)
        if reply.status_code in (400, 413):  # the request itself (its size): no turn of it could be served
            raise MemoryError_(reply.status_code, f"the session's working set ({len(ids)} tokens) was refused: "
                               f"{error_message(reply)[:300]}")
        if reply.status_code != 200:
            logger.warning("amem memory: warming session %s failed: %s", session.session_id, reply.text[:300])
            return
        meta = reply.json().get("meta_info", {})
        session.warm = {"prompt_tokens": meta.get("prompt_tokens", 0), "cached_tokens": meta.get("cached_tokens", 0),
                        "amem": amem_usage(meta)}

    def end_session(self, session_id: str) -> bool:
        with self._lock:
            return self.sessions.pop(session_id, None) is not None


def _fidelity(value: str | None) -> str | None:
    try:
        return validate_fidelity(value)
    except ValueError as err:
        raise MemoryError_(400, str(err)) from None


def install(layer: MemoryLayer) -> None:
    global ACTIVE
    ACTIVE = layer
