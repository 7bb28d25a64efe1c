"""Token ids are checked against the model's vocabulary before a request reaches the scheduler.

SGLang 0.5.23 validates ``token_ids_logprob`` but not ``input_ids``: ``{"input_ids": [-1]}`` on
``/generate`` reached the embedding in the scheduler process (``IndexError: index out of range in
self``) and ended it, and with it the whole server. Every route that embeds token ids -- native
``/generate`` (single and batch), the OpenAI chat and completion routes (``input_ids`` / a token-id
``prompt``), embeddings, and the prompts the memory layer composes -- goes through one method of
SGLang's tokenizer manager, in the HTTP process, before the request is sent to the scheduler:
``TokenizerManager._validate_one_request(obj, input_ids)``. An AROUND hook there (installed by
amem's launcher) refuses ids outside ``[0, vocab_size)`` with a ``ValueError``, which every route
already answers as a 400 in its own error shape, naming the offending value and its index.

The same point seals amem's part of the radix key space and backs up the API-key guard, for every
route (those the guard knows and any other that builds a ``GenerateReqInput``):

* a client ``extra_key`` / ``cache_salt`` containing ``amem:`` (amem_sgl.chunks.identity
  RESERVED_KEY_PREFIX: chunk nodes ``amem:chunk:<id>``, namespace salts ``amem:ns:...``, and the
  ``original|salt`` combination) is refused: otherwise a plain request could land in a namespace's
  salted subtree and read its ``cached_tokens``;
* with API keys on, an ``amem.chunks`` action (a ``/generate`` chunk hint, or the prompt the memory
  layer composed for an OpenAI/Anthropic turn) is refused unless the request's key covers its
  namespace (amem_sgl.server.auth.denial).
"""

from __future__ import annotations

import functools
from typing import Sequence

from amem_sgl import sglang_compat as sgl
from amem_sgl.chunks.hints import parse_kv_hints
from amem_sgl.chunks.identity import RESERVED_KEY_PREFIX
from amem_sgl.server import auth


class TokenIdError(ValueError):
    """A request carries a token id the model cannot embed."""


def check_token_ids(input_ids: Sequence, vocab_size: int, *, where: str = "input_ids") -> None:
    """Raise :class:`TokenIdError` unless every id is an ``int`` (not a bool) in ``[0, vocab_size)``.

    ``input_ids`` is a flat sequence of ids; the message names the first bad value and its index."""
    if input_ids is None:
        return
    if not isinstance(input_ids, (list, tuple)):
        raise TokenIdError(f"{where} must be a list of integer token ids, got {type(input_ids).__name__}")
    for index, token in enumerate(input_ids):
        if type(token) is not int:
            raise TokenIdError(f"{where}[{index}] must be an integer token id, got {token!r}")
        if not 0 <= token < vocab_size:
            raise TokenIdError(f"{where}[{index}] = {token} is not a token id of this model: "
                               f"valid ids are 0..{vocab_size - 1} (vocabulary of {vocab_size})")


class ReservedKeyError(ValueError):
    """A client names a radix key in amem's reserved space."""


def check_reserved_keys(obj) -> None:
    """Refuse a client ``extra_key`` / ``cache_salt`` in amem's reserved key space."""
    for field in ("extra_key", "cache_salt"):
        value = getattr(obj, field, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and RESERVED_KEY_PREFIX in item:
                raise ReservedKeyError(f"{field} {item[:80]!r} is in a reserved key space: values containing "
                                       f"{RESERVED_KEY_PREFIX!r} are amem's own")


class ChunkHintError(ValueError):
    """A request's ``amem.chunks`` action is malformed or does not fit its prompt."""


def check_chunk_hints(obj, input_ids, max_chunk_tokens: int | None) -> None:
    """The request's amem.chunks action must parse and its spans fit the tokenized prompt (every
    route: /generate's guard checks the raw body first; this also covers routes and in-process
    callers it does not see, where the scheduler would otherwise drop the action with a log line);
    with API keys on, the request's key must cover the action's namespace."""
    hints = getattr(obj, "kv_hints", None)
    if hints is None:
        return
    for envelope in hints if isinstance(hints, list) else [hints]:
        try:
            request = parse_kv_hints(envelope)
            if request is not None:
                tokens = input_ids if isinstance(input_ids, (list, tuple)) else None
                if request.spans and tokens is None:
                    raise ValueError("chunk spans index the prompt's token ids: send input_ids")
                request.validate(None if tokens is None else len(tokens), max_chunk_tokens)
        except ValueError as err:
            raise ChunkHintError(f"kv_hints: {err}") from None
        if request is None or auth.ACTIVE is None or not auth.ACTIVE.enabled:
            continue
        denied = auth.denial([request.namespace])
        if denied is not None:
            raise ValueError(f"{denied[1]} (HTTP {denied[0]})")


@functools.cache
def _max_chunk_tokens() -> int | None:
    """amem.chunks.max_chunk_tokens of this process's config (read once: it is fixed at launch)."""
    from amem_sgl.config import AmemConfig

    try:
        return AmemConfig.from_env().chunks.max_chunk_tokens
    except Exception:  # noqa: BLE001 -- no readable config here: the scheduler's own limit still holds
        return None


def around_validate_one_request(original, manager, obj, input_ids, *args, **kwargs):
    """AROUND hook for ``TokenizerManager._validate_one_request``: the vocabulary check first, then
    the reserved key space, then the chunk action (its spans against the prompt, its namespace's key)."""
    vocab_size = getattr(getattr(manager, "model_config", None), "vocab_size", None)
    if vocab_size and getattr(obj, "input_embeds", None) is None:
        check_token_ids(input_ids, int(vocab_size))
    check_reserved_keys(obj)
    check_chunk_hints(obj, input_ids, _max_chunk_tokens())
    return original(manager, obj, input_ids, *args, **kwargs)


def install_token_id_check() -> None:
    """Hook the check into SGLang's tokenizer manager of this (HTTP) process."""
    sgl.add_around_hook(sgl.TOKENIZER_VALIDATE_TARGET, around_validate_one_request)
    sgl.apply_hooks()
