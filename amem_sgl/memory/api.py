"""The memory API on SGLang's FastAPI app (listed in its OpenAPI schema at /openapi.json); the OpenAI
integration (``user`` or ``X-Amem-Namespace`` names the namespace) is amem_sgl.memory.openai_routes.

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
import math
from typing import Any, Literal, Optional

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from amem_sgl.chunks.identity import is_chunk_id
from amem_sgl.memory import layer as memory
from amem_sgl.memory import timings
from amem_sgl.memory.errors import MemoryRoute, error
from amem_sgl.memory.store import UnknownChunk, UnknownNamespace, json_safe
from amem_sgl.server import auth
from amem_sgl.memory.openai_routes import OpenAIMemoryMiddleware, fidelity_control, session_namespace



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
    k: StrictInt = Field(default=4, ge=1, le=100)

    @field_validator("query")
    @classmethod
    def _something_to_recall(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("query must be non-empty text (it was empty or whitespace)")
        return query


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    namespace: StrictStr
    query: Optional[StrictStr] = None
    chunk_ids: Optional[list[StrictStr]] = None
    k: Optional[StrictInt] = Field(default=None, ge=1, le=100)
    fidelity: Optional[StrictStr] = None


def _authorize(namespace: str) -> str:
    """Refuse (401/403) unless the request's API key covers ``namespace``; returns it."""
    denied = auth.denial([namespace])
    if denied is not None:
        raise memory.MemoryError_(*denied)
    return namespace


def _layer() -> memory.MemoryLayer:
    if memory.ACTIVE is None:
        raise memory.MemoryError_(503, "the memory layer is disabled on this server (amem.memory.enabled)")
    return memory.ACTIVE


def _non_finite(value, where: str) -> str | None:
    """The path of the first NaN or Infinity in ``value`` (JSON has neither), else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        return next((p for k, v in value.items() if (p := _non_finite(v, f"{where}.{k}")) is not None), None)
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := _non_finite(v, f"{where}[{i}]")) is not None), None)
    return None


def check_metadata(body: "RememberRequest") -> None:
    """Metadata is stored and served as JSON: a NaN or Infinity (Python's JSON parser reads NaN,
    Infinity and 1e999) is refused before anything is stored, naming where it is."""
    fields = [(body.metadata, "metadata")]
    fields += [(d.metadata, f"documents[{i}].metadata") for i, d in enumerate(body.documents or [])]
    for value, where in fields:
        bad = _non_finite(value, where)
        if bad is not None:
            raise memory.MemoryError_(400, f"{bad}: metadata must be JSON: no NaN or Infinity")


def _check_ids(ids) -> None:
    bad = [i for i in ids if not is_chunk_id(i)]
    if bad:
        raise memory.MemoryError_(400, f"invalid chunk id {bad[0][:80]!r}: expected 64 hex characters")


router = APIRouter(prefix="/amem/v1", tags=["amem memory"], route_class=MemoryRoute)


@router.post("/remember", summary="Remember texts or documents in a namespace")
async def remember(body: RememberRequest):
    _authorize(body.namespace)
    check_metadata(body)
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
    return {"namespace": body.namespace, "results": [{**c.to_json(), "score": json_safe(s)} for c, s in hits]}


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
