"""A blend pass folded into the batch's own extend: one forward instead of two.

A separate blend pass is a whole extra model forward before the batch's extend; on a small model on
CPU most of a forward's cost does not depend on its token count (the weights are read once per
linear layer per forward, and each layer launches the same ops), so the pass cost more than the
extend of the new tokens (cost curve, per-query memory turn: 190 ms blend for ~60 tokens, 126 ms
extend for ~20). Folded, each request's recomputed tokens go in front of its extend tokens in the
batch's own forward (the shape of SGLang's encoder-SWA fold, ``fold_encoder_swa_replay``), at their
true positions, into their own slots, and the attention seam serves every layer
(``BlendContext.fold``): the recomputed rows attend over the first ``end`` slots of their row, the
extend rows over the whole row, each part as its own sequence -- the same query rows over the same
keys as the two forwards it replaces. Linear layers, norms and rotary embeddings work row by row,
so the KV and the first token are those of the separate pass followed by the extend (the seam test
compares them bit for bit).

Folded only where the result is the same by construction: the CPU torch attention path with amem's
linear extend (the stock extend attention is the same function), a plain EXTEND batch (no mixed
decode rows, no speculative or DP-attention batches), no logprobs or hidden states asked for, no
multimodal inputs. Otherwise the runner runs the separate blend pass as before.
"""

from __future__ import annotations

import copy

import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.blend.context import FoldRows

__all__ = ["can_fold", "fold_batch"]


def can_fold(backend, kernel: str, batch, capture_hidden_mode=None) -> bool:
    """Whether this batch's blend pass can ride in its own extend (see the module docstring)."""
    return (kernel == "torch" and backend is not None and backend.linear_extend
            and batch.forward_mode == sgl.ForwardMode.EXTEND
            and batch.input_ids is not None and batch.out_cache_loc is not None
            and not batch.return_logprob and not getattr(batch, "return_hidden_states", False)
            and capture_hidden_mode in (None, sgl.CaptureHiddenMode.NULL)
            and batch.spec_info is None and batch.global_num_tokens is None
            and not any(mm is not None for mm in (batch.multimodal_inputs or ())))


def fold_batch(batch, runner, rows, ape: dict | None = None) -> tuple[object, FoldRows]:
    """A copy of ``batch`` whose extend also computes, for each (index, end, positions) in ``rows``,
    the tokens at ``positions`` of that request over its first ``end`` slots; and the rows the
    attention seam serves it by. ``ape``: {index: APE setting} of requests whose extend part attends
    by APE's rule (amem_sgl.blend.ape); a request may have a setting and no recomputed tokens."""
    device = runner.device
    req_to_token = runner.req_to_token_pool.req_to_token
    blend = {i: (end, list(positions)) for i, end, positions in rows}
    pool_rows = batch.req_pool_indices_cpu.tolist()
    seq_lens = batch.seq_lens_cpu.tolist()
    ids, locs, cpu_ids, positions = [], [], [], []
    part_rows, part_seq, part_prefix, part_ext, part_ape = [], [], [], [], []
    prefix_lens, extend_lens, off = [], [], 0
    for k, req in enumerate(batch.reqs):
        n, prefix = batch.extend_lens[k], batch.prefix_lens[k]
        end, picked = blend.get(k, (0, []))
        if picked:
            head = [req.origin_input_ids[p] for p in picked]
            ids.append(torch.tensor(head, dtype=batch.input_ids.dtype, device=device))
            cpu_ids.append(torch.tensor(head, dtype=torch.int64))
            locs.append(req_to_token[pool_rows[k], picked].long())
            positions.append(torch.tensor(picked, dtype=torch.int64))
            part_rows.append(pool_rows[k]), part_seq.append(end)
            part_prefix.append(end - len(picked)), part_ext.append(len(picked))
            part_ape.append(None)
        ids.append(batch.input_ids[off: off + n])
        locs.append(batch.out_cache_loc[off: off + n].long())
        if batch.prefill_input_ids_cpu is not None:
            cpu_ids.append(batch.prefill_input_ids_cpu[off: off + n].to(torch.int64))
        positions.append(torch.arange(prefix, prefix + n, dtype=torch.int64))
        part_rows.append(pool_rows[k]), part_seq.append(seq_lens[k])
        part_prefix.append(prefix), part_ext.append(n)
        part_ape.append((ape or {}).get(k))
        prefix_lens.append(prefix - len(picked))
        extend_lens.append(n + len(picked))
        off += n
    folded = copy.copy(batch)
    folded.input_ids = torch.cat(ids)
    folded.out_cache_loc = torch.cat(locs)
    folded.prefill_input_ids_cpu = torch.cat(cpu_ids) if batch.prefill_input_ids_cpu is not None else None
    folded.prefix_lens = prefix_lens
    folded.extend_lens = extend_lens
    folded.extend_num_tokens = sum(extend_lens)
    if batch.extend_logprob_start_lens is not None:
        folded.extend_logprob_start_lens = [x + e - n for x, e, n in zip(batch.extend_logprob_start_lens,
                                                                          extend_lens, batch.extend_lens)]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    return folded, FoldRows(torch.cat(positions), as_tensor(part_rows), as_tensor(part_seq),
                            as_tensor(part_prefix), as_tensor(part_ext),
                            ape=part_ape if any(a is not None for a in part_ape) else None)
