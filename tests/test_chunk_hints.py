"""Chunk identity and the amem.chunks request field (pure functions)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from amem_sgl.chunks import build_kv_hints, chunk_id, parse_kv_hints
from amem_sgl.chunks.hints import ChunkRequest, ChunkSpan
from amem_sgl.server.limits import ChunkHintsGuard


def test_chunk_id_is_stable_across_processes_and_depends_on_every_part():
    here = chunk_id("alice", "model-a", [1, 2, 3])
    code = "from amem_sgl.chunks import chunk_id; print(chunk_id('alice', 'model-a', [1, 2, 3]))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == here and len(here) == 64
    variants = {chunk_id("bob", "model-a", [1, 2, 3]), chunk_id("alice", "model-b", [1, 2, 3]),
                chunk_id("alice", "model-a", [1, 2, 4]), chunk_id("alice", "model-a", [1, 2]),
                chunk_id("alice", "model-a2", [1, 2, 3])}
    assert here not in variants and len(variants) == 5


def test_field_boundaries_cannot_be_shifted_between_namespace_and_model():
    assert chunk_id("ab", "c", [1]) != chunk_id("a", "bc", [1])


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "-leading", "ünicode", 5, None])
def test_namespaces_are_validated(bad):
    with pytest.raises(ValueError, match="namespace"):
        chunk_id(bad, "m", [1])


def test_hints_round_trip_through_the_envelope():
    envelope = build_kv_hints("alice", [(3, 10), (10, 20)])
    request = parse_kv_hints(envelope)
    assert request == ChunkRequest("alice", (ChunkSpan(3, 10), ChunkSpan(10, 20)), False)
    assert parse_kv_hints(build_kv_hints("alice", [(0, 5)], register=True)).register
    assert parse_kv_hints({"protocol_version": "1", "message_id": "m", "actions": []}) is None
    assert parse_kv_hints(None) is None


@pytest.mark.parametrize("spans, register, message", [
    ([], False, "must not be empty"),
    ([(5, 5)], False, "empty or negative"),
    ([(4, 8), (6, 9)], False, "must not overlap"),
    ([(0, 2), (3, 4)], True, "exactly one span"),
])
def test_bad_spans_are_refused(spans, register, message):
    with pytest.raises(ValueError, match=message):
        build_kv_hints("alice", spans, register=register)


def test_validation_against_the_prompt_and_the_chunk_limit():
    request = parse_kv_hints(build_kv_hints("alice", [(0, 10)]))
    request.validate(num_tokens=10, max_chunk_tokens=10)
    with pytest.raises(ValueError, match="runs past the prompt"):
        request.validate(num_tokens=9)
    with pytest.raises(ValueError, match="exceeds the chunk limit"):
        request.validate(max_chunk_tokens=9)


def test_guard_checks_generate_bodies():
    guard = ChunkHintsGuard(app=None, max_chunk_tokens=100)
    good = build_kv_hints("alice", [(0, 3)])
    ok = guard.check(b'{"input_ids": [1, 2, 3, 4], "kv_hints": %s}' % _json(good))
    assert ok is None
    past = guard.check(b'{"input_ids": [1, 2], "kv_hints": %s}' % _json(good))
    assert "runs past the prompt" in past
    batch = guard.check(b'{"input_ids": [[1, 2, 3, 4], [1]], "kv_hints": [%s, %s]}' % (_json(good), _json(good)))
    assert "runs past the prompt" in batch
    text_prompt = guard.check(b'{"text": "hello", "kv_hints": %s}' % _json(good))
    assert text_prompt is not None and "input_ids" in text_prompt  # spans index token ids, not text
    assert guard.check(b"not json amem.chunks") is None  # SGLang answers malformed JSON itself


def _json(obj) -> bytes:
    import json

    return json.dumps(obj).encode()


def test_blend_policies_pick_the_documented_positions():
    from amem_sgl.blend.policy import BlendPolicy

    segments = [(10, 6), (16, 2)]  # a 6-token chunk at 10, a 2-token chunk at 16
    assert BlendPolicy("none").select(segments) == []
    assert BlendPolicy("all").select(segments) == list(range(10, 18))
    assert BlendPolicy("sink", 3).select(segments) == [10, 11, 12, 16, 17]
    assert BlendPolicy("tail", 2).select(segments) == [14, 15, 16, 17]
    assert BlendPolicy("edges", 2).select(segments) == [10, 11, 14, 15, 16, 17]
    with pytest.raises(ValueError, match="must be one of"):
        BlendPolicy("random").validate()
