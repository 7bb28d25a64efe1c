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
"""

from __future__ import annotations

from typing import Sequence

from amem_sgl import sglang_compat as sgl


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


def around_validate_one_request(original, manager, obj, input_ids, *args, **kwargs):
    """AROUND hook for ``TokenizerManager._validate_one_request``: the vocabulary check first."""
    vocab_size = getattr(getattr(manager, "model_config", None), "vocab_size", None)
    if vocab_size and getattr(obj, "input_embeds", None) is None:
        check_token_ids(input_ids, int(vocab_size))
    return original(manager, obj, input_ids, *args, **kwargs)


def install_token_id_check() -> None:
    """Hook the check into SGLang's tokenizer manager of this (HTTP) process."""
    sgl.add_around_hook(sgl.TOKENIZER_VALIDATE_TARGET, around_validate_one_request)
    sgl.apply_hooks()
