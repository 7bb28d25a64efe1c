"""The memory API on the amem server's paths and shapes (amem_sgl.memory.api), so the SDK
(amem_sgl.sdk.Amem) works against the proxy as against a server. With ``--store`` the proxy answers
from its own store; with ``--memory URL`` every ``/amem/v1`` request is forwarded to that server,
under the key amem_sgl.proxy.guard.memory_headers picks. Forgetting a namespace also drops its proxy
sessions (their memory blocks hold its text).

With auth on (a keys file), every route checks the caller's key against the namespace it touches
(amem_sgl.proxy.guard.authorize) before anything is read, written or forwarded; the namespace list
holds only the namespaces the key covers. Forwarded routes whose namespace the proxy cannot tell
(anything but the chunk, remember, search and session routes) are for admin keys only; a session is
ended only by a key that covers the namespace it was started in through this proxy.

Errors are in the memory API's shape (``{"error": {"message", "type", "code"}}``), the memory
server's included; a path or method no route here serves is a 404 / 405 of the proxy's own (the
local store serves no sessions: they need ``--memory``), never passed on to the chat upstream.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict

from fastapi import APIRouter, Request
from fastapi.responses import Response

from amem_sgl.memory.api import RememberRequest, SearchRequest, check_metadata
from amem_sgl.memory.errors import error
from amem_sgl.memory.store import UnknownChunk, UnknownNamespace, json_safe
from amem_sgl.proxy import guard
from amem_sgl.proxy.backend import BackendError, LocalBackend, RemoteBackend

# Request headers not sent to the memory server: hop-by-hop, the caller's keys (replaced by
# guard.memory_headers), and what httpx sets itself.
_NOT_FORWARDED = {"host", "connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "authorization", guard.PROXY_KEY_HEADER, "content-length",
                  "accept-encoding"}
_NOT_RETURNED = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
_SESSIONS_KEPT = 10_000


_METHODS = ["GET", "POST", "DELETE"]  # what the memory API serves; any other is a 405 here


def memory_router(backend, sessions, memory_key: str | None = None) -> APIRouter:
    router = APIRouter(prefix=guard.MEMORY_PREFIX)
    if isinstance(backend, RemoteBackend):
        _remote_routes(router, backend, sessions, memory_key)
    else:
        _local_routes(router, backend, sessions)

    @router.api_route("", methods=_ALL)
    @router.api_route("/{path:path}", methods=_ALL)
    async def unserved(request: Request, path: str = ""):  # last: only what no route above serves
        if request.method not in _METHODS or (path and _served_path(router, request)):
            return error(405, f"{request.method} is not served on {request.url.path}")
        note = " (sessions need the proxy's --memory server)" if path.startswith("sessions") else ""
        return error(404, f"{request.method} {request.url.path} is not a memory route of this proxy{note}")
    return router


_ALL = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def _served_path(router: APIRouter, request: Request) -> bool:
    """Whether a route above serves this path with another method (a 405, not a 404)."""
    from starlette.routing import Match

    scope = {"type": "http", "path": request.url.path, "method": "GET"}
    for method in _METHODS:
        scope["method"] = method
        for route in router.routes[:-2]:
            if route.matches(scope)[0] == Match.FULL:
                return True
    return False


def _remote_routes(router: APIRouter, backend: RemoteBackend, sessions, memory_key: str | None) -> None:
    started: OrderedDict[str, str] = OrderedDict()  # session id -> namespace, for sessions started here

    @router.api_route("/{path:path}", methods=_METHODS)
    async def remote(request: Request, path: str):
        raw = await request.body()
        scope, namespace = "open", None
        if guard.keys_of(request) is not None:
            body = None
            if request.method == "POST":
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    raise guard.ProxyError(400, "the request body is not valid JSON") from None
            scope, namespace = guard.remote_scope(request.method, path, body)
            if scope == "namespace":
                guard.authorize(request, namespace)
                if body is not None:
                    raw = json.dumps(body).encode()  # the memory server reads exactly what was checked
            elif scope == "session":
                owner = started.get(namespace)
                if owner is None and not _admin(request):
                    raise guard.ProxyError(404, f"unknown session {namespace!r} (not started through this proxy)")
                if owner is not None:
                    guard.authorize(request, owner)
            elif scope == "list":
                guard.principal(request)
            elif not _admin(request):
                raise guard.ProxyError(403, f"{request.method} {request.url.path} needs an admin amem key "
                                            "through the proxy")
        headers = guard.as_sent([(k, v) for k, v in request.headers.items() if k not in _NOT_FORWARDED]
                                + list(guard.memory_headers(request, memory_key).items()))
        # The path that was checked, not request.url.path (rebuilt from the Host header by Starlette).
        reply = await backend.send(request.method, f"{guard.MEMORY_PREFIX}/{path}", params=request.url.query or None,
                                   content=raw, headers=headers)
        content = reply.content
        back = {k: v for k, v in reply.headers.items() if k not in _NOT_RETURNED}
        if reply.status_code >= 400:
            shaped = guard.reshaped("memory", reply.status_code, content)  # the memory server's error, in its API's shape
            if shaped is not None:
                shaped.headers.update({k: v for k, v in back.items() if k != "content-type"})
                return shaped
        if reply.status_code < 300:
            content = _after(request, path, scope, content, sessions, started)
        return Response(content, status_code=reply.status_code, headers=back)


def _admin(request: Request) -> bool:
    who = guard.principal(request)
    return who is None or who.admin


def _after(request: Request, path: str, scope: str, content: bytes, sessions, started: OrderedDict) -> bytes:
    """What a successful forwarded reply changes here: the namespace list filtered to the caller's key,
    a started session's namespace noted, a forgotten namespace's proxy sessions dropped."""
    try:
        data = json.loads(content)
    except ValueError:
        return content
    if not isinstance(data, dict):
        return content
    if scope == "list" and isinstance(data.get("namespaces"), list):
        data["namespaces"] = guard.visible(request, [n for n in data["namespaces"] if isinstance(n, str)])
        return json.dumps(data).encode()
    if path == "sessions" and request.method == "POST" and isinstance(data.get("session_id"), str):
        started[data["session_id"]] = str(data.get("namespace"))
        while len(started) > _SESSIONS_KEPT:
            started.popitem(last=False)
    elif request.method == "DELETE" and path.startswith("namespaces/") and path.count("/") == 1:
        sessions.drop_namespace(path.split("/", 1)[1])
    return content


def _local_routes(router: APIRouter, backend: LocalBackend, sessions) -> None:
    store = backend.store

    def guarded(fn):
        async def run(*args):
            try:
                return await asyncio.to_thread(fn, *args)
            except UnknownNamespace as err:
                return error(404, f"unknown namespace {err.args[0]!r}: nothing remembered there")
            except UnknownChunk as err:
                return error(404, f"unknown chunk id {err.args[0]!r} in this namespace")
            except ValueError as err:
                return error(400, str(err))
            except BackendError as err:
                return error(err.status, str(err))
        return run

    @router.post("/remember")
    async def remember(body: RememberRequest, request: Request):
        guard.authorize(request, body.namespace)
        try:
            check_metadata(body)  # the server's rule: metadata is JSON, no NaN or Infinity
        except ValueError as err:  # memory's MemoryError_(400)
            return error(400, str(err))
        docs = [(t, dict(body.metadata)) for t in body.texts or []]
        docs += [(d.text, {**body.metadata, **d.metadata}) for d in body.documents or []]
        if not docs:
            return error(400, "nothing to remember: give 'texts' or 'documents'")

        def run():
            rows = backend.remember(body.namespace, docs)
            return {"namespace": body.namespace, "chunks": rows, "ids": [r["id"] for r in rows],
                    "new": sum(r["new"] for r in rows)}
        return await guarded(run)()

    @router.post("/search")
    async def search(body: SearchRequest, request: Request):
        guard.authorize(request, body.namespace)

        def run():
            hits = backend.search(body.namespace, body.query, body.k)
            return {"namespace": body.namespace, "results": [{**c.to_json(), "score": json_safe(s)} for c, s in hits]}
        return await guarded(run)()

    @router.get("/namespaces")
    async def namespaces(request: Request):
        return {"namespaces": guard.visible(request, store.namespaces())}

    @router.get("/namespaces/{namespace}/chunks")
    async def list_chunks(namespace: str, request: Request):
        guard.authorize(request, namespace)
        return await guarded(lambda: {"namespace": namespace, "chunks": [c.to_json() for c in store.list(namespace)]})()

    @router.get("/namespaces/{namespace}/chunks/{chunk_id}")
    async def get_chunk(namespace: str, chunk_id: str, request: Request):
        guard.authorize(request, namespace)
        return await guarded(lambda: store.get(namespace, chunk_id).to_json())()

    @router.delete("/namespaces/{namespace}/chunks/{chunk_id}")
    async def forget_chunk(namespace: str, chunk_id: str, request: Request):
        guard.authorize(request, namespace)
        return await guarded(lambda: {"namespace": namespace, "forgotten": store.forget(namespace, [chunk_id])})()

    @router.delete("/namespaces/{namespace}")
    async def forget_namespace(namespace: str, request: Request):
        guard.authorize(request, namespace)

        def run():
            gone = store.forget(namespace, None)
            sessions.drop_namespace(namespace)
            return {"namespace": namespace, "forgotten": gone}
        return await guarded(run)()
