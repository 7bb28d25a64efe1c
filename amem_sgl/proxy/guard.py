"""Who may use a namespace through the proxy, and which key the proxy shows its memory server.

With a keys file (``--keys-file``, ``app.state.amem_keys``: the server's own
:class:`amem_sgl.server.auth.KeyStore` format, made by ``amem keys add``) every route that touches a
namespace checks the caller's amem key: 401 without a valid one, 403 for a namespace it does not
cover, 503 while the keys file cannot be read. Without one, nothing is checked here (the loopback
default; the proxy refuses a non-loopback ``--host`` unless ``--allow-open``).

**Where the caller's amem key goes.** On the chat routes the client's ``Authorization`` /
``x-api-key`` belong to the upstream provider and are forwarded to it, so the amem key travels in
``X-Amem-Api-Key`` (never forwarded upstream). On the memory routes (``/amem/v1/...``, the amem
server's own API) ``Authorization: Bearer <key>`` is accepted too, so the SDK and CLI work against
the proxy as against a server; ``X-Amem-Api-Key`` wins when both are sent.

**The key the proxy sends its memory server** (``--memory URL``): ``--memory-api-key`` /
``$AMEM_API_KEY`` when set (a key of the proxy's own, covering the namespaces it serves), else the
caller's amem key, passed on, so a memory server with auth on checks every caller itself.
"""

from __future__ import annotations

import json
import re

from fastapi import Request
from fastapi.responses import JSONResponse

from amem_sgl.chunks.identity import validate_namespace
from amem_sgl.memory.errors import error as memory_error
from amem_sgl.server.auth import PROXY_KEY_HEADER, AuthUnavailable, KeyStore, Principal

MEMORY_PREFIX = "/amem/v1"
_KINDS = {401: "authentication_error", 403: "permission_error"}
# The memory server's routes a scoped (non-admin) key may use through a remote-memory proxy; their
# namespace comes from the path or the JSON body. Segments are plain names: no dot segments.
_SEGMENT = r"[A-Za-z0-9_:@-][A-Za-z0-9_.:@-]*"
_NS_PATH = re.compile(rf"namespaces/(?P<ns>[^/]+)(?:/chunks(?:/{_SEGMENT})?)?")
BODY_ROUTES = {"remember", "search", "sessions"}  # POST, namespace in the body
_SESSION_PATH = re.compile(rf"sessions/(?P<sid>{_SEGMENT})")


class ProxyError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind or _KINDS.get(status, "invalid_request_error")


def error_response(api: str, status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """The error in the shape of ``api``: anthropic, openai, or memory (the amem server's own)."""
    if api == "anthropic":
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)
    if api == "memory":
        return memory_error(status, message)
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


def as_sent(headers) -> list[tuple[bytes, bytes]]:
    """(name, value) pairs as the bytes that came (Starlette decodes them as latin-1; a value need not
    be ASCII, which httpx refuses as text)."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def in_shape(api: str, data) -> bool:
    """Whether a decoded error body is already in ``api``'s shape, with a message."""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error["message"].strip():
        return False
    return data.get("type") == "error" if api == "anthropic" else isinstance(error.get("type"), str)


def message_of(data) -> str | None:
    """The message of an error body in another shape: SGLang's top-level ``message``, FastAPI's
    ``detail`` (a string, or validation errors), a nested ``error.message``."""
    if not isinstance(data, dict):
        return None
    nested = data.get("error") if isinstance(data.get("error"), dict) else {}
    detail = data.get("detail")
    if isinstance(detail, list):
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', ())[1:])}: {d.get('msg')}"
                           for d in detail if isinstance(d, dict)) or None
    for found in (data.get("message"), nested.get("message"), detail, data.get("error")):
        if isinstance(found, str) and found.strip():
            return found
    return None


def reshaped(api: str, status: int, content: bytes) -> JSONResponse | None:
    """An upstream's (or the memory server's) error body in ``api``'s shape, status kept; None when
    it already is. An OpenAI client of the proxy gets OpenAI's error object from an upstream that
    answers in another (SGLang: ``{"object": "error", "message": ...}``), and so on."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if in_shape(api, data):
        return None
    message = message_of(data) or content.decode("utf-8", "replace").strip()[:2000] or f"upstream answered {status}"
    kind = data.get("type") if isinstance(data, dict) and isinstance(data.get("type"), str) else None
    if kind in (None, "error"):
        kind = _KINDS.get(status, "invalid_request_error" if status < 500 else "api_error")
    return error_response(api, status, message, kind)


def api_of(path: str) -> str:
    if path == "/v1/messages":
        return "anthropic"
    return "memory" if path.startswith(MEMORY_PREFIX + "/") or path == MEMORY_PREFIX else "openai"


def caller_key(request: Request) -> str | None:
    """The caller's amem key: ``X-Amem-Api-Key``, or on the memory routes ``Authorization: Bearer``."""
    key = request.headers.get(PROXY_KEY_HEADER)
    if key:
        return key.strip()
    if api_of(request.url.path) == "memory":
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def keys_of(request: Request) -> KeyStore | None:
    return getattr(request.app.state, "amem_keys", None)


def principal(request: Request) -> Principal | None:
    """The caller's principal; None when auth is off. Raises ProxyError 401 (no valid key) or 503."""
    keys = keys_of(request)
    if keys is None:
        return None
    try:
        found = keys.lookup(caller_key(request))
    except AuthUnavailable:
        raise ProxyError(503, "authentication is unavailable: the keys file cannot be read", "api_error") from None
    if found is None:
        where = "X-Amem-Api-Key header" + (" or Authorization: Bearer" if api_of(request.url.path) == "memory"
                                                  else "; Authorization is the upstream provider's")
        raise ProxyError(401, f"a valid amem API key is required ({where})")
    return found


def authorize(request: Request, namespace: str) -> None:
    """Raise ProxyError(401/403/503) unless the caller may use ``namespace``; a no-op with auth off.
    The proxy's one namespace check: every route that touches a namespace calls it."""
    who = principal(request)
    if who is not None and not who.covers(namespace):
        raise ProxyError(403, f"this API key does not cover namespace {namespace!r}")


def named_namespaces(request: Request, raw: bytes) -> tuple[list[str], bool]:
    """What a request forwarded as it came could make an amem upstream use: the namespaces it names
    (``X-Amem-Namespace`` values, ``user``, ``metadata.user_id``, the namespace of every amem.chunks
    action in ``kv_hints``) and whether it names an ``X-Amem-Session``."""
    from amem_sgl.chunks.hints import ACTION_TYPE

    names = [v for k, v in request.headers.items() if k.lower() == "x-amem-namespace"]
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        meta = body.get("metadata")
        names += [n for n in (body.get("user"), meta.get("user_id") if isinstance(meta, dict) else None)
                  if isinstance(n, str)]
        hints = body.get("kv_hints")
        for envelope in hints if isinstance(hints, list) else [hints]:
            actions = envelope.get("actions") if isinstance(envelope, dict) else None
            for action in actions if isinstance(actions, list) else []:
                payload = action.get("payload") if isinstance(action, dict) else None
                if (isinstance(payload, dict) and action.get("action_type") == ACTION_TYPE
                        and isinstance(payload.get("namespace"), str)):
                    names.append(payload["namespace"])
    return names, any(k.lower() == "x-amem-session" for k in request.headers.keys())


def authorize_passthrough(request: Request, raw: bytes) -> None:
    """With amem keys on, a request the proxy forwards untouched may name only namespaces the
    caller's key covers (an amem upstream would serve them), and no X-Amem-Session (the upstream's
    sessions are not the proxy's to check): ProxyError 400/401/403. A no-op with auth off."""
    if keys_of(request) is None:
        return
    names, session = named_namespaces(request, raw)
    if session:
        raise ProxyError(400, "X-Amem-Session is not forwarded by a proxy with amem keys on: "
                              "use the proxy's own memory (X-Amem-Namespace or user)")
    for name in dict.fromkeys(names):
        authorize(request, name)


def visible(request: Request, namespaces: list[str]) -> list[str]:
    """The namespaces the caller's key covers (all with auth off; 401 without a valid key)."""
    who = principal(request)
    return list(namespaces) if who is None else [n for n in namespaces if who.covers(n)]


def memory_headers(request: Request, memory_key: str | None) -> dict[str, str]:
    """The Authorization the proxy sends its memory server for this caller (empty: none)."""
    key = memory_key or caller_key(request)
    return {"Authorization": f"Bearer {key}"} if key else {}


def remote_scope(method: str, path: str, body) -> tuple[str, str | None]:
    """What a forwarded ``/amem/v1/<path>`` request touches: ("namespace", ns), ("list", None) for the
    namespace list, ("session", session id) for ending one, or ("other", None): admin keys only."""
    if path == "namespaces" and method == "GET":
        return "list", None
    match = _NS_PATH.fullmatch(path)
    if match and method in ("GET", "DELETE"):
        return "namespace", _valid(match["ns"])
    if path in BODY_ROUTES and method == "POST":
        if not isinstance(body, dict) or not isinstance(body.get("namespace"), str):
            raise ProxyError(400, "the request body must be a JSON object with a string 'namespace'")
        return "namespace", _valid(body["namespace"])
    match = _SESSION_PATH.fullmatch(path)
    if match and method == "DELETE":
        return "session", match["sid"]
    return "other", None


def _valid(namespace: str) -> str:
    try:
        return validate_namespace(namespace)
    except ValueError as err:
        raise ProxyError(400, str(err)) from None
