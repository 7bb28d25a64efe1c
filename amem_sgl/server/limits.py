"""ASGI middleware in SGLang's HTTP process: refuse bad requests before SGLang parses them.

* :class:`RequestBodyLimit` -- bodies over ``amem.server.max_request_bytes`` get 413 (SGLang would
  otherwise read, JSON-decode and tokenize a multi-megabyte prompt before finding it too long).
* :class:`ChunkHintsGuard` -- a ``/generate`` (POST or PUT, single or batch; also SGLang's Vertex
  route) request whose ``kv_hints`` carry a malformed ``amem.chunks`` action (bad namespace, spans
  out of order or past the prompt -- of each prompt of a batch --, oversized chunk, unknown fields,
  a field of the wrong JSON type, spans on a prompt that is not ``input_ids``) gets 400 with the
  reason, instead of being silently prefilled (the scheduler ignores an action it finds invalid).
* :class:`AuthGuard` -- with API keys (amem_sgl.server.auth), every request that uses a namespace
  (memory routes, OpenAI/Anthropic turns naming a namespace or session, ``/generate`` with chunk
  hints) needs a key covering it: 401 without a valid one, 403 for a namespace it does not cover,
  each in its API's error shape. It runs first of all (:func:`install_outermost`), before SGLang's
  own ``--api-key`` check, which it composes with: see :class:`AuthGuard`.
"""

from __future__ import annotations

import json
import os

from amem_sgl.chunks.hints import ACTION_TYPE, parse_kv_hints
from amem_sgl.server import auth as _auth


def error_body(message: str, status: int, kind: str) -> bytes:
    """An error in the shape SGLang's OpenAI layer uses, so SDKs surface the message."""
    return json.dumps({"object": "error", "message": message, "type": kind, "param": None,
                       "code": status}).encode()


class RequestBodyLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))

        # No (or a small) declared length: read the body, counting, and replay it downstream.
        body, interrupted, size = await _read_body(receive, limit=self.max_bytes)
        if interrupted is not None:
            return await self.app(scope, _replay(b"", receive, first=interrupted), send)
        if body is None:
            return await self._refuse(send, size, at_least=True)
        return await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, send, size: int, at_least: bool = False) -> None:
        await _send_json(send, 413, error_body(too_large(size, self.max_bytes, at_least), 413, "RequestTooLarge"))


def too_large(size: int, max_bytes: int, at_least: bool = False) -> str:
    return (f"request body is {'over ' if at_least else ''}{size} bytes; this server accepts at most "
            f"{max_bytes} bytes (amem.server.max_request_bytes)")


async def _read_body(receive, limit: int | None = None):
    """Read a request body: (body, None, size); (None, None, size) once it passes ``limit``;
    (None, message, size) when a non-body message (a disconnect) arrives first."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None, message, size
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if limit is not None and size > limit:
            return None, None, size
        more = message.get("more_body", False)
    return b"".join(chunks), None, size


async def _send_json(send, status: int, payload: bytes, extra_headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": payload})


def _replay(body: bytes, receive, first=None):
    """A ``receive`` that yields the buffered body (or ``first``) once, then the real ``receive``
    (so a streaming response still learns of a client disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return first if first is not None else {"type": "http.request", "body": body,
                                                     "more_body": False}
        return await receive()

    return replay


class ChunkHintsGuard:
    """Validates amem.chunks actions on POST /generate (after RequestBodyLimit bounded the body)."""

    PATHS = ("/generate",)
    METHODS = ("POST", "PUT")  # SGLang's /generate route takes both

    def __init__(self, app, max_chunk_tokens: int) -> None:
        self.app = app
        self.max_chunk_tokens = max_chunk_tokens
        # SGLang's Vertex AI route builds a /generate request from {"instances", "parameters"}.
        self.vertex_path = os.environ.get("AIP_PREDICT_ROUTE", "/vertex_generate")

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        if (scope["type"] != "http" or scope.get("method") not in self.METHODS
                or (path not in self.PATHS and path != self.vertex_path)):
            return await self.app(scope, receive, send)
        body, interrupted, _ = await _read_body(receive)
        if interrupted is not None:
            return await self.app(scope, _replay(b"", receive, first=interrupted), send)
        error = self.check(body, vertex=path == self.vertex_path) if may_name(body, ACTION_TYPE.encode()) else None
        if error:  # in the shape SGLang's native /generate uses for its own 400s
            return await _send_json(send, 400, json.dumps({"error": {"message": error}}).encode())
        return await self.app(scope, _replay(body, receive), send)

    def check(self, body: bytes, vertex: bool = False) -> str | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None  # SGLang answers malformed JSON itself
        if vertex:
            data = _vertex_as_generate(data)
        if not isinstance(data, dict):
            return None
        hints, input_ids = data.get("kv_hints"), data.get("input_ids")
        batch_ids = input_ids if isinstance(input_ids, list) and input_ids and all(
            isinstance(ids, list) for ids in input_ids) else None
        if isinstance(hints, list):
            pairs = list(zip(hints, batch_ids if batch_ids is not None else [input_ids] * len(hints)))
        else:  # SGLang hands a single envelope to every request of a batch: checked against each prompt
            pairs = [(hints, ids) for ids in batch_ids] if batch_ids is not None else [(hints, input_ids)]
        for envelope, ids in pairs:
            if not isinstance(envelope, dict):
                continue
            try:
                request = parse_kv_hints(envelope)
                if request is not None:
                    flat = isinstance(ids, list) and all(type(t) is int for t in ids)
                    if request.spans and not flat:
                        raise ValueError("amem.chunks: spans index the prompt's token ids, so a request with "
                                         "spans must send its prompt as input_ids (a list of integer token "
                                         "ids); a text or embedding prompt's spans cannot be checked")
                    request.validate(len(ids) if flat else None, self.max_chunk_tokens)
            except ValueError as err:
                return str(err)
        return None


def _vertex_as_generate(data):
    """The /generate fields SGLang's Vertex route builds from a body: the prompts of its instances
    (the first instance's text, input_ids or input_embeds, as SGLang picks them) and the kv_hints
    of its parameters."""
    if not isinstance(data, dict):
        return None
    instances, parameters = data.get("instances"), data.get("parameters")
    if not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
        return None  # SGLang answers it (no instances: nothing is generated)
    out = {"kv_hints": parameters.get("kv_hints") if isinstance(parameters, dict) else None}
    for key in ("text", "input_ids", "input_embeds"):
        if instances[0].get(key):
            out[key] = [instance.get(key) for instance in instances]
            break
    return out


# ---------------------------------------------------------------- API keys

MEMORY_PREFIX = "/amem/v1"
USER_PATHS = ("/v1/chat/completions", "/v1/completions", "/invocations", "/v1/responses")  # `user` = namespace
HINT_PATHS = ("/generate",)  # amem.chunks actions in kv_hints
_KINDS = {401: "authentication_error", 403: "permission_error", 413: "request_too_large",
          415: "invalid_request_error", 503: "service_unavailable"}


def denial_response(path: str, status: int, message: str) -> bytes:
    """An auth (or guard) error in the shape of the API ``path`` belongs to."""
    kind = _KINDS.get(status, "invalid_request_error")
    if path == MEMORY_PREFIX or path.startswith(MEMORY_PREFIX + "/"):
        return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    if path.startswith("/v1/messages"):
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    if path.startswith("/v1/responses"):
        return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    if path.startswith("/v1/") or path == "/invocations":
        return error_body(message, status, kind)
    return json.dumps({"error": {"message": message}}).encode()


def may_name(body: bytes, key: bytes) -> bool:
    """Whether a JSON body can spell ``key`` once decoded, so a guard must parse it: the bytes hold it,
    or a JSON escape (``amem\\u002echunks``), or the body is UTF-16/32 (json.loads, as FastAPI parses
    bodies, reads those; their ASCII characters carry NUL bytes, which UTF-8 JSON never has)."""
    return key in body or b"\\u" in body or b"\x00" in body


def body_namespaces(path: str, body: bytes) -> tuple[bool, list[str]]:
    """(uses memory, namespaces named) of a request body: ``user`` on the OpenAI routes, the
    namespace of every amem.chunks action on ``/generate`` (single or batch)."""
    hint = path in HINT_PATHS
    marker = b"kv_hints" if hint else b"user"
    if not may_name(body, marker):
        return False, []
    try:
        data = json.loads(body)
    except ValueError:
        return False, []  # SGLang answers malformed JSON itself
    if not isinstance(data, dict):
        return False, []
    if not hint:
        user = data.get("user")
        return (True, [user]) if isinstance(user, str) and user else (False, [])
    hints = data.get("kv_hints")
    found, names = False, []
    for envelope in hints if isinstance(hints, list) else [hints]:
        actions = envelope.get("actions") if isinstance(envelope, dict) else None
        for action in actions if isinstance(actions, list) else []:
            if isinstance(action, dict) and action.get("action_type") == ACTION_TYPE:
                found = True  # a malformed one (no namespace) still needs a key; ChunkHintsGuard refuses it
                payload = action.get("payload")
                namespace = payload.get("namespace") if isinstance(payload, dict) else None
                if isinstance(namespace, str):
                    names.append(namespace)
    return found, names


class AuthGuard:
    """Authenticates ``Authorization: Bearer`` and authorizes the namespaces a request uses.

    Composition with SGLang's ``--api-key`` (same header): SGLang's key is an admin principal here,
    and an amem key is accepted in its place on the requests amem guards -- this guard, having
    authorized one, hands it on with SGLang's key in the header, so SGLang's check passes. Requests
    that use no namespace are SGLang's business and pass untouched: with ``--api-key`` they need
    SGLang's key (an amem key does not unlock plain inference or SGLang's admin routes); without it
    they are open, as in SGLang. The memory layer's internal token is always handed on this way.
    """

    def __init__(self, app, authenticator: "_auth.Authenticator", *, max_bytes: int,
                 session_namespace=lambda session_id: None, sglang_api_key: str | None = None) -> None:
        self.app = app
        self.auth = authenticator
        self.max_bytes = max_bytes
        self.session_namespace = session_namespace
        self.sglang_api_key = sglang_api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        # Every value of a repeated header counts (Starlette's headers.get, which SGLang and the memory
        # hooks use, returns the first one; a dict of them would keep the last).
        headers: dict[bytes, list[str]] = {}
        for k, v in scope.get("headers") or ():
            headers.setdefault(k.lower(), []).append(v.decode("latin-1"))
        try:
            principal, unavailable = self.auth.resolve(_auth.bearer_token((headers.get(b"authorization") or [None])[0])), None
        except _auth.AuthUnavailable as err:
            principal, unavailable = None, str(err)
        guarded = path == MEMORY_PREFIX or path.startswith(MEMORY_PREFIX + "/")
        needs: list[str] = list(headers.get(b"x-amem-namespace", ()))
        guarded = guarded or bool(needs) or b"x-amem-session" in headers
        for session_id in headers.get(b"x-amem-session", ()):
            owner = self.session_namespace(session_id)
            if owner:
                needs.append(owner)
        body = None
        if (self.auth.enabled and scope.get("method") == "POST" and path in USER_PATHS + HINT_PATHS
                and not (principal is not None and principal.name == "sglang-api-key")):
            if b"x-body-compressed" in headers:
                return await self._deny(send, path, 415, "compressed request bodies are not accepted on this "
                                                         "route while amem API keys are on")
            body, interrupted, size = await _read_body(receive, limit=self.max_bytes)
            if interrupted is not None:
                return await self.app(scope, _replay(b"", receive, first=interrupted), send)
            if body is None:
                return await self._deny(send, path, 413, too_large(size, self.max_bytes, at_least=True))
            uses, names = body_namespaces(path, body)
            guarded = guarded or uses
            needs += names
        if guarded and self.auth.enabled:
            status, message = None, None
            if unavailable:
                status, message = 503, "authentication is unavailable: the server's keys file cannot be read"
            elif principal is None:
                status, message = 401, "a valid amem API key is required (Authorization: Bearer <key>)"
            else:
                denied = next((n for n in needs if not principal.covers(n)), None)
                if denied is not None:
                    status, message = 403, f"this API key does not cover namespace {denied!r}"
            if status is not None:
                return await self._deny(send, path, status, message)
        if principal is not None and self.sglang_api_key and principal.name != "sglang-api-key" and (
                guarded or principal.name == "amem-internal"):
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers") or () if k.lower() != b"authorization"] + [
                (b"authorization", f"Bearer {self.sglang_api_key}".encode())]
        scope = _auth.record(scope, principal)  # raw_request.state, for the OpenAI conversion hooks
        token = _auth.CURRENT.set(principal)
        try:
            await self.app(scope, _replay(body, receive) if body is not None else receive, send)
        finally:
            _auth.CURRENT.reset(token)

    @staticmethod
    async def _deny(send, path: str, status: int, message: str) -> None:
        extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
        await _send_json(send, status, denial_response(path, status, message), extra)


def install_outermost(app, cls, **kwargs) -> None:
    """Run middleware ``cls`` before every other user middleware of ``app`` -- also before the ones
    added later (SGLang adds its ``--api-key`` check when the server starts): it is put first in
    the app's list when Starlette builds the middleware stack (at the first request)."""
    from starlette.middleware import Middleware

    build = app.build_middleware_stack

    def build_with_first():
        if not any(m.cls is cls for m in app.user_middleware):
            app.user_middleware.insert(0, Middleware(cls, **kwargs))
        return build()

    app.build_middleware_stack = build_with_first
