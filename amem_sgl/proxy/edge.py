"""The proxy's outermost layer, as a plain ASGI middleware: a request body over ``max_bytes`` is a
413 (by its Content-Length, before anything is read, or as a chunked body passes the limit), and a
proxy failure is a 502, both in the API's error shape: the proxy never answers 500.

A plain middleware, not an ``exception_handler(Exception)``: after one of those Starlette re-raises,
and the server drops the client's keep-alive connection, so its next request on it is reset.
"""

from __future__ import annotations

import logging

from amem_sgl.proxy.guard import api_of, error_response

logger = logging.getLogger(__name__)
DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # Anthropic's own request limit; OpenAI's chat limit is larger per file only


class TooLarge(Exception):
    pass


class Edge:
    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = api_of(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(api, scope, receive, send)
        started, seen = False, 0

        async def receiving():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise TooLarge
            return message

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except TooLarge:
            if started:
                raise
            await self._too_large(api, scope, receive, send)
        except Exception as exc:
            logger.exception("proxy failure on %s", scope.get("path"))
            if started:  # mid-stream: the response cannot be replaced
                raise
            await error_response(api, 502, f"amem proxy failed: {exc!r}", "api_error")(scope, receive, send)

    async def _too_large(self, api: str, scope, receive, send) -> None:
        await error_response(api, 413, f"the request body is over the proxy's limit of {self.max_bytes} bytes "
                                       "(--max-request-bytes)")(scope, receive, send)
