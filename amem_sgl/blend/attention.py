"""Extend attention whose cost is linear in the cached length (CPU / torch_native path).

SGLang 0.5.23's ``TorchNativeAttnBackend._run_sdpa_forward_extend`` builds a query tensor of the
whole prefix+extend length and runs causal SDPA over the full square, then drops the prefix rows:
a cache hit still costs attention quadratic in the cached length (measured on 2 cores: 1 token over
3,999 cached tokens took 4.4 s, a cold 4,000-token prefill 9.8 s). This version queries only the
extend rows and masks keys by position (key position <= query position), which gives the same rows
and also makes attention over spliced or recomputed tokens correct by position.

It is installed as an AROUND hook on that method (SGLang's plugin hook registry, see
amem_sgl.plugin) only in servers started by amem's launcher; cross-attention, sliding-window and
non-causal calls go to the original.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention


def extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                     extend_prefix_lens, extend_seq_lens, *, scaling=None, enable_gqa=False) -> torch.Tensor:
    """Causal extend attention for a batch; the argument contract of SGLang's torch_native method.

    query/output: [num_extend_tokens, heads, head_dim]; k_cache/v_cache: [slots, kv_heads, head_dim];
    row ``req_pool_indices[i]`` of ``req_to_token`` holds the slots of sequence i's
    ``seq_lens[i]`` tokens, of which the last ``extend_seq_lens[i]`` are being extended.
    """
    query = query.movedim(0, -2)  # [heads, tokens, head_dim]
    start = 0
    for i in range(seq_lens.shape[0]):
        q_len, prefix, kv_len = int(extend_seq_lens[i]), int(extend_prefix_lens[i]), int(seq_lens[i])
        q = query[:, start: start + q_len]
        slots = req_to_token[req_pool_indices[i], :kv_len]
        k = k_cache[slots].movedim(0, -2)
        v = v_cache[slots].movedim(0, -2)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        if prefix == 0:
            out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                               is_causal=True, scale=scaling, enable_gqa=enable_gqa)
        else:
            q_pos = torch.arange(prefix, prefix + q_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
            out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                               attn_mask=mask, scale=scaling, enable_gqa=enable_gqa)
        output[start: start + q_len] = out.squeeze(0).movedim(-2, 0)
        start += q_len
    return output


def around_torch_native_extend(original, backend, query, output, k_cache, v_cache, req_to_token,
                               req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
                               encoder_lens=None, scaling=None, enable_gqa=False, causal=False,
                               is_cross_attn=False, sliding_window_size=None):
    """AROUND hook for ``TorchNativeAttnBackend._run_sdpa_forward_extend``."""
    if encoder_lens is not None or is_cross_attn or not causal or (
            sliding_window_size is not None and sliding_window_size > -1):
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                        seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=encoder_lens,
                        scaling=scaling, enable_gqa=enable_gqa, causal=causal, is_cross_attn=is_cross_attn,
                        sliding_window_size=sliding_window_size)
    return extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                            extend_prefix_lens, extend_seq_lens, scaling=scaling, enable_gqa=enable_gqa)
