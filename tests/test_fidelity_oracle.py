"""The oracle's splice emulation (benchmarks.oracle) on the real SmolLM2 weights (transformers, CPU)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import oracle
from benchmarks.fidelity_data import make_lookups


@pytest.fixture(scope="module")
def model_and_layout():
    return oracle.load_model()


@pytest.mark.slow
def test_rerotated_layer0_keys_equal_keys_computed_at_the_new_position(model_and_layout):
    model, layout = model_and_layout
    ids = layout.tokens("Nadia Okafor lives in Lisbon.")
    with torch.no_grad():
        _, at_7 = oracle._forward(model, ids, start=7)
        _, at_300 = oracle._forward(model, ids, start=300)
    # Layer 0's keys depend on the token and its position only: moving them is exactly RoPE by the shift.
    k7, k300 = oracle._kv(at_7)[0][0], oracle._kv(at_300)[0][0]
    assert not torch.allclose(k7, k300, atol=1e-3)
    torch.testing.assert_close(oracle.rerotate(k7, 293, model), k300, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(oracle.rerotate(k300, -293, model), k7, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_exact_kv_everywhere_answers_like_the_full_prefill_and_splice_alone_deviates(model_and_layout):
    model, layout = model_and_layout
    (q,) = make_lookups(1, bands=("short",))
    chunks = [layout.tokens(c) for c in q.chunks]
    prompt = layout.compose(chunks, q.prompt)
    end = prompt.spans[-1][1]
    chunk_pos = torch.cat([torch.arange(s, e) for s, e in prompt.spans])
    eos = layout.tokenizer.eos_token_id
    with torch.no_grad():
        logits, cache = oracle._forward(model, prompt.input_ids)
        full_ids = oracle._greedy(model, logits, cache, len(prompt.input_ids), 12, eos)
    full_kv = [(k.clone(), v.clone()) for k, v in oracle._kv(cache)]
    spliced = oracle.chunk_kv(model, layout, chunks, prompt.spans, context=False)
    # The first chunk was computed behind the preamble, where it sits: its spliced KV is the full KV.
    n0 = prompt.spans[0][1] - prompt.spans[0][0]
    for (fk, fv), (sk, sv) in zip(full_kv, spliced):
        torch.testing.assert_close(sk[:, :, :n0], fk[:, :, prompt.spans[0][0]:prompt.spans[0][1]], atol=1e-4, rtol=1e-4)
    # Later chunks lost their cross-attention: their deep-layer KV differs.
    assert (spliced[-1][1][:, :, n0:] - full_kv[-1][1][:, :, chunk_pos[n0:]]).abs().max() > 1e-2
    every = torch.ones(len(chunk_pos), dtype=torch.bool)
    got = oracle.answer_with(model, full_kv, spliced, chunk_pos, every, prompt.input_ids[end:], end, 12, eos)
    assert got == full_ids and full_ids
    assert oracle.top_fraction(torch.arange(10.0), 0.3).nonzero().flatten().tolist() == [7, 8, 9]
    assert oracle.edges_mask([(0, 20)], 8).sum() == 16
