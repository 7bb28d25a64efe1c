"""ASGI middleware in SGLang's HTTP process: refuse bad requests before SGLang parses them.

* :class:`RequestBodyLimit` -- bodies over ``amem.server.max_request_bytes`` get 413 (SGLang would
  otherwise read, JSON-decode and tokenize a multi-megabyte prompt before finding it too long).
* :class:`ChunkHintsGuard` -- a ``/generate`` request whose ``kv_hints`` carry a malformed
  ``amem.chunks`` action (bad namespace, spans out of order or past the prompt, oversized chunk,
  unknown fields) gets 400 with the reason, instead of being silently prefilled.
"""

from __future__ import annotations

import json

from amem_sgl.chunks.hints import ACTION_TYPE, parse_kv_hints


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
        await _send_json(send, 413, error_body(
            f"request body is {'over ' if at_least else ''}{size} bytes; this server accepts at most "
            f"{self.max_bytes} bytes (amem.server.max_request_bytes)",
            413, "RequestTooLarge",
        ))


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


async def _send_json(send, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
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

    def __init__(self, app, max_chunk_tokens: int) -> None:
        self.app = app
        self.max_chunk_tokens = max_chunk_tokens

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.PATHS:
            return await self.app(scope, receive, send)
        body, interrupted, _ = await _read_body(receive)
        if interrupted is not None:
            return await self.app(scope, _replay(b"", receive, first=interrupted), send)
        error = self.check(body) if ACTION_TYPE.encode() in body else None
        if error:  # in the shape SGLang's native /generate uses for its own 400s
            return await _send_json(send, 400, json.dumps({"error": {"message": error}}).encode())
        return await self.app(scope, _replay(body, receive), send)

    def check(self, body: bytes) -> str | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None  # SGLang answers malformed JSON itself
        if not isinstance(data, dict):
            return None
        hints, input_ids = data.get("kv_hints"), data.get("input_ids")
        batch = isinstance(hints, list)
        hints_list = hints if batch else [hints]
        ids_list = input_ids if batch and isinstance(input_ids, list) else [input_ids] * len(hints_list)
        for envelope, ids in zip(hints_list, ids_list):
            if not isinstance(envelope, dict):
                continue
            try:
                request = parse_kv_hints(envelope)
                if request is not None:
                    flat = isinstance(ids, list) and all(type(t) is int for t in ids)
                    request.validate(len(ids) if flat else None, self.max_chunk_tokens)
            except ValueError as err:
                return str(err)
        return None
