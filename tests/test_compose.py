"""One composition module (amem_sgl.chunks.compose) for every layout: the token ids and spans it
composes are those the three earlier copies composed (reproduced here as they were written), on
the served model's own tokenizer and chat template."""

from __future__ import annotations

import pytest

from amem_sgl.chunks.client import ChatLayout
from amem_sgl.chunks.compose import MARK, Composer, place

OLD_MEMORY_MARK = "\u2063AMEM_CHUNKS\u2063"
OLD_CLIENT_MARK = "AMEMSPLITMARKER"
SYSTEM = "You are a helpful assistant. Notes from memory follow; use them when they are relevant."


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from amem_sgl.models import ensure_embedded_model

    return AutoTokenizer.from_pretrained(str(ensure_embedded_model()))


def encode(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def old_memory_compose(tokenizer, messages, chunks, default_system):
    """memory/layer.py's compose before the composition module (``_split_template`` + compose)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if msgs and msgs[0]["role"] == "system":
        system, rest = msgs[0]["content"], msgs[1:]
    else:
        system, rest = default_system, msgs
    text = tokenizer.apply_chat_template([{"role": "system", "content": f"{system}\n{OLD_MEMORY_MARK}"}, *rest],
                                         add_generation_prompt=True, tokenize=False)
    before, after = text.split(OLD_MEMORY_MARK, 1)
    ids, spans = encode(tokenizer, before), []
    for chunk in chunks:
        spans.append((len(ids), len(ids) + len(chunk)))
        ids.extend(chunk)
    return ids + encode(tokenizer, after), spans


def old_client_layout(tokenizer, system):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": OLD_CLIENT_MARK}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    before, after = text.split(OLD_CLIENT_MARK)
    return tuple(encode(tokenizer, before)), tuple(encode(tokenizer, after))


CONVERSATIONS = [
    [{"role": "user", "content": "Where does Alice's sister live?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Where does Alice work?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "  What did I say about Denver?\n"}],
    [{"role": "user", "content": ""}],  # a session's warm-up turn
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_turns_compose_the_same_ids_as_before(tokenizer, messages):
    chunks = [encode(tokenizer, "Maria, Alice's sister, lives in Denver.\n"), encode(tokenizer, "Alice works at Boeing.\n")]
    prompt = Composer(tokenizer).chat(messages, chunks, SYSTEM)
    assert (prompt.input_ids, prompt.spans) == old_memory_compose(tokenizer, messages, chunks, SYSTEM)
    for (start, end), chunk in zip(prompt.spans, chunks):
        assert prompt.input_ids[start:end] == chunk


def test_the_preamble_and_a_completion_are_the_old_ones(tokenizer):
    composer = Composer(tokenizer)
    old_preamble = old_memory_compose(tokenizer, [], [], SYSTEM)
    text = tokenizer.apply_chat_template([{"role": "system", "content": f"{SYSTEM}\n{OLD_MEMORY_MARK}"}],
                                         add_generation_prompt=True, tokenize=False)
    assert composer.preamble(SYSTEM) == encode(tokenizer, text.split(OLD_MEMORY_MARK, 1)[0])
    assert composer.preamble(SYSTEM) == old_preamble[0][: len(composer.preamble(SYSTEM))]
    chunk = encode(tokenizer, "Bob likes tea.\n")
    done = composer.completion(SYSTEM, [chunk], "Bob likes")
    pre = composer.preamble(SYSTEM)
    assert done.input_ids == pre + chunk + encode(tokenizer, "Bob likes")
    assert done.spans == [(len(pre), len(pre) + len(chunk))]


@pytest.mark.parametrize("system", [None, "You answer from notes."])
def test_the_chunk_clients_layout_is_the_old_one(tokenizer, system):
    layout = ChatLayout.from_tokenizer(tokenizer, system)
    assert (layout.preamble, layout.suffix) == old_client_layout(tokenizer, system)
    a, b = encode(tokenizer, "One.\n"), encode(tokenizer, "Two.\n")
    prompt = layout.compose([a, b], "Which?")
    pre = list(layout.preamble)
    assert prompt.input_ids == pre + a + b + encode(tokenizer, "Which?") + list(layout.suffix)
    assert prompt.spans == [(len(pre), len(pre) + len(a)), (len(pre) + len(a), len(pre) + len(a) + len(b))]
    assert layout.registration(a).input_ids == pre + a and layout.registration(a).spans == [(len(pre), len(pre) + len(a))]


def test_place_and_the_mark():
    assert place([1], [[2, 3], [], [4]], [5]).spans == [(1, 3), (3, 3), (3, 4)]
    assert MARK.strip() == MARK  # a chat template's trim cannot eat the mark


def test_a_long_unpunctuated_text_is_split_in_linear_work_with_the_same_chunks(tokenizer):
    """One ~20K-token "sentence" (no sentence break): each pass re-decoded and re-encoded the whole
    rest, so the tokenizer read ~n^2/limit characters (29K tokens took 3.4 s, 58K 17 s). Now it
    reads a few times the text, and the chunks are the old ones (the old rule, re-implemented here)."""
    import random

    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "42", "x-ray"]
    text = " ".join(rng.choice(words) for _ in range(8000))
    composer = Composer(tokenizer)
    read = []
    encode = composer.encode
    composer.encode = lambda s: read.append(len(s)) or encode(s)  # count what the tokenizer reads
    chunks = composer.split_text(text, 256)
    assert sum(read) < 6 * len(text), (sum(read), len(text))

    def old_rule(sentence: str, limit: int) -> list[str]:  # the cut loop before this change
        out, n = [], len(encode(sentence + " "))
        ids = encode(sentence) if n > limit else []
        while n > limit and ids:
            head, ids = ids[:limit], ids[limit:]
            sentence = composer.decode(ids)
            out.append(composer.decode(head).strip())
            n = len(encode(sentence + " "))
        return out + [sentence]

    assert chunks == old_rule(text, 256)
    assert all(len(encode(c)) <= 256 for c in chunks)
