"""The proxy's HTTP app: OpenAI ``/v1/chat/completions`` and Anthropic ``/v1/messages`` with memory,
the memory API on the server's paths, and everything else passed through to the upstream.

A chat request names its namespace with ``X-Amem-Namespace``, OpenAI's ``user`` or Anthropic's
``metadata.user_id``; one that names none is forwarded untouched (body bytes and headers, streamed
back as they come). Bad input gets the API's own error shape with a 4xx; upstream errors are passed
on with their status and message, in the API's shape on the OpenAI/Anthropic paths (``/v1/...``:
an SGLang upstream answers in its own), as they came elsewhere; an unreachable upstream is 502 and
a timeout 504: the proxy never answers 500.
:func:`authorize` (amem_sgl.proxy.guard) is the one place a namespace is checked against the caller:
with a keys file (``ProxyConfig.keys_file``, held in ``app.state.amem_keys``) the caller's amem key,
sent in ``X-Amem-Api-Key`` (never forwarded upstream), must cover the namespace; without one it is a
no-op. A request that names no namespace touches no memory and needs no amem key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from amem_sgl.chunks.identity import validate_namespace
from amem_sgl.proxy import guard, layout, pricing
from amem_sgl.proxy.backend import BackendError, LocalBackend, RemoteBackend
from amem_sgl.proxy.edge import DEFAULT_MAX_BYTES, Edge
from amem_sgl.proxy.guard import (ProxyError, api_of, as_sent, authorize, authorize_passthrough,  # noqa: F401
                                  error_response, reshaped)
from amem_sgl.proxy.memory_routes import memory_router
from amem_sgl.proxy.sessions import SessionStore, digest, session_key
from amem_sgl.proxy.usage import Report, stream_with_usage
from amem_sgl.server.auth import PROXY_KEY_HEADER, KeyStore

HOP = {"host", "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
       "te", "trailer", "transfer-encoding", "upgrade", PROXY_KEY_HEADER}  # the amem key stays here
NAMESPACE_HEADER, SESSION_HEADER = "x-amem-namespace", "x-amem-session"
API_OF_PATH = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}


@dataclasses.dataclass
class ProxyConfig:
    upstream: str
    memory_url: str | None = None
    store_dir: str | None = None
    state_dir: str = "~/.cache/amem_sgl/proxy"
    k: int = 6  # chunks recalled per turn
    block_k: int = 12  # chunks in a (re)built memory block
    drift: float = 0.5  # rebuild the block when more than this share of the top-k is not in it
    focus: int = 1  # the best recalled chunks repeated in the newest turn even when the block has them
    ttl: str = "5m"  # Anthropic cache_control TTL: 5m or 1h
    timeout_s: float = 600.0
    prices: dict = dataclasses.field(default_factory=lambda: pricing.PRICES)
    keys_file: str | None = None  # amem keys (amem keys add): auth is on when set
    memory_api_key: str | None = None  # the key shown to the --memory server (None: the caller's own)
    max_request_bytes: int = DEFAULT_MAX_BYTES  # a larger request body is a 413


def _headers_out(request: Request, drop: set[str] = frozenset()) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.headers.items() if k not in HOP and k not in drop]


def _headers_back(reply: httpx.Response, drop: set[str] = frozenset()) -> dict:
    return {k: v for k, v in reply.headers.items() if k not in HOP and k not in drop}


def create_app(config: ProxyConfig) -> FastAPI:
    client = httpx.AsyncClient(timeout=httpx.Timeout(config.timeout_s), follow_redirects=False)
    for name in list(client.headers):  # no default headers: a pass-through adds nothing of its own
        del client.headers[name]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    app = FastAPI(title="amem proxy", docs_url=None, redoc_url=None, lifespan=lifespan)
    if config.keys_file:
        app.state.amem_keys = KeyStore(config.keys_file)  # ValueError (said at start) when unreadable
    if config.memory_url:
        backend = RemoteBackend(config.memory_url, client)
    else:
        backend = LocalBackend(config.store_dir or "~/.cache/amem_sgl/proxy/memory")
    sessions = SessionStore(config.state_dir)
    upstream = config.upstream.rstrip("/")
    app.state.config, app.state.backend, app.state.sessions = config, backend, sessions

    async def send(api: str, request: Request, base: str, body: bytes, headers) -> httpx.Response | JSONResponse:
        url = base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            return await client.send(client.build_request(request.method, url, content=body, headers=as_sent(headers)),
                                     stream=True)
        except httpx.TimeoutException as err:
            return error_response(api, 504, f"upstream {base} timed out: {err}", "timeout_error")
        except httpx.HTTPError as err:
            return error_response(api, 502, f"upstream {base} unreachable: {err!r}", "api_error")

    async def passthrough(request: Request, api: str, base: str = upstream, body: bytes | None = None) -> Response:
        raw = await request.body() if body is None else body
        authorize_passthrough(request, raw)  # with keys on: only namespaces the caller's key covers
        reply = await send(api, request, base, raw, _headers_out(request))
        if isinstance(reply, Response):
            return reply
        if reply.status_code >= 400 and request.url.path.startswith("/v1/"):  # in the API's shape
            return await _error_back(api, reply)
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=_headers_back(reply),
                                 background=_closer(reply))

    @app.get("/health")
    async def health():
        return {"status": "ok", "upstream": upstream, "memory": config.memory_url or "local store"}

    app.include_router(memory_router(backend, sessions, config.memory_api_key))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(api_of(request.url.path), 422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):  # 404, 405, an unparsable body
        return error_response(api_of(request.url.path), exc.status_code, str(exc.detail))

    @app.exception_handler(ProxyError)
    async def _refused(request: Request, exc: ProxyError):
        return error_response(api_of(request.url.path), exc.status, str(exc), exc.kind)

    @app.exception_handler(BackendError)
    async def _backend(request: Request, exc: BackendError):
        kind = {401: "authentication_error", 403: "permission_error"}.get(exc.status, "api_error")
        return error_response(api_of(request.url.path), exc.status, str(exc), kind)

    app.add_middleware(Edge, max_bytes=config.max_request_bytes)  # 413 over the limit; 502, never 500

    async def chat(request: Request) -> Response:
        api = API_OF_PATH[request.url.path]
        raw = await request.body()
        header_ns = request.headers.get(NAMESPACE_HEADER)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if header_ns is None and _named(api, body) is None:
            return await passthrough(request, api, body=raw)  # no namespace: forwarded as it came
        if not isinstance(body, dict):
            raise ProxyError(400, "the request body must be a JSON object")
        namespace = header_ns if header_ns is not None else _named(api, body)
        try:
            validate_namespace(namespace)
        except ValueError as err:
            raise ProxyError(400, f"{_NAMED_BY[api] if header_ns is None else 'X-Amem-Namespace'}: {err}") from None
        _check_fields(api, body)
        authorize(request, namespace)  # before any memory is read or anything is sent upstream
        named = _named(api, body)
        if isinstance(named, str) and named != namespace:  # forwarded as it came: an amem upstream reads it
            authorize(request, named)
        forwarded, report = await _compose(api, request, body, namespace)
        headers = _headers_out(request, {"content-length", "accept-encoding", NAMESPACE_HEADER, SESSION_HEADER})
        reply = await send(api, request, upstream, json.dumps(forwarded).encode(), headers)
        if isinstance(reply, Response):
            return reply
        marks = {"x-amem-namespace": namespace, "x-amem-session": report.session,
                 "x-amem-chunks": ",".join(report.turn.chunk_ids)}
        back = _headers_back(reply, {"content-length", "content-encoding"})
        if reply.status_code >= 400:  # the upstream's own error, in the API's shape
            return await _error_back(api, reply)
        if forwarded.get("stream"):
            return StreamingResponse(stream_with_usage(reply.aiter_bytes(), report), status_code=reply.status_code,
                                     headers={**back, **marks}, background=_closer(reply))
        content = await reply.aread()
        await reply.aclose()
        try:
            data = report.add_to(json.loads(content))
        except ValueError:
            return Response(content, status_code=reply.status_code, headers={**back, **marks})
        return JSONResponse(data, status_code=reply.status_code, headers={**marks, **{
            k: v for k, v in back.items() if k != "content-type"}})

    async def _compose(api: str, request: Request, body: dict, namespace: str) -> tuple[dict, Report]:
        messages = body["messages"]
        newest = layout.last_user(messages)
        system = body.get("system") if api == "anthropic" else [
            m for m in messages[: newest or 0] if m.get("role") in ("system", "developer")]
        first_user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
        try:
            key = session_key(api, namespace, request.headers.get(SESSION_HEADER), system, first_user)
        except ValueError as err:
            raise ProxyError(400, str(err)) from None
        async with sessions.lock(key):
            session = sessions.get(key, namespace)
            shown = guard.memory_headers(request, config.memory_api_key) if config.memory_url else None
            known = await backend.inventory(namespace, shown)
            recalled = []
            fresh = newest is not None and layout.turn_key(newest, messages[newest]) not in session.turns
            if fresh:
                query = layout.text_of(messages[newest].get("content"))
                recalled = await backend.recall(namespace, query, config.block_k, shown) if query.strip() else []
            turn, new_chunks = layout.plan_memory(session, recalled, known, config.k, config.drift,
                                                    config.focus)
            inject, turn.replayed = layout.injections(session, messages, newest if fresh else None, new_chunks, known)
            if api == "openai":
                forwarded = layout.openai_layout(body, session, turn, inject, digest("amem-namespace", namespace)[:32])
            else:
                forwarded = layout.anthropic_layout(body, session, turn, inject, config.ttl)
            session.requests += 1
            sessions.save(session)
        injected_ids = list(turn.block_ids)
        for i in inject:
            injected_ids += session.turns[layout.turn_key(i, messages[i])]["ids"]
        report = Report(api, body.get("model"), namespace, key, turn, sum(known.get(c, 0) for c in injected_ids),
                        sum(known.values()), config.ttl, config.prices)
        return forwarded, report

    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/messages", chat, methods=["POST"])

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    async def everything_else(request: Request):
        return await passthrough(request, "anthropic" if request.url.path.startswith("/v1/messages") else "openai")

    return app


_NAMED_BY = {"openai": "user", "anthropic": "metadata.user_id"}


def _named(api: str, body):
    """The namespace the body names (``user`` / ``metadata.user_id``), whatever its type; None: none."""
    if not isinstance(body, dict):
        return None
    if api == "openai":
        return body.get("user")
    meta = body.get("metadata")
    return meta.get("user_id") if isinstance(meta, dict) else None


def _check_fields(api: str, body: dict) -> None:
    """The fields the memory layout reads, checked before it reads them (ProxyError 400); the rest is
    the upstream's to check."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ProxyError(400, "messages: a non-empty list of message objects is required")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ProxyError(400, "model: must be a string")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ProxyError(400, "tools: must be a list of tool objects")
    if api != "anthropic":
        return
    system = body.get("system")
    if system is not None and not isinstance(system, str) and not (
            isinstance(system, list) and all(isinstance(b, dict) for b in system)):
        raise ProxyError(400, "system: must be a string or a list of content blocks")
    for i, m in enumerate(messages):
        if not isinstance(m.get("content"), (str, list)):
            raise ProxyError(400, f"messages.{i}.content: must be a string or a list of content blocks")


async def _error_back(api: str, reply: httpx.Response) -> Response:
    """The upstream's error: its status and message, in ``api``'s shape (as it came when it already is)."""
    content = await reply.aread()
    await reply.aclose()
    shaped = reshaped(api, reply.status_code, content)
    headers = _headers_back(reply, {"content-length", "content-encoding"} | ({"content-type"} if shaped else set()))
    if shaped is None:
        return Response(content, status_code=reply.status_code, headers=headers)
    shaped.headers.update(headers)
    return shaped


def _closer(reply: httpx.Response):
    from starlette.background import BackgroundTask

    return BackgroundTask(reply.aclose)
