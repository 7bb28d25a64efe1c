"""``Answer.reused_kv`` on the real server: True only when every memory chunk of the turn was
served from reused KV (a prefix hit or a splice), never for a turn that prefilled a chunk."""

from __future__ import annotations

import pytest

from amem_sgl.sdk import Amem

pytestmark = pytest.mark.slow

IVY = ["Ivy's bike is green.", "Ivy plays the cello in an orchestra."]


def test_a_turn_that_prefills_a_new_chunk_did_not_reuse_kv_and_its_repeat_did(amem_server):
    amem = Amem(amem_server.url)
    done = amem.remember("ivy", IVY)
    bike, cello = done.ids
    session = amem.start_session("ivy", query="bike", k=1)
    assert session.chunk_ids == [bike], session.chunk_ids
    first = session.ask("Which instrument does Ivy play?", max_tokens=12)
    memory = first.usage["memory"]
    assert cello in first.chunk_ids and memory["new_chunks"] == [cello], first.usage
    # The cello chunk was appended to the working set and prefilled in this very turn.
    assert not first.reused_kv, first.usage
    assert first.usage["computed_chunk_tokens"] > 0, first.usage
    again = session.ask("Which instrument does Ivy play?", max_tokens=12)
    assert sorted(again.chunk_ids) == sorted([bike, cello]) and not again.usage["memory"]["new_chunks"]
    # Now both chunks are in the session's cached prefix: nothing of them computed again.
    assert again.usage["computed_chunk_tokens"] == 0 and again.reused_kv, again.usage
    assert again.cached_tokens > first.cached_tokens
