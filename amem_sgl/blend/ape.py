"""APE-style attention to spliced chunks: a temperature and a scaling factor, no recompute.

APE (Yang, Chen, Chen, "APE: Faster and Longer Context-Augmented Generation via Adaptive Parallel
Encoding", ICLR 2025, arXiv 2502.05431) encodes context chunks independently behind a shared prefix
-- as amem's spliced chunks are, each computed behind the chat preamble only -- and corrects the
query's attention instead of recomputing anything. Its rule, as the authors' Llama attention for the
query phase computes it (``llama_attention_prefill_query`` in the public APE code; read in the
``joshianirudh/APE`` copy of it, ``ape.py``): the keys a query row sees fall into blocks -- the
shared prefix, the parallel-encoded documents, the query's own tokens (causal) -- and with
attention logits ``l = q.k * scaling``

* inside the document block the distribution is ``softmax(l / T)``;
* the block's weight against the others is ``exp(T * logsumexp(l / T) + log S)``; the prefix and the
  query's own block keep ``exp(logsumexp(l))`` (so, for ``T = S = 1``, plain attention);
* the output is the blocks' outputs mixed by the softmax of those block weights.

Here the document block is every key at a position inside one of the request's spliced chunk spans
(recomputed ones too: APE does not distinguish them); every other visible key (preamble, gaps, text
between chunks, the request's own tokens) is the plain block. Visibility is causal by position, as
amem_sgl.blend.attention.extend_attention has it (key position <= query position; key ``j`` of a
row is at position ``j``). The two-block mix equals one softmax over all visible keys in which a
document key's logit is ``l / T + c`` with ``c = (T - 1) * logsumexp_doc(l / T) + log S`` -- which
is how :func:`ape_attention` computes it, in fp32, the same code on CPU and CUDA tensors.

APE applies the rule to the query's prefill and to every generated token; so does amem: the
request's own extend (the question rows) and each of its decode steps (amem_sgl.blend.runner).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["ApeRows", "ape_attention", "apply_ape", "chunk_mask"]

ROW_BLOCK = 256  # query rows per step (bounds the [heads, rows, keys] fp32 logits)

# One sequence's APE setting: (temperature, scale, spans as (start, length) of key positions).
ApeRows = tuple[float, float, Sequence[tuple[int, int]]]


def chunk_mask(spans: Sequence[tuple[int, int]], n: int, device=None) -> torch.Tensor:
    """[n] bool: key position inside one of ``spans`` ((start, length) pairs)."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    for start, length in spans:
        mask[max(start, 0): min(start + length, n)] = True
    return mask


def ape_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, in_chunk: torch.Tensor,
                  temperature: float, scale: float, *, scaling: float, delta: bool = False) -> torch.Tensor:
    """APE attention of one sequence's query rows (see the module docstring).

    q: [t, heads, d]; k, v: [n, kv_heads, d] (key ``j`` at position ``j``; grouped query heads map
    onto ``heads // kv_heads`` KV heads); q_pos: [t] positions; in_chunk: [n] bool (document keys).
    Returns [t, heads, d_v] in q's dtype; with ``delta``, in fp32, APE's output minus plain causal
    attention's (both computed here in fp32: the correction to add to a plain attention output)."""
    if temperature <= 0 or scale <= 0:
        raise ValueError(f"APE temperature and scale must be > 0, got {temperature!r}, {scale!r}")
    t, heads, d = q.shape
    n, kv_heads = k.shape[0], k.shape[1]
    group = heads // kv_heads
    kf, vf = k.float(), v.float()
    in_chunk = in_chunk.to(q.device)
    keys = torch.arange(n, device=q.device)
    log_scale = math.log(scale)
    out = q.new_empty(t, heads, v.shape[-1], dtype=torch.float32 if delta else q.dtype)
    for lo in range(0, t, ROW_BLOCK):
        hi = min(lo + ROW_BLOCK, t)
        qf = q[lo:hi].float().view(hi - lo, kv_heads, group, d)
        logits = torch.einsum("tkgd,nkd->kgtn", qf, kf) * scaling  # [kv_heads, group, rows, n]
        visible = keys[None, :] <= q_pos[lo:hi].to(q.device, torch.int64)[:, None]  # [rows, n]
        doc = visible & in_chunk[None, :]
        plain = visible & ~in_chunk[None, :]
        doc_logits = (logits / temperature).masked_fill(~doc, float("-inf"))
        lse = torch.logsumexp(doc_logits, dim=-1, keepdim=True)
        shift = torch.where(torch.isfinite(lse), (temperature - 1.0) * lse + log_scale, torch.zeros_like(lse))
        adjusted = torch.where(doc, doc_logits + shift, logits.masked_fill(~plain, float("-inf")))
        probs = torch.softmax(adjusted, dim=-1)
        if delta:
            probs = probs - torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        rows = torch.einsum("kgtn,nkd->tkgd", probs, vf).reshape(hi - lo, heads, v.shape[-1])
        out[lo:hi] = rows.to(out.dtype)
    return out


def apply_ape(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens,
              extend_seq_lens, positions, parts: Sequence[ApeRows | None], *, scaling: float,
              onto_plain: bool = False) -> torch.Tensor:
    """Write, in ``output``, the rows of every sequence ``i`` with ``parts[i]`` set: their APE
    attention over the row's first ``seq_lens[i]`` keys (SGLang's torch_native argument contract, as
    amem_sgl.blend.attention.extend_attention: query/output [tokens, heads, d], k/v_cache [slots,
    kv_heads, d], sequence i's ``extend_seq_lens[i]`` query rows in order). ``positions`` gives
    every query row's position; None: the rows sit at ``extend_prefix_lens[i] + arange``.

    ``onto_plain``: ``output`` already holds those rows' plain causal attention (the seam's extend
    attention, in the model's dtype); APE's correction (APE minus plain, both in fp32) is added to
    it. So ``T = S = 1`` leaves the served extend exactly as it was, and a bf16 model's APE output
    differs from its plain one by the rule only, not by fp32 arithmetic."""
    q_lens, kv_lens, prefixes = extend_seq_lens.tolist(), seq_lens.tolist(), extend_prefix_lens.tolist()
    rows = req_pool_indices.tolist()
    if len(parts) != len(q_lens):
        raise ValueError(f"APE: {len(parts)} settings for {len(q_lens)} sequences")
    start = 0
    for i, part in enumerate(parts):
        q_len, kv_len = q_lens[i], kv_lens[i]
        if part is not None and q_len > 0:
            temperature, scale, spans = part
            slots = req_to_token[rows[i], :kv_len].long()
            if positions is not None:
                q_pos = positions[start: start + q_len].to(torch.int64)
            else:
                q_pos = torch.arange(prefixes[i], prefixes[i] + q_len, device=query.device)
            got = ape_attention(query[start: start + q_len], k_cache[slots], v_cache[slots], q_pos,
                                chunk_mask(spans, kv_len, query.device), temperature, scale, scaling=scaling,
                                delta=onto_plain)
            if onto_plain:
                got = output[start: start + q_len].float() + got
            output[start: start + q_len] = got.to(output.dtype)
        start += q_len
    return output
