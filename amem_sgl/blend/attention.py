"""Extend attention whose cost is linear in the cached length (CPU / torch_native path).

SGLang 0.5.23's ``TorchNativeAttnBackend._run_sdpa_forward_extend`` builds a query tensor of the
whole prefix+extend length and runs causal SDPA over the full square, then drops the prefix rows:
a cache hit still costs attention quadratic in the cached length (measured on 2 cores: 1 token over
3,999 cached tokens took 4.4 s, a cold 4,000-token prefill 9.8 s). This version queries only the
extend rows and masks keys by position (key position <= query position), which gives the same rows
and also makes attention over spliced or recomputed tokens correct by position.

amem's attention seam (amem_sgl.blend.backend) sets it on the torch_native backend instance of
servers started by amem's launcher; cross-attention, sliding-window and non-causal calls go to the
original. The seam's blend and probe passes call :func:`extend_attention` with the batch's query
positions, so scattered tokens recomputed at their true positions attend causally by position over
the whole spliced sequence.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn.functional import scaled_dot_product_attention


@dataclasses.dataclass(frozen=True)
class ExtendPlan:
    """What :func:`extend_attention` computes from a batch's rows and positions before attending:
    the same for every layer of a forward, so a blend pass builds it once (:func:`plan_extend`).

    ``seqs``: per sequence (row, first query row, query rows, keys, mask or None: causal from key 0);
    ``slots``: per row, the slots of its longest sequence's keys; ``runs``: per row, those slots as
    (first slot, count) stretches of consecutive slots when there are few (host tensors), else None."""

    seqs: tuple[tuple[int, int, int, int, torch.Tensor | None], ...]
    slots: dict[int, torch.Tensor]
    runs: dict[int, list[tuple[int, int]] | None] = dataclasses.field(default_factory=dict)


# A row's keys are gathered as slices when its slots form at most this many stretches (a request's
# slots come from the allocator in a few: its prefix, its spliced chunks, its new tokens), else with
# one index gather: the same values either way.
MAX_KEY_RUNS = 16


def slot_stretches(slots: torch.Tensor, max_runs: int = MAX_KEY_RUNS) -> list[tuple[int, int]] | None:
    """``slots`` (1-D, on the host) as (first slot, count) stretches of consecutive slots, or None
    when they break into more than ``max_runs`` (or live on a device)."""
    if slots.device.type != "cpu" or slots.numel() == 0:
        return None
    starts = [0] + (torch.nonzero(slots[1:] - slots[:-1] != 1).flatten() + 1).tolist()
    if len(starts) > max_runs:
        return None
    firsts = slots[starts].tolist()
    ends = starts[1:] + [slots.numel()]
    return [(int(first), end - start) for first, start, end in zip(firsts, starts, ends)]


# Rows at scattered positions (a blend pass's recomputed tokens) see only the keys up to their own
# position: attended in up to MAX_KEY_GROUPS groups of consecutive rows, each over the keys its last
# row sees, when that saves more rows x keys than GROUP_CALL_COST per extra SDPA call (CPU, 2 threads:
# a call costs about what 3,000 rows x keys do; ``python -m benchmarks.cpu_micro``).
MAX_KEY_GROUPS = 3
GROUP_CALL_COST = 3000


def key_groups(visible: list[int], call_cost: int = GROUP_CALL_COST,
               max_groups: int = MAX_KEY_GROUPS) -> list[tuple[int, int, int]]:
    """(first row, rows, keys) groups for rows that see ``visible[i]`` keys (non-decreasing): the
    split among a few candidate cuts with the fewest rows x keys (+ ``call_cost`` per extra group)."""
    n = len(visible)
    whole = [(0, n, visible[-1])] if n else []
    if n < 4 or max_groups < 2:
        return whole
    cuts = sorted({n * j // 8 for j in range(1, 8)} - {0, n})
    cost = lambda bounds: sum((b - a) * visible[b - 1] for a, b in zip(bounds, bounds[1:]))  # noqa: E731
    best, best_cost = [0, n], cost([0, n])
    options = [[0, c, n] for c in cuts]
    if max_groups >= 3:
        options += [[0, c, d, n] for i, c in enumerate(cuts) for d in cuts[i + 1:]]
    for bounds in options:
        c = cost(bounds) + call_cost * (len(bounds) - 2)
        if c < best_cost:
            best, best_cost = bounds, c
    return [(a, b - a, visible[b - 1]) for a, b in zip(best, best[1:])]


def plan_extend(req_to_token, req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
                positions: torch.Tensor | None, device) -> ExtendPlan:
    """The plan of one :func:`extend_attention` call (arguments as there; ``device``: the query's)."""
    rows, kv_lens = req_pool_indices.tolist(), seq_lens.tolist()
    q_lens, prefixes = extend_seq_lens.tolist(), extend_prefix_lens.tolist()
    longest: dict[int, int] = {}
    for row, kv_len in zip(rows, kv_lens):
        longest[row] = max(longest.get(row, 0), kv_len)
    seqs, start = [], 0
    for row, q_len, prefix, kv_len in zip(rows, q_lens, prefixes, kv_lens):
        q_pos = positions[start: start + q_len].to(torch.int64) if positions is not None else None
        contiguous = q_pos is None or (q_len > 0 and int(q_pos[0]) == prefix and int(q_pos[-1]) == kv_len - 1
                                       and bool((q_pos[1:] - q_pos[:-1] == 1).all()))
        mask = None
        if not (prefix == 0 and contiguous):
            if q_pos is None:
                q_pos = torch.arange(prefix, prefix + q_len, device=device)
            mask = torch.arange(kv_len, device=device)[None, :] <= q_pos.to(device)[:, None]
        if mask is not None and not contiguous and q_len >= 4 and bool((q_pos[1:] > q_pos[:-1]).all()):
            # scattered rows: each group of them over the keys its last row sees
            for first, rows_n, keys in key_groups((q_pos.clamp(max=kv_len - 1) + 1).tolist()):
                seqs.append((row, start + first, rows_n, keys, mask[first: first + rows_n, :keys].contiguous()))
        else:
            seqs.append((row, start, q_len, kv_len, mask))
        start += q_len
    slots = {row: req_to_token[row, :n] for row, n in longest.items()}
    return ExtendPlan(tuple(seqs), slots, {row: slot_stretches(row_slots) for row, row_slots in slots.items()})


def extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                     extend_prefix_lens, extend_seq_lens, *, scaling=None, enable_gqa=False,
                     positions: torch.Tensor | None = None, plan: ExtendPlan | None = None) -> torch.Tensor:
    """Causal-by-position extend attention for a batch (SGLang's torch_native argument contract).

    query/output: [num_extend_tokens, heads, head_dim]; k_cache/v_cache: [slots, kv_heads, head_dim];
    row ``req_pool_indices[i]`` of ``req_to_token`` holds the slots of sequence i's
    ``seq_lens[i]`` tokens. A query at position p sees keys at positions <= p. ``positions`` gives
    every query row's position; without it sequence i's queries sit at the end of its row
    (``extend_prefix_lens[i] + arange(extend_seq_lens[i])``), as in an ordinary extend. ``plan``:
    :func:`plan_extend` of these arguments, made once for all layers of a forward (None: made here).

    Sequences of one row (a folded blend pass: its recomputed tokens, then its extend) share one
    gather of that row's keys. A sequence at scattered positions (recomputed tokens) is attended in
    the plan's key groups (:func:`key_groups`): each group over the keys its last row sees, which
    changes the last bits of some of those rows against one call over all keys (the flash kernel's
    blocks differ) -- never of an ordinary extend's rows (contiguous up to the end of the sequence: a
    prefix hit's new tokens, exact mode). A blend pass's rows are grouped whatever its policy: ``all``
    (the preamble and the chunks around an in-place one) and a preamble computed as a gap at 0..p-1
    are at positions that do not run to the sequence's end, so ``all`` matches a full prefill up to
    these last bits, as the masked call it replaced did (not by construction).
    """
    if plan is None:
        plan = plan_extend(req_to_token, req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
                           positions, query.device)
    query = query.movedim(0, -2)  # [heads, tokens, head_dim]
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for row, start, q_len, kv_len, mask in plan.seqs:
        if row not in gathered:
            runs = plan.runs.get(row)
            if runs is None:
                slots = plan.slots[row]
                k, v = k_cache[slots], v_cache[slots]
            elif len(runs) == 1:  # a view: the same values and layout as the gather
                (first, n), = runs
                k, v = k_cache[first: first + n], v_cache[first: first + n]
            else:
                k = torch.cat([k_cache[first: first + n] for first, n in runs])
                v = torch.cat([v_cache[first: first + n] for first, n in runs])
            k, v = k.movedim(0, -2), v.movedim(0, -2)
            if k.dtype != query.dtype:
                k, v = k.to(query.dtype), v.to(query.dtype)
            gathered[row] = k, v
        k, v = (t[:, :kv_len] for t in gathered[row])
        q = query[:, start: start + q_len]
        if mask is None:
            out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                               is_causal=True, scale=scaling, enable_gqa=enable_gqa)
        else:
            out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                               attn_mask=mask, scale=scaling, enable_gqa=enable_gqa)
        output[start: start + q_len] = out.squeeze(0).movedim(-2, 0)
    return output


def linear_sdpa_forward_extend(stock, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                               seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                               enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
    """``TorchNativeAttnBackend._run_sdpa_forward_extend`` with linear cost in the cached length;
    ``stock`` is the backend's own method, which serves cross-attention, sliding-window and
    non-causal calls. Set per backend instance by amem_sgl.blend.backend.AmemAttnBackend."""
    if encoder_lens is not None or is_cross_attn or not causal or (
            sliding_window_size is not None and sliding_window_size > -1):
        return stock(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                     extend_prefix_lens, extend_seq_lens, encoder_lens=encoder_lens, scaling=scaling,
                     enable_gqa=enable_gqa, causal=causal, is_cross_attn=is_cross_attn,
                     sliding_window_size=sliding_window_size)
    return extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                            extend_prefix_lens, extend_seq_lens, scaling=scaling, enable_gqa=enable_gqa)


def attention_mass(query, k_cache, req_to_token, req_pool_indices, seq_lens, extend_seq_lens, positions,
                   score_from, *, scaling: float, into: list | None = None) -> list[torch.Tensor]:
    """The attention a request's question pays every key position, for a query-driven blend probe.

    For sequence i, the query rows at positions ``>= score_from[i]`` (its question) attend causally
    by position over the row's first ``seq_lens[i]`` keys (softmax of ``q.k * scaling``, grouped
    query heads mapped onto their KV head); the probabilities are summed over heads and question
    rows: one fp32 tensor [seq_lens[i]] per sequence, added into ``into[i]`` when given (one call
    per layer accumulates the layer sum). query: [tokens, heads, head_dim]; k_cache: [slots,
    kv_heads, head_dim]. Plain torch: the same code on CPU and CUDA tensors.
    """
    out = into if into is not None else [None] * int(seq_lens.shape[0])
    start = 0
    for i in range(seq_lens.shape[0]):
        q_len, kv_len = int(extend_seq_lens[i]), int(seq_lens[i])
        q_pos = positions[start: start + q_len].to(torch.int64)
        asks = q_pos >= int(score_from[i])
        q = query[start: start + q_len][asks].float()  # [t, heads, head_dim]
        start += q_len
        k = k_cache[req_to_token[req_pool_indices[i], :kv_len].long()].float()  # [kv, kv_heads, head_dim]
        group = q.shape[1] // k.shape[1]
        q = q.view(q.shape[0], k.shape[1], group, q.shape[2])
        scores = torch.einsum("tkgd,skd->kgts", q, k) * scaling  # [kv_heads, group, t, kv]
        visible = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[asks][:, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        mass = probs.sum(dim=(0, 1, 2))
        out[i] = mass if out[i] is None else out[i] + mass
    return out
