"""The memory API on the amem server's paths and shapes (amem_sgl.memory.api), so the SDK
(amem_sgl.sdk.Amem) works against the proxy as against a server. With ``--store`` the proxy answers
from its own store; with ``--memory URL`` every ``/amem/v1`` request is forwarded to that server.
Forgetting a namespace also drops its proxy sessions (their memory blocks hold its text)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from fastapi import APIRouter, Request

from amem_sgl.memory.api import RememberRequest, SearchRequest, error
from amem_sgl.memory.store import UnknownChunk, UnknownNamespace
from amem_sgl.proxy.backend import LocalBackend

Forward = Callable[[Request], Awaitable]


def memory_router(backend, sessions, forward: Forward | None) -> APIRouter:
    router = APIRouter(prefix="/amem/v1")
    if forward is not None:
        @router.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
        async def remote(request: Request):
            if request.method == "DELETE" and request.url.path.count("/") == 4:  # /amem/v1/namespaces/{ns}
                sessions.drop_namespace(request.path_params["path"].split("/")[-1])
            return await forward(request)

        return router
    assert isinstance(backend, LocalBackend)
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
        return run

    @router.post("/remember")
    async def remember(body: RememberRequest):
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
    async def search(body: SearchRequest):
        def run():
            hits = store.search(body.namespace, body.query, body.k)
            return {"namespace": body.namespace, "results": [{**c.to_json(), "score": s} for c, s in hits]}
        return await guarded(run)()

    @router.get("/namespaces")
    async def namespaces():
        return {"namespaces": store.namespaces()}

    @router.get("/namespaces/{namespace}/chunks")
    async def list_chunks(namespace: str):
        return await guarded(lambda: {"namespace": namespace, "chunks": [c.to_json() for c in store.list(namespace)]})()

    @router.get("/namespaces/{namespace}/chunks/{chunk_id}")
    async def get_chunk(namespace: str, chunk_id: str):
        return await guarded(lambda: store.get(namespace, chunk_id).to_json())()

    @router.delete("/namespaces/{namespace}/chunks/{chunk_id}")
    async def forget_chunk(namespace: str, chunk_id: str):
        return await guarded(lambda: {"namespace": namespace, "forgotten": store.forget(namespace, [chunk_id])})()

    @router.delete("/namespaces/{namespace}")
    async def forget_namespace(namespace: str):
        def run():
            gone = store.forget(namespace, None)
            sessions.drop_namespace(namespace)
            return {"namespace": namespace, "forgotten": gone}
        return await guarded(run)()

    return router
