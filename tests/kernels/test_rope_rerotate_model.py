"""Model-level: real SmolLM2-135M-Instruct layers (transformers, the converted weights). Keys of a
chunk computed at positions 0..n-1 and re-rotated by delta equal the keys the model computes for the
same chunk at delta..delta+n-1, in every layer (RoPE is relative, so deeper layers agree too)."""

from __future__ import annotations

import pytest
import torch

from kernels.rope_rerotate import rope_rerotate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amem_sgl.models import ensure_embedded_model

    folder = ensure_embedded_model()
    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


def layer_keys(model, ids, start):
    n = ids.shape[1]
    with torch.no_grad():
        cache = model(ids, position_ids=torch.arange(start, start + n)[None], use_cache=True).past_key_values
    # [1, kv_heads, n, head_dim] -> [n, kv_heads, head_dim], the KV pool's layout
    return [layer.keys[0].transpose(0, 1).contiguous() for layer in cache.layers]


def model_table(model, head_dim, max_pos=4096):
    cos, sin = model.model.rotary_emb(torch.zeros(1, 1, head_dim), torch.arange(max_pos)[None])
    return torch.cat((cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]), dim=-1).float().contiguous()


@pytest.mark.parametrize("delta", [1, 37, 333, 1500])
def test_keys_at_zero_rerotated_equal_keys_at_delta_in_every_layer(smollm2, delta):
    model, tokenizer = smollm2
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    ids = tokenizer("Maria moved to Denver in 2019 and works as a nurse at the children's hospital.",
                    return_tensors="pt").input_ids
    n = ids.shape[1]
    at_zero, at_delta = layer_keys(model, ids, 0), layer_keys(model, ids, delta)
    assert len(at_zero) == config.num_hidden_layers == 30
    table, idx, shift = model_table(model, head_dim), torch.arange(n), torch.full((n,), delta)
    for layer, (k0, kd) in enumerate(zip(at_zero, at_delta)):
        moved = rope_rerotate(k0.clone(), idx, idx, shift, table, rotary_dim=head_dim, is_neox=True)
        error = ((moved - kd).abs().max() / kd.abs().max()).item()
        assert error < 1e-4, (layer, error)
        if layer == 0:  # the check has teeth: the other pair layout is far off
            wrong = rope_rerotate(k0.clone(), idx, idx, shift, table, rotary_dim=head_dim, is_neox=False)
            assert ((wrong - kd).abs().max() / kd.abs().max()).item() > 0.05
