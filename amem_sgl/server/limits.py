"""ASGI middleware that refuses oversized request bodies with 413 before anything parses them.

SGLang would otherwise read, JSON-decode and tokenize a multi-megabyte prompt before finding it
longer than the context. The limit is ``amem.server.max_request_bytes``.
"""

from __future__ import annotations

import json


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
