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
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay(b"", receive, first=message), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send, size, at_least=True)
            more = message.get("more_body", False)
        return await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send, size: int, at_least: bool = False) -> None:
        body = error_body(
            f"request body is {'over ' if at_least else ''}{size} bytes; this server accepts at most "
            f"{self.max_bytes} bytes (amem.server.max_request_bytes)",
            413, "RequestTooLarge",
        )
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


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
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay(b"", receive, first=message), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        error = self.check(body) if ACTION_TYPE.encode() in body else None
        if error:  # in the shape SGLang's native /generate uses for its own 400s
            payload = json.dumps({"error": {"message": error}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            return await send({"type": "http.response.body", "body": payload})
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
