"""The OpenAI integration of the memory layer: ``user`` (or the ``X-Amem-Namespace`` header) names
the memory namespace, ``X-Amem-Session`` a session (amem_sgl.memory.api serves the memory routes).

The middleware gives a memory turn a fresh request id (a client's ``rid`` only its prefix) and
reports the recalled chunks in the ``X-Amem-Chunks`` response header; the conversion hooks
(SGLang's chat/completion request conversion) compose the turn's prompt from recalled chunks;
``memory_usage``/``turn_timings`` feed ``usage.amem``, of the request's own plan only. Errors answer in SGLang's OpenAI shape: an unknown or expired ``X-Amem-Session``
404 (chat and completions alike); ``amem_fidelity`` in the body wins over the ``X-Amem-Fidelity``
header.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import time
import uuid

from fastapi import HTTPException
from starlette.datastructures import Headers

from amem_sgl.config import AmemConfig
from amem_sgl.memory import layer as memory
from amem_sgl.memory import timings
from amem_sgl.memory.fidelity import (FIDELITY_FIELD, FIDELITY_HEADER, MARGIN_HEADER, FidelityControl,
                                      parse_fidelity, parse_margin, requested_fidelity)
from amem_sgl.server import auth
from amem_sgl.server.limits import _read_body, _replay, _send_json, error_body

NAMESPACE_HEADER = "x-amem-namespace"
SESSION_HEADER = "x-amem-session"
CHUNKS_HEADER = "x-amem-chunks"
# The rid the middleware gave a memory turn, in its ASGI state (``raw_request.state``): the conversion
# hook, in an executor thread the context variables below do not reach, keeps a plan only under it.
RID_STATE_KEY = "amem_rid"
# (rid, namespace) of the OpenAI request being served, set by the middleware for every request it
# passes on ((None, None): not a memory turn); unset outside it (direct callers).
CURRENT_TURN: contextvars.ContextVar[tuple[str | None, str | None] | None] = contextvars.ContextVar(
    "amem_turn", default=None)


def session_namespace(session_id: str) -> str | None:
    """The namespace a live session belongs to (None: unknown, or idle past amem.memory.session_idle_s)."""
    layer = memory.ACTIVE
    session = layer.live_session(session_id) if layer is not None else None
    return session.namespace if session is not None else None


class OpenAIMemoryMiddleware:
    """For OpenAI chat/completions requests that name a namespace (``user`` or header) or a session:
    gives the request a fresh, unguessable id of its own -- never the client's ``rid``, which only
    stays its prefix -- so the conversion hook's plan is found again by this request alone, and
    reports the recalled chunks in the ``X-Amem-Chunks`` response header (streaming included)."""

    # /invocations: SGLang's SageMaker route, served by the chat handler (its conversion hook too)
    PATHS = ("/v1/chat/completions", "/v1/completions", "/invocations")

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.PATHS or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        received = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        body, early, _ = await _read_body(receive)
        if body is None:  # the client went away before sending it all: pass that on
            return await self.app(scope, _replay(b"", receive, early), send)
        try:
            data, parsed = (json.loads(body), True) if body.strip() else (None, False)
        except ValueError:
            data, parsed = None, False  # malformed JSON: SGLang answers it with its own 400
        rid = None
        # SGLang answers a JSON body that is not an object with a 500 (its before-validator calls
        # .get on it) and serves n < 0 as one choice: refuse both here, in the OpenAI error shape.
        refusal = None
        if parsed and not isinstance(data, dict):  # null, a string, a list, a number
            refusal = "the request body must be a JSON object"
        elif isinstance(data, dict) and "n" in data and (type(data["n"]) is not int or data["n"] < 1):
            refusal = f"n must be an integer >= 1, got {data['n']!r}"
        if refusal is not None:
            return await _send_json(send, 400, error_body(refusal, 400, "BadRequestError"))
        rewritten = False  # the body is serialised again once, after every change to it
        if isinstance(data, dict) and FIDELITY_FIELD in data:
            # The body field becomes the header, and replaces one the request also sent: the explicit
            # body field wins (every later reader -- chat, completions, the guard -- sees one value).
            value = data.pop(FIDELITY_FIELD)
            rewritten = True
            if value is not None:  # null: the field left out (the session's or the server's level)
                kept = [(k, v) for k, v in scope.get("headers", []) if k.lower() != FIDELITY_HEADER.encode()]
                scope = dict(scope, headers=[*kept, (FIDELITY_HEADER.encode(), str(value).encode())])
                headers[FIDELITY_HEADER] = str(value)
        if FIDELITY_HEADER in headers or MARGIN_HEADER in headers:
            try:
                if FIDELITY_HEADER in headers:
                    parse_fidelity(headers[FIDELITY_HEADER])
                if MARGIN_HEADER in headers:
                    parse_margin(headers[MARGIN_HEADER])
            except ValueError as err:
                return await _send_json(send, 400, error_body(str(err), 400, "BadRequestError"))
        if SESSION_HEADER in headers and memory.ACTIVE is not None and session_namespace(headers[SESSION_HEADER]) is None:
            message = f"unknown or expired session {headers[SESSION_HEADER]!r}"  # 404 as on the session routes
            return await _send_json(send, 404, error_body(message, 404, "NotFoundError"))
        namespace = None
        if isinstance(data, dict) and (data.get("user") or NAMESPACE_HEADER in headers or SESSION_HEADER in headers):
            # A fresh rid of its own, never the client's: plans are kept by rid, and a client may send
            # any rid -- another turn's in flight, or a finished one's (its response ``id``).
            rid = fresh_rid(data.get("rid"))
            data["rid"] = rid
            rewritten = True
            namespace = turn_namespace(scope.get("headers", []), data)
            scope = dict(scope, state={**(scope.get("state") or {}), RID_STATE_KEY: rid})
            timings.stamp(rid, "received_at", received)
        if rewritten:
            body = json.dumps(data).encode()

        async def send_with_chunks(message):
            if rid is not None and message["type"] == "http.response.start":
                plan = _own_plan(rid)
                if plan is not None:
                    extra = [(CHUNKS_HEADER.encode(), ",".join(plan.chunk_ids).encode()),
                             (NAMESPACE_HEADER.encode(), plan.namespace.encode())]
                    message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        # Re-declare the body length after a rewrite.
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"] + [
            (b"content-length", str(len(body)).encode())]
        token = timings.CURRENT_RID.set(rid)  # the streamed usage chunk finds its turn by it
        turn = CURRENT_TURN.set((rid, namespace))  # the only plan this request may report (_own_plan)
        try:
            await self.app(scope, _replay(body, receive), send_with_chunks)
        finally:
            CURRENT_TURN.reset(turn)
            timings.CURRENT_RID.reset(token)


def fresh_rid(client_rid=None) -> str:
    """A memory turn's request id: unguessable, and new for every turn (a client's string rid stays
    its prefix, for tracing)."""
    suffix = f"amem-{uuid.uuid4().hex}"
    return f"{client_rid}.{suffix}" if isinstance(client_rid, str) and client_rid else suffix


def turn_namespace(raw_headers, data: dict) -> str | None:
    """The namespace a memory turn's plan must have, read as the conversion hook reads it (Starlette's
    headers: a header's first value): the session's (it wins in the memory layer), else
    ``X-Amem-Namespace``, else the body's ``user``."""
    headers = Headers(raw=raw_headers)
    session = headers.get(SESSION_HEADER)
    if session:
        return session_namespace(session)
    user = data.get("user")
    return headers.get(NAMESPACE_HEADER) or (user if isinstance(user, str) else None)


def around_chat_conversion(original, serving, request, raw_request=None):
    """AROUND hook for ``OpenAIServingChat._convert_to_internal_request``: a turn that names a memory
    namespace (``user``, ``X-Amem-Namespace``) or session (``X-Amem-Session``) gets its prompt
    composed from recalled chunks (token ids + chunk spans in kv_hints)."""
    started = time.perf_counter()
    adapted, processed = original(serving, request, raw_request)
    converted = time.perf_counter()
    layer = memory.ACTIVE
    if layer is None:
        return adapted, processed
    headers = raw_request.headers if raw_request is not None else {}
    namespace = headers.get(NAMESPACE_HEADER) or getattr(request, "user", None)
    session = headers.get(SESSION_HEADER)
    if not namespace and not session:
        return adapted, processed
    _authorize(raw_request, namespace, session)
    # exact: the memory layer's exact mode (a stable working set, turns as exact prefills)
    requested = requested_fidelity(headers.get(FIDELITY_HEADER), layer.sessions.get(session) if session else None)
    level = fidelity_control(layer).level(requested)
    with _openai_status():
        plan = layer.plan_chat(namespace, memory.message_dicts(request.messages), session,
                               fidelity=level, reserve_tokens=_reserve(request))
    if plan is not None:
        plan.timings.update(started_at=started, convert_s=converted - started)
        _apply(adapted, plan, layer, headers, requested, raw_request)
    return adapted, processed


def around_completion_conversion(original, serving, request, raw_request=None):
    """AROUND hook for ``OpenAIServingCompletion._convert_to_internal_request`` (text prompts): a
    namespace's recalled chunks, or -- with ``X-Amem-Session``, as on the chat route -- the session's
    working set (its namespace wins; its level applies unless the turn names its own).

    A memory turn's prompt is one text: ``["text"]`` is served as ``"text"``; several prompts or
    token ids are a 400 where the namespace (or session) has memory, a plain turn where it has none."""
    started = time.perf_counter()
    layer = memory.ACTIVE
    headers = raw_request.headers if raw_request is not None else {}
    namespace = headers.get(NAMESPACE_HEADER) or getattr(request, "user", None)
    session = headers.get(SESSION_HEADER)
    if layer is None or not (namespace or session):
        return original(serving, request, raw_request)
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        request.prompt = prompt = prompt[0]  # ["text"] is "text": one request, not a batch of one
    if not isinstance(prompt, str):
        _authorize(raw_request, namespace, session)  # before anything about the namespace is told
        if _has_memory(layer, namespace, session):
            raise HTTPException(status_code=400, detail="a memory turn takes one text prompt (a string, or a list "
                                "of one string); got several prompts or token ids")
        return original(serving, request, raw_request)  # nothing remembered: a plain turn, as before
    adapted, processed = original(serving, request, raw_request)
    converted = time.perf_counter()
    _authorize(raw_request, namespace, session)
    with _openai_status():
        plan = layer.plan_completion(namespace, request.prompt, session, reserve_tokens=_reserve(request))
    if plan is not None:
        plan.timings.update(started_at=started, convert_s=converted - started)
        requested = requested_fidelity(headers.get(FIDELITY_HEADER), layer.sessions.get(session) if session else None)
        _apply(adapted, plan, layer, headers, requested, raw_request)
    return adapted, processed


def _has_memory(layer: memory.MemoryLayer, namespace: str | None, session: str | None) -> bool:
    """Whether a turn naming ``namespace`` or ``session`` would be a memory turn (the session's
    namespace wins, as in the memory layer); an unknown or expired session is its 404, a bad
    namespace name its 400."""
    if session:
        namespace = session_namespace(session)
        if namespace is None:
            raise HTTPException(status_code=404, detail=f"unknown or expired session {session!r}")
    if not namespace:
        return False
    try:
        memory.validate_namespace(namespace)
    except ValueError as err:
        raise HTTPException(status_code=400, detail=str(err)) from None
    with _openai_status():
        return layer.store.has_namespace(namespace)


def _reserve(request) -> int:
    """The tokens a turn asks to generate (``max_completion_tokens``, else ``max_tokens``): the
    memory layer leaves them free when it fits recalled chunks into the context (0: unset)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(request, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _authorize(raw_request, namespace: str | None, session: str | None) -> None:
    """Behind AuthGuard, before anything is recalled: the key the guard recorded on ``raw_request``
    (this executor thread does not see auth.CURRENT) must cover the turn's namespace and its
    session's; none recorded fails closed. 401/403 in SGLang's OpenAI error shape."""
    if not auth.enabled():
        return
    owner = session_namespace(session) if session else None
    refused = auth.request_denial(raw_request, [n for n in (namespace, owner) if n])
    if refused is not None:
        raise HTTPException(status_code=refused[0], detail=refused[1])


@contextlib.contextmanager
def _openai_status():
    """A memory refusal inside an OpenAI conversion keeps its status (an unknown or expired session:
    404, not SGLang's 400 for a ValueError), in SGLang's OpenAI error shape (HTTPException)."""
    try:
        yield
    except memory.MemoryError_ as err:
        raise HTTPException(status_code=err.status, detail=str(err)) from None


_fidelity: FidelityControl | None = None


def fidelity_control(layer: memory.MemoryLayer) -> FidelityControl:
    """The server's fidelity knob and guard (built at first use, from the launcher's amem config)."""
    global _fidelity
    if _fidelity is None:
        _fidelity = FidelityControl(AmemConfig.from_env(), layer.base_url, layer.request_headers)
    return _fidelity


def _apply(adapted, plan: memory.Plan, layer: memory.MemoryLayer, headers, requested: str | None = None,
           raw_request=None) -> None:
    # The plan is kept under the rid the middleware minted for this turn; a request that reached the
    # conversion without it (a client's own rid) gets a fresh one: never a rid a client chose.
    minted = _minted_rid(raw_request)
    if minted is None or adapted.rid != minted:
        adapted.rid = fresh_rid(adapted.rid)
    rid = adapted.rid
    adapted.text = None
    adapted.input_ids = plan.input_ids
    # exact / guarded / fast (amem_sgl.memory.fidelity); a guarded turn's probe runs here, in the
    # conversion's executor thread, before anything is sampled.
    control, started = fidelity_control(layer), time.perf_counter()
    requested = requested if requested is not None else headers.get(FIDELITY_HEADER)
    adapted.kv_hints = control.apply(rid, plan.namespace, plan.input_ids, plan.kv_hints,
                                     requested, headers.get(MARGIN_HEADER))
    if control.level(requested) == "guarded":
        plan.timings["guard_s"] = time.perf_counter() - started
    layer.remember_plan(rid, plan)
    plan.timings["sent_at"] = time.perf_counter()


def _minted_rid(raw_request) -> str | None:
    state = getattr(raw_request, "scope", None)
    state = state.get("state") if isinstance(state, dict) else None
    rid = state.get(RID_STATE_KEY) if isinstance(state, dict) else None
    return rid if isinstance(rid, str) else None


def _own_plan(rid: str | None) -> memory.Plan | None:
    """The memory plan stored under ``rid`` if it is the current request's own: within an OpenAI
    request, only the plan of the rid the middleware minted for it, of the namespace the request
    names; and always only if the request's key covers its namespace. (Every memory turn's rid is
    fresh, so a client sending another turn's rid -- in flight or finished -- finds nothing of it.)"""
    layer = memory.ACTIVE
    plan = layer.plan_for(rid) if layer is not None else None
    if plan is None:
        return None
    turn = CURRENT_TURN.get()
    if turn is not None and (turn[0] is None or rid != turn[0] or plan.namespace != turn[1]):
        return None
    return plan if auth.denial([plan.namespace]) is None else None


def turn_timings(rid: str | None, records) -> dict | None:
    """``usage.amem.timings`` of a memory turn (amem_sgl.memory.timings): its plan's HTTP phases and
    its response's scheduler usage records (``meta_info["amem"]``)."""
    plan = _own_plan(rid)
    return timings.merge({**plan.timings, **timings.stamps(rid)}, records) if plan is not None else None


def memory_usage(rid: str | None) -> dict | None:
    plan = _own_plan(rid)
    if plan is None:
        return None
    decision = _fidelity.report(rid) if _fidelity is not None else None
    return {**plan.report(), **(decision or {})}
