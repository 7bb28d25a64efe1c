"""Numeric config keys out of range are refused at start with the key and its allowed range (a
non-positive chunk size hung the server's splitter; a negative body limit answered 413 to all)."""

from __future__ import annotations

import pytest

from amem_sgl.config import AmemConfig, load_config_file


@pytest.mark.parametrize("section,key,value,allowed", [
    ("memory", "chunk_tokens", 0, "[1, amem.chunks.max_chunk_tokens]"),
    ("memory", "chunk_tokens", -5, "[1, amem.chunks.max_chunk_tokens]"),
    ("memory", "chunk_tokens", 4096, "[1, amem.chunks.max_chunk_tokens]"),  # > max_chunk_tokens (2048)
    ("server", "max_request_bytes", -1, "[1, "),
    ("server", "max_request_bytes", 0, "[1, "),
    ("memory", "top_k", 0, "[1, 1024]"),
    ("memory", "top_k", -1, "[1, 1024]"),
    ("memory", "exact_working_set_tokens", 0, "[amem.memory.chunk_tokens, "),
    ("memory", "max_chunks_per_request", 0, "[1, "),
    ("memory", "session_idle_s", -1.0, "(0.0, "),
    ("memory", "session_idle_s", 0, "(0.0, "),
    ("memory", "min_score", float("nan"), "[-1.0, 1 + amem.memory.lexical_weight]"),
    ("memory", "min_score", 5.0, "[-1.0, 1 + amem.memory.lexical_weight]"),
    ("memory", "lexical_weight", -0.5, "[0.0, 10.0]"),
    ("memory", "kv_durable_wait_s", float("inf"), "[0.0, 3600.0]"),
    ("chunks", "max_chunk_tokens", 0, "[1, "),
    ("residency", "cpu_bytes", -1, "[0, "),
    ("residency", "disk_bytes", -1, "[0, "),
    ("residency", "timeout_s", 0.0, "(0.0, 3600.0]"),
    ("residency", "recency_half_life_s", 0.0, "(0.0, "),
    ("residency", "relevance_weight", -1.0, "[0.0, 1000.0]"),
    ("residency", "size_weight_per_mib", float("nan"), "[0.0, 1000.0]"),
])
def test_out_of_range_numbers_are_refused_naming_the_key_and_range(section, key, value, allowed):
    with pytest.raises(ValueError) as err:
        AmemConfig.from_dict({section: {key: value}})
    message = str(err.value)
    assert f"'amem.{section}.{key}'" in message and allowed in message, message


def test_the_chunk_size_bound_follows_max_chunk_tokens():
    AmemConfig.from_dict({"chunks": {"max_chunk_tokens": 4096}, "memory": {"chunk_tokens": 4096}})
    with pytest.raises(ValueError, match=r"amem.memory.chunk_tokens.*amem.chunks.max_chunk_tokens = 128"):
        AmemConfig.from_dict({"chunks": {"max_chunk_tokens": 128}})  # the default chunk_tokens is 256


def test_the_shipped_configs_and_the_defaults_are_in_range(tmp_path):
    AmemConfig.from_dict({})
    for name in ("default", "gpu"):
        load_config_file(f"configs/{name}.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("amem:\n  memory: {chunk_tokens: 0}\n")
    with pytest.raises(ValueError, match="amem.memory.chunk_tokens"):
        load_config_file(path)


def test_the_splitter_refuses_a_non_positive_chunk_size_instead_of_looping():
    from amem_sgl.chunks.compose import Composer

    class Tokenizer:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()

        def decode(self, ids):
            return "".join(map(chr, ids))

    composer = Composer(Tokenizer())
    assert composer.split_text("Hello there. Bye.", 8) == ["Hello th", "ere.", "Bye."]
    for bad in (-1, 0):
        with pytest.raises(ValueError, match="chunk size"):
            composer.split_text("Hello there. Bye.", bad)


def test_every_numeric_key_has_a_range():
    import dataclasses

    from amem_sgl.config import _RANGES

    checked_elsewhere = {"blend.sink_tokens", "blend.ratio", "blend.check_layer", "blend.temperature",
                         "blend.scale", "blend.guard_margin"}  # BlendPolicy.validate / from_dict
    numeric = {f"{section.name}.{f.name}" for section in dataclasses.fields(AmemConfig)
               for f in dataclasses.fields(section.default_factory)
               if type(f.default) in (int, float)}
    assert numeric - checked_elsewhere == set(_RANGES)
    with pytest.raises(ValueError, match="amem.server.max_request_bytes"):
        AmemConfig.from_dict({"server": {"max_request_bytes": 10**400}})
