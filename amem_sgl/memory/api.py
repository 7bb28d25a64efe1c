"""The memory API on SGLang's FastAPI app (listed in its OpenAPI schema at /openapi.json), and the
OpenAI integration: ``user`` (or the ``X-Amem-Namespace`` header) names the memory namespace.

Routes (JSON):
* ``POST   /amem/v1/remember``                    {namespace, texts? | documents?, metadata?}
* ``GET    /amem/v1/namespaces``                  the namespaces with memory
* ``GET    /amem/v1/namespaces/{ns}/chunks[/{id}]`` list, or get one
* ``DELETE /amem/v1/namespaces/{ns}/chunks/{id}`` forget one chunk
* ``DELETE /amem/v1/namespaces/{ns}``             forget the namespace
* ``POST   /amem/v1/search``                      {namespace, query, k?} -> chunks with scores
* ``POST   /amem/v1/sessions``                    {namespace, query? | chunk_ids?, k?, fidelity?}; ``DELETE /amem/v1/sessions/{id}``

Errors are ``{"error": {"message", "type", "code"}}`` with a 4xx status (unknown namespace, chunk
or /amem/v1 path 404, a method a path does not serve 405, bad values 400, wrong types 422, too large
413, also for a session whose working set exceeds the model's context; with API keys, 401 without
a valid key and 403 for a namespace the key does not cover -- checked here, on the namespace each
route really uses, after amem_sgl.server.limits.AuthGuard authenticated the key; the namespace list
shows only covered ones). The OpenAI routes answer in SGLang's OpenAI shape: an unknown or expired
``X-Amem-Session`` 404 (chat and completions alike); ``amem_fidelity`` in the body wins over the
``X-Amem-Fidelity`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from typing import Any, Literal, Optional

from fastapi import APIRouter, FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from amem_sgl.memory import layer as memory
from amem_sgl.memory import timings
from amem_sgl.memory.errors import MemoryRoute, error
from amem_sgl.memory.store import UnknownChunk, UnknownNamespace
from amem_sgl.server import auth
from amem_sgl.config import AmemConfig
from amem_sgl.memory.fidelity import (FIDELITY_FIELD, FIDELITY_HEADER, MARGIN_HEADER, FidelityControl,
                                      parse_fidelity, parse_margin, requested_fidelity)
from amem_sgl.server.limits import _read_body, _replay, _send_json, error_body

_CHUNK_ID = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through
NAMESPACE_HEADER = "x-amem-namespace"
SESSION_HEADER = "x-amem-session"
CHUNKS_HEADER = "x-amem-chunks"


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    metadata: dict[str, Any] = Field(default_factory=dict)


class RememberRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    namespace: StrictStr
    texts: Optional[list[StrictStr]] = None
    documents: Optional[list[Document]] = None
    metadata: dict[str, Any] = Field(default_factory=dict, description="applied to every text")
    prefill: Optional[Literal["remember", "first_use"]] = Field(
        default=None, description="when the chunks' KV is computed: now, or in the first turn that recalls "
                                  "them (default: the server's amem.memory.prefill)")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    namespace: StrictStr
    query: StrictStr
    k: int = Field(default=4, ge=1, le=100)


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    namespace: StrictStr
    query: Optional[StrictStr] = None
    chunk_ids: Optional[list[StrictStr]] = None
    k: Optional[int] = Field(default=None, ge=1, le=100)
    fidelity: Optional[StrictStr] = None


def _authorize(namespace: str) -> str:
    """Refuse (401/403) unless the request's API key covers ``namespace``; returns it."""
    denied = auth.denial([namespace])
    if denied is not None:
        raise memory.MemoryError_(*denied)
    return namespace


def session_namespace(session_id: str) -> str | None:
    """The namespace a live session belongs to (None: unknown, or idle past amem.memory.session_idle_s)."""
    layer = memory.ACTIVE
    session = layer.live_session(session_id) if layer is not None else None
    return session.namespace if session is not None else None


def _layer() -> memory.MemoryLayer:
    if memory.ACTIVE is None:
        raise memory.MemoryError_(503, "the memory layer is disabled on this server (amem.memory.enabled)")
    return memory.ACTIVE


def _check_ids(ids) -> None:
    bad = [i for i in ids if not _CHUNK_ID.fullmatch(i)]
    if bad:
        raise memory.MemoryError_(400, f"invalid chunk id {bad[0][:80]!r}: expected 64 hex characters")


router = APIRouter(prefix="/amem/v1", tags=["amem memory"], route_class=MemoryRoute)


@router.post("/remember", summary="Remember texts or documents in a namespace")
async def remember(body: RememberRequest):
    _authorize(body.namespace)
    docs = [(t, dict(body.metadata)) for t in body.texts or []]
    docs += [(d.text, {**body.metadata, **d.metadata}) for d in body.documents or []]
    if not docs:
        raise memory.MemoryError_(400, "nothing to remember: give 'texts' or 'documents'")
    rows = await _layer().remember(body.namespace, docs, prefill=body.prefill)
    return {"namespace": body.namespace, "chunks": rows, "ids": [r["id"] for r in rows],
            "new": sum(r["new"] for r in rows)}


@router.get("/namespaces", summary="Namespaces that hold memory")
async def namespaces():
    return {"namespaces": auth.visible(_layer().store.namespaces())}


@router.get("/namespaces/{namespace}/chunks", summary="List a namespace's chunks")
async def list_chunks(namespace: str):
    return {"namespace": namespace, "chunks": [c.to_json() for c in _layer().store.list(_authorize(namespace))]}


@router.get("/namespaces/{namespace}/chunks/{chunk_id}", summary="One chunk")
async def get_chunk(namespace: str, chunk_id: str):
    _authorize(namespace)
    _check_ids([chunk_id])
    return _layer().store.get(namespace, chunk_id).to_json()


@router.delete("/namespaces/{namespace}/chunks/{chunk_id}", summary="Forget one chunk (text, index, KV)")
async def forget_chunk(namespace: str, chunk_id: str):
    _authorize(namespace)
    _check_ids([chunk_id])
    return {"namespace": namespace, "forgotten": await _layer().forget(namespace, [chunk_id])}


@router.delete("/namespaces/{namespace}", summary="Forget a namespace (texts, index, KV on every tier)")
async def forget_namespace(namespace: str):
    return {"namespace": namespace, "forgotten": await _layer().forget(_authorize(namespace), None)}


@router.post("/search", summary="Recall only: the chunks most similar to a query, with scores")
async def search(body: SearchRequest):
    # embedding the query (and the first use's tokenizer load) off the event loop
    hits = await asyncio.to_thread(_layer().recall, _authorize(body.namespace), body.query, body.k)
    return {"namespace": body.namespace, "results": [{**c.to_json(), "score": s} for c, s in hits]}


@router.post("/sessions", summary="Start a session: pin and warm a working set")
async def start_session(body: SessionRequest):
    _authorize(body.namespace)
    if body.chunk_ids:
        _check_ids(body.chunk_ids)
    layer = _layer()
    try:  # exact | guarded | fast (default: amem.blend.fidelity); an exact session is prefilled exactly
        level = fidelity_control(layer).level(body.fidelity)
    except ValueError as err:
        return error(400, str(err))
    session = await layer.start_session(body.namespace, body.query, body.chunk_ids, body.k, fidelity=level)
    return session.to_json()


@router.delete("/sessions/{session_id}", summary="End a session")
async def end_session(session_id: str):
    owner = session_namespace(session_id)
    if owner is not None:
        _authorize(owner)
    if not _layer().end_session(session_id):
        raise memory.MemoryError_(404, f"unknown or expired session {session_id!r}")
    return {"session_id": session_id, "ended": True}


_METHODS = ["GET", "POST", "DELETE", "HEAD"]  # what the memory routes serve (HEAD with each GET)
_ALL_METHODS = [*_METHODS, "PUT", "PATCH", "OPTIONS"]


@router.api_route("", methods=_ALL_METHODS, include_in_schema=False)
@router.api_route("/{path:path}", methods=_ALL_METHODS, include_in_schema=False)
async def unserved(request: Request, path: str = ""):
    """Last in the router: a path no memory route serves (404), or one served with other methods
    (405), answered in the memory API's error shape rather than SGLang's."""
    allowed = sorted({m for r in router.routes if r.endpoint is not unserved and r.path_regex.match(request.url.path)
                      for m in r.methods})
    if allowed:
        reply = error(405, f"{request.method} is not served on {request.url.path} (it serves {', '.join(allowed)})")
        reply.headers["allow"] = ", ".join(allowed)
        return reply
    return error(404, f"{request.method} {request.url.path} is not a memory route (see /openapi.json)")


def install_routes(app: FastAPI) -> None:
    """Add the memory routes and their error shapes to SGLang's app."""
    app.include_router(router)

    @app.exception_handler(memory.MemoryError_)
    async def _memory_error(request: Request, exc: memory.MemoryError_):
        return error(exc.status, str(exc))

    @app.exception_handler(UnknownNamespace)
    async def _unknown_namespace(request: Request, exc: UnknownNamespace):
        return error(404, f"unknown namespace {exc.args[0]!r}: nothing remembered there")

    @app.exception_handler(UnknownChunk)
    async def _unknown_chunk(request: Request, exc: UnknownChunk):
        return error(404, f"unknown chunk id {exc.args[0]!r} in this namespace")

    app.add_middleware(OpenAIMemoryMiddleware)
    timings.install_hooks()  # streamed memory turns: usage.amem with its timings


class OpenAIMemoryMiddleware:
    """For OpenAI chat/completions requests that name a namespace (``user`` or header) or a session:
    gives the request an id (so the conversion hook's plan can be found again) and reports the
    recalled chunks in the ``X-Amem-Chunks`` response header (streaming included)."""

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.PATHS or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        received = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        body, early, _ = await _read_body(receive)
        if body is None:  # the client went away before sending it all: pass that on
            return await self.app(scope, _replay(b"", receive, early), send)
        try:
            data, parsed = (json.loads(body), True) if body.strip() else (None, False)
        except ValueError:
            data, parsed = None, False  # malformed JSON: SGLang answers it with its own 400
        rid = None
        # SGLang answers a JSON body that is not an object with a 500 (its before-validator calls
        # .get on it) and serves n < 0 as one choice: refuse both here, in the OpenAI error shape.
        refusal = None
        if parsed and not isinstance(data, dict):  # null, a string, a list, a number
            refusal = "the request body must be a JSON object"
        elif isinstance(data, dict) and "n" in data and (type(data["n"]) is not int or data["n"] < 1):
            refusal = f"n must be an integer >= 1, got {data['n']!r}"
        if refusal is not None:
            return await _send_json(send, 400, error_body(refusal, 400, "BadRequestError"))
        rewritten = False  # the body is serialised again once, after every change to it
        if isinstance(data, dict) and FIDELITY_FIELD in data:
            # The body field becomes the header, and replaces one the request also sent: the explicit
            # body field wins (every later reader -- chat, completions, the guard -- sees one value).
            value = data.pop(FIDELITY_FIELD)
            rewritten = True
            kept = [(k, v) for k, v in scope.get("headers", []) if k.lower() != FIDELITY_HEADER.encode()]
            scope = dict(scope, headers=[*kept, (FIDELITY_HEADER.encode(), str(value).encode())])
            headers[FIDELITY_HEADER] = str(value)
        if FIDELITY_HEADER in headers or MARGIN_HEADER in headers:
            try:
                if FIDELITY_HEADER in headers:
                    parse_fidelity(headers[FIDELITY_HEADER])
                if MARGIN_HEADER in headers:
                    parse_margin(headers[MARGIN_HEADER])
            except ValueError as err:
                return await _send_json(send, 400, error_body(str(err), 400, "BadRequestError"))
        if SESSION_HEADER in headers and memory.ACTIVE is not None and session_namespace(headers[SESSION_HEADER]) is None:
            message = f"unknown or expired session {headers[SESSION_HEADER]!r}"  # 404 as on the session routes
            return await _send_json(send, 404, error_body(message, 404, "NotFoundError"))
        if isinstance(data, dict) and (data.get("user") or NAMESPACE_HEADER in headers or SESSION_HEADER in headers):
            rid = data.get("rid") if isinstance(data.get("rid"), str) else None
            if rid is None:
                rid = f"amem-{uuid.uuid4().hex}"
                data["rid"] = rid
                rewritten = True
            timings.stamp(rid, "received_at", received)
        if rewritten:
            body = json.dumps(data).encode()

        async def send_with_chunks(message):
            if rid is not None and message["type"] == "http.response.start":
                plan = _own_plan(rid)
                if plan is not None:
                    extra = [(CHUNKS_HEADER.encode(), ",".join(plan.chunk_ids).encode()),
                             (NAMESPACE_HEADER.encode(), plan.namespace.encode())]
                    message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        # Re-declare the body length after a rewrite.
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"] + [
            (b"content-length", str(len(body)).encode())]
        token = timings.CURRENT_RID.set(rid)  # the streamed usage chunk finds its turn by it
        try:
            await self.app(scope, _replay(body, receive), send_with_chunks)
        finally:
            timings.CURRENT_RID.reset(token)


def around_chat_conversion(original, serving, request, raw_request=None):
    """AROUND hook for ``OpenAIServingChat._convert_to_internal_request``: a turn that names a memory
    namespace (``user``, ``X-Amem-Namespace``) or session (``X-Amem-Session``) gets its prompt
    composed from recalled chunks (token ids + chunk spans in kv_hints)."""
    started = time.perf_counter()
    adapted, processed = original(serving, request, raw_request)
    converted = time.perf_counter()
    layer = memory.ACTIVE
    if layer is None:
        return adapted, processed
    headers = raw_request.headers if raw_request is not None else {}
    namespace = headers.get(NAMESPACE_HEADER) or getattr(request, "user", None)
    session = headers.get(SESSION_HEADER)
    if not namespace and not session:
        return adapted, processed
    # exact: the memory layer's exact mode (a stable working set, turns as exact prefills)
    requested = requested_fidelity(headers.get(FIDELITY_HEADER), layer.sessions.get(session) if session else None)
    level = fidelity_control(layer).level(requested)
    with _openai_status():
        plan = layer.plan_chat(namespace, memory.message_dicts(request.messages), session,
                               fidelity=level)
    if plan is not None:
        plan.timings.update(started_at=started, convert_s=converted - started)
        _apply(adapted, plan, layer, headers, requested)
    return adapted, processed


def around_completion_conversion(original, serving, request, raw_request=None):
    """AROUND hook for ``OpenAIServingCompletion._convert_to_internal_request`` (text prompts): a
    namespace's recalled chunks, or -- with ``X-Amem-Session``, as on the chat route -- the session's
    working set (its namespace wins; its level applies unless the turn names its own)."""
    started = time.perf_counter()
    adapted, processed = original(serving, request, raw_request)
    converted = time.perf_counter()
    layer = memory.ACTIVE
    headers = raw_request.headers if raw_request is not None else {}
    namespace = headers.get(NAMESPACE_HEADER) or getattr(request, "user", None)
    session = headers.get(SESSION_HEADER)
    if layer is None or not (namespace or session) or not isinstance(request.prompt, str):
        return adapted, processed
    with _openai_status():
        plan = layer.plan_completion(namespace, request.prompt, session)
    if plan is not None:
        plan.timings.update(started_at=started, convert_s=converted - started)
        requested = requested_fidelity(headers.get(FIDELITY_HEADER), layer.sessions.get(session) if session else None)
        _apply(adapted, plan, layer, headers, requested)
    return adapted, processed


@contextlib.contextmanager
def _openai_status():
    """A memory refusal inside an OpenAI conversion keeps its status (an unknown or expired session:
    404, not SGLang's 400 for a ValueError), in SGLang's OpenAI error shape (HTTPException)."""
    try:
        yield
    except memory.MemoryError_ as err:
        raise HTTPException(status_code=err.status, detail=str(err)) from None


_fidelity: FidelityControl | None = None


def fidelity_control(layer: memory.MemoryLayer) -> FidelityControl:
    """The server's fidelity knob and guard (built at first use, from the launcher's amem config)."""
    global _fidelity
    if _fidelity is None:
        _fidelity = FidelityControl(AmemConfig.from_env(), layer.base_url, layer.request_headers)
    return _fidelity


def _apply(adapted, plan: memory.Plan, layer: memory.MemoryLayer, headers, requested: str | None = None) -> None:
    if adapted.rid is None:
        adapted.rid = f"amem-{uuid.uuid4().hex}"
    rid = adapted.rid if isinstance(adapted.rid, str) else adapted.rid[0]
    adapted.text = None
    adapted.input_ids = plan.input_ids
    # exact / guarded / fast (amem_sgl.memory.fidelity); a guarded turn's probe runs here, in the
    # conversion's executor thread, before anything is sampled.
    control, started = fidelity_control(layer), time.perf_counter()
    requested = requested if requested is not None else headers.get(FIDELITY_HEADER)
    adapted.kv_hints = control.apply(rid, plan.namespace, plan.input_ids, plan.kv_hints,
                                     requested, headers.get(MARGIN_HEADER))
    if control.level(requested) == "guarded":
        plan.timings["guard_s"] = time.perf_counter() - started
    layer.remember_plan(rid, plan)
    plan.timings["sent_at"] = time.perf_counter()


def _own_plan(rid: str | None) -> memory.Plan | None:
    """The memory plan stored under ``rid`` if the current request's key covers its namespace: a
    client may send any ``rid``, also that of another tenant's finished memory turn."""
    layer = memory.ACTIVE
    plan = layer.plan_for(rid) if layer is not None else None
    return plan if plan is not None and auth.denial([plan.namespace]) is None else None


def turn_timings(rid: str | None, records) -> dict | None:
    """``usage.amem.timings`` of a memory turn (amem_sgl.memory.timings): its plan's HTTP phases and
    its response's scheduler usage records (``meta_info["amem"]``)."""
    plan = _own_plan(rid)
    return timings.merge({**plan.timings, **timings.stamps(rid)}, records) if plan is not None else None


def memory_usage(rid: str | None) -> dict | None:
    plan = _own_plan(rid)
    if plan is None:
        return None
    decision = _fidelity.report(rid) if _fidelity is not None else None
    return {**plan.report(), **(decision or {})}
