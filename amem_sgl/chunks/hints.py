"""The request field that declares memory-chunk spans: an action in SGLang's ``kv_hints`` envelope.

SGLang 0.5.23's ``/generate`` (and ``Engine.generate``) accept ``kv_hints``, a versioned envelope of
typed actions carried untouched to the scheduler's request (``req.kv_hints``); "consumers ignore
actions they do not implement". amem's action::

    {"action_id": "...", "action_type": "amem.chunks", "action_version": "1",
     "payload": {"namespace": "alice", "spans": [[12, 40], [40, 75]], "register": false}}

``spans`` are half-open token ranges of the request's ``input_ids``, ascending and non-overlapping.
* ``register: false`` -- splice: each span whose chunk (namespace, tokens) is resident is served
  from its chunk node (KV copied, keys re-rotated to the span's positions); the rest is prefilled.
  Splicing continues from the ordinary prefix match while spans are contiguous with it.
* ``register: true`` -- exactly one span: after this request's prefill, that span's KV (computed
  behind the tokens before it, the canonical context) is kept as the chunk's node.
* ``capture: true`` (optional, splice only) -- register on first use: a span this request computes
  itself (not spliced, not in its cached prefix) whose chunk is not resident becomes the chunk's node
  when its prefill is done (its KV copied; canonical position = where it was computed, behind this
  request's context). The memory layer sends it, so a chunk is prefilled once, in its first turn.
* ``blend`` (optional, splice only) -- ``{"policy": ..., "sink_tokens": k, "ratio": r,
  "check_layer": l}`` (all but ``policy`` optional) or a policy's spelling (``"edges:8"``,
  ``"hkvd:0.15@2"``) overrides the server's blend policy (amem.blend) for this request. Either form
  is checked against the registered strategies (amem_sgl.blend.policy.REGISTRY).
* ``exact: true`` (optional, splice only) -- the request is prefilled exactly: nothing is spliced
  or blended, and its prefixes go into the tree under the namespace's *exact* salt, apart from
  blended sequences, so a later exact request reuses KV only as exact prefixes (identical to a full
  prefill by construction). ``spans`` may then be empty; with ``capture`` its spans still become
  chunk nodes. The fidelity guard escalates uncertain memory turns to this (amem_sgl.memory.guard).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Iterable

from amem_sgl.blend.policy import BlendPolicy, spellings
from amem_sgl.chunks.identity import validate_namespace

BLEND_KEYS = {field.name for field in dataclasses.fields(BlendPolicy)}

ACTION_TYPE = "amem.chunks"
ACTION_VERSION = "1"
PROTOCOL_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class ChunkSpan:
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class ChunkRequest:
    namespace: str
    spans: tuple[ChunkSpan, ...]
    register: bool = False
    blend: BlendPolicy | None = None  # None: the server's default policy
    # Drop these chunks (ids; ("*",) = the whole namespace) and the namespace's blended prefixes
    # from the device tree. A forget action declares no spans.
    forget: tuple[str, ...] | None = None
    capture: bool = False  # keep spans this request computes as their chunks' nodes (first use)
    exact: bool = False  # prefill exactly under the namespace's exact salt: no splice, no blend

    def validate(self, num_tokens: int | None = None, max_chunk_tokens: int | None = None) -> "ChunkRequest":
        validate_namespace(self.namespace)
        if self.forget is not None:
            if self.spans or self.register or self.blend is not None or self.capture or self.exact:
                raise ValueError("amem.chunks: a forget action takes no spans, register, capture or blend")
            if not self.forget or not all(isinstance(c, str) and c for c in self.forget):
                raise ValueError("amem.chunks: forget must be a non-empty list of chunk ids or ['*']")
            return self
        if self.exact and (self.register or self.blend is not None):
            raise ValueError("amem.chunks: exact applies to splice requests and takes no blend")
        if not self.spans and not self.exact:
            raise ValueError("amem.chunks: spans must not be empty")
        if self.register and len(self.spans) != 1:
            raise ValueError("amem.chunks: a register action takes exactly one span")
        if self.register and self.capture:
            raise ValueError("amem.chunks: capture applies to splicing, not to a register action")
        if self.blend is not None:
            if self.register:
                raise ValueError("amem.chunks: blend applies to splicing, not to a register action")
            try:
                self.blend.validate()
            except ValueError as err:
                raise ValueError(f"amem.chunks: {err}") from None
        previous_end = 0
        for span in self.spans:
            if not (0 <= span.start < span.end):
                raise ValueError(f"amem.chunks: span [{span.start}, {span.end}) is empty or negative")
            if span.start < previous_end:
                raise ValueError("amem.chunks: spans must be ascending and must not overlap")
            if num_tokens is not None and span.end > num_tokens:
                raise ValueError(f"amem.chunks: span [{span.start}, {span.end}) runs past the prompt "
                                 f"({num_tokens} tokens)")
            if max_chunk_tokens is not None and len(span) > max_chunk_tokens:
                raise ValueError(f"amem.chunks: span of {len(span)} tokens exceeds the chunk limit "
                                 f"({max_chunk_tokens})")
            previous_end = span.end
        return self


def build_kv_hints(namespace: str, spans: Iterable[tuple[int, int]], *, register: bool = False,
                   blend: BlendPolicy | None = None, forget: Iterable[str] | None = None,
                   capture: bool = False, exact: bool = False) -> dict:
    """The ``kv_hints`` value for a ``/generate`` request (JSON-ready)."""
    request = ChunkRequest(namespace, tuple(ChunkSpan(int(s), int(e)) for s, e in spans), register,
                           blend, tuple(forget) if forget is not None else None, capture, exact).validate()
    payload = {"namespace": request.namespace, "register": request.register,
               "spans": [[s.start, s.end] for s in request.spans]}
    if capture:
        payload["capture"] = True
    if exact:
        payload["exact"] = True
    if blend is not None:
        payload["blend"] = dataclasses.asdict(blend)
    if request.forget is not None:
        payload["forget"] = list(request.forget)
    return {
        "protocol_version": PROTOCOL_VERSION,
        "message_id": uuid.uuid4().hex,
        "actions": [{
            "action_id": uuid.uuid4().hex,
            "action_type": ACTION_TYPE,
            "action_version": ACTION_VERSION,
            "payload": payload,
        }],
    }


def parse_kv_hints(envelope: Any) -> ChunkRequest | None:
    """The amem action of a ``kv_hints`` envelope (dict or SGLang's struct), or None if it has none.

    Raises ValueError (with a message for the client) when an amem action is malformed.
    """
    if envelope is None:
        return None
    actions = envelope.get("actions", []) if isinstance(envelope, dict) else getattr(envelope, "actions", [])
    if not isinstance(actions, (list, tuple)):
        raise ValueError(f"amem.chunks: kv_hints actions must be a list of actions, got {json_type(actions)}")
    ours = [a for a in actions if _field(a, "action_type") == ACTION_TYPE]
    if not ours:
        return None
    if len(ours) > 1:
        raise ValueError("amem.chunks: at most one amem.chunks action per request")
    action = ours[0]
    if _field(action, "action_version") != ACTION_VERSION:
        raise ValueError(f"amem.chunks: unsupported action_version {_field(action, 'action_version')!r} "
                         f"(this server speaks {ACTION_VERSION!r})")
    payload = _field(action, "payload") or {}
    if not isinstance(payload, dict):
        raise ValueError("amem.chunks: payload must be an object")
    unknown = sorted(set(payload) - {"namespace", "spans", "register", "blend", "forget", "capture", "exact"})
    if unknown:
        raise ValueError(f"amem.chunks: unknown payload field(s) {', '.join(unknown)}")
    spans = payload.get("spans")
    if not isinstance(spans, list) or not all(
            isinstance(s, (list, tuple)) and len(s) == 2 and all(type(v) is int for v in s) for s in spans):
        raise ValueError("amem.chunks: spans must be a list of [start, end] integer pairs")
    register = payload.get("register", False)
    if not isinstance(register, bool):
        raise ValueError("amem.chunks: register must be true or false")
    capture = payload.get("capture", False)
    if not isinstance(capture, bool):
        raise ValueError("amem.chunks: capture must be true or false")
    exact = payload.get("exact", False)
    if not isinstance(exact, bool):
        raise ValueError("amem.chunks: exact must be true or false")
    blend = payload.get("blend")
    if blend is not None:
        blend = _parse_blend(blend)
    forget = payload.get("forget")
    if forget is not None and not isinstance(forget, list):
        raise ValueError("amem.chunks: forget must be a list of chunk ids or ['*']")
    return ChunkRequest(payload.get("namespace"), tuple(ChunkSpan(s, e) for s, e in spans), register,
                        blend, tuple(forget) if forget is not None else None, capture, exact).validate()


def _parse_blend(blend: Any) -> BlendPolicy:
    """A payload's ``blend``: a policy's spelling or an object of BlendPolicy's fields."""
    try:
        if isinstance(blend, str):
            return BlendPolicy.parse(blend)
        if isinstance(blend, dict) and "policy" in blend and not set(blend) - BLEND_KEYS:
            return BlendPolicy(**blend).validate()
    except ValueError as err:
        raise ValueError(f"amem.chunks: {err}") from None
    raise ValueError("amem.chunks: blend must be a policy spelling (" + spellings() + ") or an object "
                     "with 'policy' and optional 'sink_tokens', 'ratio', 'check_layer'")


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages to clients."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, (list, tuple)) else "an object"


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
