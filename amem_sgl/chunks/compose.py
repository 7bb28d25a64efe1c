"""Prompt composition, in one place: token ids and chunk spans for every layout amem sends.

A chunk is tokenized **alone** and placed in a prompt as those ids (never re-tokenized inside it,
where separators would merge), so its KV -- computed once behind a preamble -- can be spliced; the
text around the chunks comes from the model's own chat template, split at :data:`MARK`:

* :meth:`Composer.chat` -- a memory turn of the OpenAI routes and sessions:
  ``[template up to the system prompt][chunks][rest of the system message, history, turn]``;
* :meth:`Composer.completion` -- a memory turn of ``/v1/completions``: the preamble, the chunks,
  then the client's prompt as it is;
* :meth:`Composer.user_layout` -- the template's ids before and after the user's content (the
  native-API client, amem_sgl.chunks.client.ChatLayout, puts chunks there).

:meth:`Composer.split_text` cuts a remembered text into chunks on sentence boundaries, counted in
the same tokenizer's ids.

One :class:`Composer` holds one tokenizer; the memory layer and the chunk client each use one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

MARK = "\u2063AMEM_CHUNKS\u2063"  # where the chunks go in a templated text (U+2063: never trimmed)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclasses.dataclass(frozen=True)
class ComposedPrompt:
    input_ids: list[int]
    spans: list[tuple[int, int]]  # where each chunk sits in input_ids

    @property
    def chunk_tokens(self) -> int:
        return sum(end - start for start, end in self.spans)


def place(head: Sequence[int], chunks: Sequence[Sequence[int]], tail: Sequence[int]) -> ComposedPrompt:
    """``head``, each chunk's ids (its span recorded), then ``tail``."""
    ids, spans = list(head), []
    for chunk in chunks:
        spans.append((len(ids), len(ids) + len(chunk)))
        ids.extend(chunk)
    ids.extend(tail)
    return ComposedPrompt(ids, spans)


class Composer:
    """The layouts over one tokenizer (a Hugging Face tokenizer with a chat template)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._preambles: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def around(self, messages: Sequence[dict]) -> tuple[str, str]:
        """The templated text of ``messages`` (one of them holds :data:`MARK`), with the generation
        prompt, split at the mark."""
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        before, after = text.split(MARK, 1)
        return before, after

    @staticmethod
    def system_with_chunks(system: str) -> dict:
        """The system message whose content ends where the chunks go."""
        return {"role": "system", "content": f"{system}\n{MARK}"}

    def preamble(self, system: str) -> list[int]:
        """Ids before the chunks behind ``system`` (where chunk KV is computed); cached per prompt."""
        if system not in self._preambles:
            self._preambles[system] = self.encode(self.around([self.system_with_chunks(system)])[0])
        return list(self._preambles[system])

    def chat(self, messages: Sequence[dict], chunks: Sequence[Sequence[int]], default_system: str) -> ComposedPrompt:
        """A chat turn: the chunks after its system prompt (the first message's, if it is a system
        message, else ``default_system``), then the rest of the conversation."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if msgs and msgs[0]["role"] == "system":
            system, rest = msgs[0]["content"], msgs[1:]
        else:
            system, rest = default_system, msgs
        before, after = self.around([self.system_with_chunks(system), *rest])
        return place(self.encode(before), chunks, self.encode(after))

    def completion(self, system: str, chunks: Sequence[Sequence[int]], prompt: str) -> ComposedPrompt:
        """A text completion: the preamble of ``system``, the chunks, the prompt's own ids."""
        return place(self.preamble(system), chunks, self.encode(prompt))

    def user_layout(self, system: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Ids the template puts before and after the user's content (with ``system`` first)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": MARK}]
        before, after = self.around(messages)
        return tuple(self.encode(before)), tuple(self.encode(after))

    def split_text(self, text: str, limit: int, suffix: str = "") -> list[str]:
        """Sentence-boundary chunks, each at most ``limit`` tokens **as stored**: ``chunk + suffix``
        tokenized alone (the memory layer stores a chunk's ids with a newline after it, so it passes
        ``suffix="\\n"``). A sentence longer than a chunk -- one long word too -- is cut by tokens.

        Sentences are packed by an estimate (each one's ``sentence + " "`` ids); every chunk is then
        checked on its exact text, so the estimate (or the separator's token) can never push a chunk
        past ``limit``: a group that does not fit as one text gives back its last sentences."""
        if type(limit) is not int or limit < 1:
            raise ValueError(f"chunk size must be a positive number of tokens, got {limit!r}")
        sentences = [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]
        chunks: list[str] = []
        current: list[str] = []
        size = 0
        for sentence in sentences:
            n = len(self.encode(sentence + " "))
            ids = self.encode(sentence) if n > limit else []
            # One sentence longer than a chunk: cut it by tokens. Each pass consumes at least one of
            # its ids (sliced, not re-encoded from the decoded rest, whose token count need not
            # shrink), so the loop ends.
            # The rest is decoded and re-counted only once it is near a chunk's size: a rest of more
            # than twice ``limit`` ids is longer than a chunk either way (re-encoding does not halve
            # it), and re-encoding it every pass made a long unpunctuated text quadratic.
            while n > limit and ids:
                if current:
                    self._pack(current, limit, suffix, chunks)
                    current, size = [], 0
                head, ids = self._head(ids, limit, suffix)
                chunks.append(head)
                if len(ids) > 2 * limit:
                    n = len(ids) + 1
                    continue
                sentence = self.decode(ids)
                n = len(self.encode(sentence + " "))
            if size + n > limit and current:
                self._pack(current, limit, suffix, chunks)
                current, size = [], 0
            current.append(sentence)
            size += n
        if current:
            self._pack(current, limit, suffix, chunks)
        return [c for c in chunks if c]

    def _fits(self, chunk: str, limit: int, suffix: str) -> bool:
        return len(self.encode(chunk + suffix)) <= limit

    def _head(self, ids: Sequence[int], limit: int, suffix: str) -> tuple[str, Sequence[int]]:
        """A cut of a long sentence: the text of its longest id prefix that fits a chunk with
        ``suffix`` (the suffix's own ids reserved first; fewer ids while the decoded text re-encodes
        longer, or ends inside a character -- a byte-level token can hold part of one, and the cut
        would leave U+FFFD on both sides), and the ids left."""
        k = min(len(ids), max(1, limit - (len(self.encode(suffix)) if suffix else 0)))
        while True:
            head = self.decode(ids[:k])
            if k > 1 and k < len(ids) and head.endswith("\ufffd"):
                k -= 1
                continue
            head = head.strip()
            if self._fits(head, limit, suffix):
                return head, ids[k:]
            if k == 1:
                raise ValueError(f"a chunk of {limit} tokens cannot hold one token and the chunk's end {suffix!r}")
            k -= 1

    def _pack(self, group: list[str], limit: int, suffix: str, chunks: list[str]) -> None:
        """``group``'s sentences (their estimate fits one chunk) appended to ``chunks`` as chunks that
        fit exactly: as many leading sentences as fit joined, the rest again; a sentence that does not
        fit alone is cut by tokens."""
        while group:
            j = len(group)
            while j > 1 and not self._fits(" ".join(group[:j]), limit, suffix):
                j -= 1
            if j > 1 or self._fits(group[0], limit, suffix):
                chunks.append(" ".join(group[:j]))
            else:
                ids = self.encode(group[0])
                while ids:
                    head, ids = self._head(ids, limit, suffix)
                    chunks.append(head)
            group = group[j:]
