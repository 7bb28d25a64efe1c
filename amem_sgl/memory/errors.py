"""The memory API's error shape (``{"error": {"message", "type", "code"}}``) and the route class that
answers every failure of a memory route in it."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from amem_sgl.memory import layer as memory
from amem_sgl.memory.store import UnknownChunk, UnknownNamespace

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error"}


def error(status: int, message: str) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line per field, without the values, files or lines."""
    return "; ".join(".".join(str(p) for p in e.get("loc", ()) if p != "body") + f": {e.get('msg', 'invalid')}"
                     for e in exc.errors()) or "invalid request"


class MemoryRoute(APIRoute):
    """Memory routes answer a ValueError (a bad namespace, text, id) with 400 and its message, and a
    body that does not validate in their own error shape (SGLang's app handler would answer 400 in
    its shape, with the handler's file and line in the message): malformed JSON 400, wrong types 422."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            try:
                return await handler(request)
            except (UnknownNamespace, UnknownChunk, memory.MemoryError_):
                raise
            except RequestValidationError as err:
                if any(e.get("type") == "json_invalid" for e in err.errors()):
                    return error(400, "the request body is not valid JSON")
                return error(422, validation_message(err))
            except ValueError as err:
                return error(400, str(err))

        return guarded
