"""A stored chunk is at most ``amem.memory.chunk_tokens`` tokens: its ids as the memory layer
registers and stores them (its text and the newline after it, tokenized alone) -- not just the
text the splitter counted. The splitter counted ``sentence + " "`` and cut long sentences at exactly
``chunk_tokens`` ids, then the layer added a newline: 60 random words at ``chunk_tokens: 32`` gave a
33-token chunk (refused by ``amem.chunks.max_chunk_tokens: 32``; with ``prefill: first_use`` stored,
and every later ask in the namespace refused). On the served model's own tokenizer."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega 42 x-ray 3.14 don't U.S.A. naïve café Zürich 東京 ok").split()


def texts() -> dict[str, str]:
    rng = random.Random(11)
    sentences = []
    for i in range(120):
        words = [rng.choice(WORDS) for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 70]))]
        sentences.append(" ".join(words) + rng.choice([".", "!", "?", ".\n", "\n\n"]))
    return {
        "random words": " ".join(rng.choice(WORDS) for _ in range(60)),
        "unpunctuated": " ".join(rng.choice(WORDS) for _ in range(3000)),
        "sentences": " ".join(sentences),
        "short sentences": " ".join(f"Fact {i}: {rng.choice(WORDS)} is {rng.choice(WORDS)}." for i in range(200)),
        "one long word": "pre" + "supercalifragilistic" * 60 + " tail.",
        "digits": "".join(rng.choice("0123456789") for _ in range(900)),
    }


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    from amem_sgl.config import AmemConfig, MemoryConfig
    from amem_sgl.memory.layer import MemoryLayer
    from amem_sgl.models import ensure_embedded_model

    made = {}

    def make(chunk_tokens: int) -> MemoryLayer:
        if chunk_tokens not in made:
            config = dataclasses.replace(AmemConfig(), memory=MemoryConfig(
                chunk_tokens=chunk_tokens, dir=str(tmp_path_factory.mktemp(f"mem{chunk_tokens}"))))
            made[chunk_tokens] = MemoryLayer(config, base_url="http://unused", model_id="m",
                                             tokenizer_path=str(ensure_embedded_model()))
        return made[chunk_tokens]

    return make


@pytest.mark.parametrize("chunk_tokens", [8, 32, 256])
@pytest.mark.parametrize("name", list(texts()))
def test_every_stored_chunk_fits_chunk_tokens(layers, chunk_tokens, name):
    layer = layers(chunk_tokens)
    text = texts()[name]
    pieces, token_ids, ids, _ = layer._prepare("budget", [(text, {"doc": name})])  # what remember stores
    assert pieces and len(pieces) == len(token_ids) == len(ids)
    sizes = [len(t) for t in token_ids]
    assert max(sizes) <= chunk_tokens, (name, chunk_tokens, sizes)
    for (piece, _), t in zip(pieces, token_ids):
        assert t == layer.encode(piece + "\n")  # the ids as registered: text and newline, tokenized alone
    # Every split chunk (before de-duplication) fits too, and the text comes back whole.
    chunks = layer.split(text)
    assert all(len(layer.chunk_ids(c)) <= chunk_tokens for c in chunks)
    squash = re.compile(r"\s+")  # a cut by tokens (a long sentence or word) drops no character
    assert squash.sub("", "".join(chunks)) == squash.sub("", text)


def test_the_reviewers_repro_60_words_at_32_tokens(layers):
    layer = layers(32)
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(60))
    _, token_ids, _, _ = layer._prepare("cap0", [(text, {})])
    assert all(len(t) <= 32 for t in token_ids), [len(t) for t in token_ids]


def test_default_chunk_tokens_holds_a_long_text(layers):
    layer = layers(256)
    text = " ".join(f"word{i % 97}" for i in range(4000))
    _, token_ids, _, _ = layer._prepare("default", [(text, {})])
    assert len(token_ids) > 5 and max(len(t) for t in token_ids) <= 256


def test_a_chunk_too_small_for_a_token_and_its_newline_is_a_400(layers):
    from amem_sgl.memory.layer import MemoryError_

    layer = layers(1)
    with pytest.raises(MemoryError_, match="chunk_tokens") as err:
        layer.split("hello world")
    assert err.value.status == 400
