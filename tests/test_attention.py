"""The linear-cost extend attention against SGLang's torch_native method and an fp64 reference."""

from __future__ import annotations

import pytest
import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.blend.attention import extend_attention, linear_sdpa_forward_extend

HEADS, KV_HEADS, DIM = 9, 3, 64  # SmolLM2's GQA layout
BATCH = [(0, 7), (37, 5), (100, 1), (12, 30)]  # (cached prefix, extended tokens) per sequence


def make_batch(dtype, gen):
    slots = 512
    k_cache = torch.randn(slots, KV_HEADS, DIM, generator=gen).to(dtype)
    v_cache = torch.randn(slots, KV_HEADS, DIM, generator=gen).to(dtype)
    req_to_token = torch.zeros(len(BATCH) + 1, 256, dtype=torch.int32)
    perm = torch.randperm(slots - 1, generator=gen) + 1
    used = 0
    for i, (prefix, q_len) in enumerate(BATCH):
        n = prefix + q_len
        req_to_token[i + 1, :n] = perm[used: used + n].int()
        used += n
    q = torch.randn(sum(q for _, q in BATCH), HEADS, DIM, generator=gen).to(dtype)
    return dict(query=q, k_cache=k_cache, v_cache=v_cache, req_to_token=req_to_token,
                req_pool_indices=torch.arange(1, len(BATCH) + 1),
                seq_lens=torch.tensor([p + q for p, q in BATCH]),
                extend_prefix_lens=torch.tensor([p for p, _ in BATCH]),
                extend_seq_lens=torch.tensor([q for _, q in BATCH]))


def reference(b, scale):
    out, start = [], 0
    for i, (prefix, q_len) in enumerate(BATCH):
        q = b["query"][start: start + q_len].double()
        slots = b["req_to_token"][i + 1, : prefix + q_len].long()
        k = b["k_cache"][slots].double().repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = b["v_cache"][slots].double().repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        visible = torch.arange(prefix + q_len)[None, :] <= torch.arange(prefix, prefix + q_len)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        start += q_len
    return torch.cat(out)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_same_rows_as_sglang_torch_native_and_the_fp64_reference(dtype, tol):
    gen = torch.Generator().manual_seed(torch.seed())
    b = make_batch(dtype, gen)
    scale = DIM ** -0.5
    ours = extend_attention(output=torch.full_like(b["query"], float("nan")), scaling=scale, enable_gqa=True, **b)
    stock = sgl.TorchNativeAttnBackend._run_sdpa_forward_extend(
        None, b["query"], torch.full_like(b["query"], float("nan")), b["k_cache"], b["v_cache"],
        b["req_to_token"], b["req_pool_indices"], b["seq_lens"], b["extend_prefix_lens"],
        b["extend_seq_lens"], None, scaling=scale, enable_gqa=True, causal=True)
    assert not torch.isnan(ours).any()
    torch.testing.assert_close(ours, stock, rtol=tol, atol=tol, msg=f"seed {gen.initial_seed()}")
    torch.testing.assert_close(ours.double(), reference(b, scale), rtol=tol, atol=tol)


@pytest.mark.parametrize("kwargs", [dict(sliding_window_size=16), dict(is_cross_attn=True),
                                    dict(causal=False)], ids=["sliding-window", "cross-attn", "non-causal"])
def test_other_attention_kinds_go_to_the_original(kwargs):
    calls = []
    b = make_batch(torch.float32, torch.Generator().manual_seed(0))
    args = dict(causal=True) | kwargs
    linear_sdpa_forward_extend(lambda *a, **k: calls.append(k) or "original", b["query"],
                               torch.empty_like(b["query"]), b["k_cache"], b["v_cache"], b["req_to_token"],
                               b["req_pool_indices"], b["seq_lens"], b["extend_prefix_lens"],
                               b["extend_seq_lens"], **args)
    assert len(calls) == 1 and all(calls[0][k] == v for k, v in args.items())


def _one_call_per_sequence(query, k_cache, v_cache, req_to_token, rows, kv_lens, positions, scale):
    """The plain form: every sequence's rows in one masked SDPA call over all its keys (rows at
    scattered positions: one call per key group, over the keys its last row sees)."""
    from amem_sgl.blend.attention import key_groups

    out, start = [], 0
    for row, kv_len, q_pos in zip(rows, kv_lens, positions):
        scattered = len(q_pos) >= 4 and bool((q_pos[1:] - q_pos[:-1] != 1).any())
        groups = key_groups((q_pos + 1).tolist()) if scattered else [(0, len(q_pos), kv_len)]
        for first, n, keys in groups:
            slots = req_to_token[row, :keys].long()
            k, v = k_cache[slots].movedim(0, -2), v_cache[slots].movedim(0, -2)
            q = query[start + first: start + first + n].movedim(0, -2)
            mask = torch.arange(keys)[None, :] <= q_pos[first: first + n, None]
            o = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                                                 scale=scale, enable_gqa=True)
            out.append(o[0].movedim(-2, 0))
        start += len(q_pos)
    return torch.cat(out)


def test_key_groups_cover_the_rows_in_order_over_what_each_last_row_sees():
    """Scattered rows are split where it saves attention work: the groups cover every row once, in
    order; each attends over exactly the keys its last row sees; the rows x keys plus the call cost
    never exceed one call over all keys; and rows that all see nearly everything stay whole."""
    from amem_sgl.blend.attention import GROUP_CALL_COST, key_groups

    gen = torch.Generator().manual_seed(torch.seed())
    for _ in range(50):
        n = int(torch.randint(1, 300, (1,), generator=gen))
        visible = (torch.randperm(4000, generator=gen)[:n].sort().values + 1).tolist()
        groups = key_groups(visible)
        assert [g[0] for g in groups] == [0] + [sum(g[1] for g in groups[:i + 1]) for i in range(len(groups) - 1)]
        assert sum(g[1] for g in groups) == n and all(keys == visible[a + m - 1] for a, m, keys in groups)
        assert 1 <= len(groups) <= 3
        work = sum(m * keys for _, m, keys in groups) + GROUP_CALL_COST * (len(groups) - 1)
        assert work <= n * visible[-1]
    spread = list(range(1, 1601, 40))  # 40 rows spread over 1,600 keys: split
    assert len(key_groups(spread)) > 1
    assert key_groups(list(range(1560, 1600))) == [(0, 40, 1599)]  # all near the end: one call


@pytest.mark.parametrize("kv_len,rows", [(40, None), (1500, 60)], ids=["few-rows", "key-groups"])
def test_scattered_query_positions_attend_causally_by_position(kv_len, rows):
    """The blend pass's shape: queries for a few positions inside a 40-token sequence; and enough
    scattered rows over enough keys that the plan splits them into key groups. Every row attends
    causally by position over exactly its keys (fp32 within 1e-5 of fp64)."""
    from amem_sgl.blend.attention import plan_extend

    gen = torch.Generator().manual_seed(torch.seed())
    slots = 64 if rows is None else 2048
    picked = (torch.tensor([0, 3, 17, 18, 39]) if rows is None
              else torch.randperm(kv_len, generator=gen)[:rows].sort().values)
    k_cache = torch.randn(slots, KV_HEADS, DIM, generator=gen)
    v_cache = torch.randn(slots, KV_HEADS, DIM, generator=gen)
    row = torch.randperm(slots - 1, generator=gen)[:kv_len] + 1
    req_to_token = torch.zeros(2, slots, dtype=torch.int32)
    req_to_token[1, :kv_len] = row.int()
    q = torch.randn(len(picked), HEADS, DIM, generator=gen)
    args = (req_to_token, torch.tensor([1]), torch.tensor([kv_len]), torch.tensor([kv_len - len(picked)]),
            torch.tensor([len(picked)]))
    groups = len(plan_extend(*args, picked, torch.device("cpu")).seqs)
    assert groups == 1 if rows is None else groups > 1  # the grouped path, where it should be
    out = extend_attention(q, torch.full_like(q, float("nan")), k_cache, v_cache, *args, scaling=DIM ** -0.5,
                           enable_gqa=True, positions=picked)
    k = k_cache[row.long()].double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v_cache[row.long()].double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    for i, p in enumerate(picked.tolist()):
        scores = torch.einsum("hd,khd->hk", q[i].double(), k[: p + 1]) * DIM ** -0.5
        want = torch.einsum("hk,khd->hd", scores.softmax(-1), v[: p + 1])
        torch.testing.assert_close(out[i].double(), want, rtol=1e-5, atol=1e-5, msg=f"position {p}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("seed", range(6))
def test_sequences_sharing_a_row_give_the_rows_of_one_call_per_sequence_bit_for_bit(dtype, seed):
    """extend_attention gathers a row's keys once for the sequences sharing it (a folded blend pass:
    recomputed tokens over the first ``end`` keys, then the extend over all): the output is that of
    one masked SDPA call per sequence over its own gathered keys, exactly."""
    gen = torch.Generator().manual_seed(1000 + seed)
    slots = 4096
    k_cache = (torch.randn(slots, KV_HEADS, DIM, generator=gen) * 2).to(dtype)
    v_cache = torch.randn(slots, KV_HEADS, DIM, generator=gen).to(dtype)
    req_to_token = torch.randperm(slots, generator=gen)[: 2 * 2000].reshape(2, 2000).int()
    kv = int(torch.randint(600, 2000, (1,), generator=gen))
    end = int(torch.randint(300, kv - 20, (1,), generator=gen))
    picked = torch.randperm(end, generator=gen)[:40].sort().values  # recomputed tokens over the first `end`
    tail = torch.arange(kv - 20, kv)  # the extend over the whole row
    other = torch.arange(700, 900)  # another request's extend: 200 rows over 900 keys
    rows, kv_lens, positions = [0, 0, 1], [end, kv, 900], [picked, tail, other]
    query = (torch.randn(sum(len(p) for p in positions), HEADS, DIM, generator=gen) * 2).to(dtype)
    want = _one_call_per_sequence(query, k_cache, v_cache, req_to_token, rows, kv_lens, positions, 0.125)
    got = extend_attention(query, torch.full_like(query, float("nan")), k_cache, v_cache, req_to_token,
                           torch.tensor(rows), torch.tensor(kv_lens),
                           torch.tensor([end - 40, kv - 20, 700]), torch.tensor([40, 20, 200]),
                           scaling=0.125, enable_gqa=True, positions=torch.cat(positions))
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_a_plan_made_once_serves_every_layer_bit_for_bit(seed):
    """The seam makes extend_attention's plan (masks, row slots) at a pass's first layer and reuses
    it: for layers with their own KV (fresh random caches), the planned call writes exactly what
    the unplanned call does, and the plan holds no layer's tensors."""
    from amem_sgl.blend.attention import plan_extend

    gen = torch.Generator().manual_seed(2000 + seed)
    slots = 4096
    req_to_token = torch.randperm(slots, generator=gen)[: 2 * 2000].reshape(2, 2000).int()
    kv = int(torch.randint(600, 2000, (1,), generator=gen))
    end = int(torch.randint(300, kv - 20, (1,), generator=gen))
    picked = torch.randperm(end, generator=gen)[:40].sort().values
    positions = torch.cat([picked, torch.arange(kv - 20, kv), torch.arange(0, 64)])  # + a fresh prefill
    args = (req_to_token, torch.tensor([0, 0, 1]), torch.tensor([end, kv, 64]), torch.tensor([end - 40, kv - 20, 0]),
            torch.tensor([40, 20, 64]))
    plan = plan_extend(*args, positions, torch.device("cpu"))
    # the fresh prefill (last): causal SDPA; the scattered rows (first) may be split into key groups
    assert [m is None for *_, m in plan.seqs][-3:] == [False, False, True] and all(m is not None for *_, m in plan.seqs[:-1])
    for _layer in range(3):
        k_cache = (torch.randn(slots, KV_HEADS, DIM, generator=gen) * 2).bfloat16()
        v_cache = torch.randn(slots, KV_HEADS, DIM, generator=gen).bfloat16()
        query = (torch.randn(len(positions), HEADS, DIM, generator=gen) * 2).bfloat16()
        want = extend_attention(query, torch.full_like(query, float("nan")), k_cache, v_cache, *args,
                                scaling=0.125, enable_gqa=True, positions=positions)
        got = extend_attention(query, torch.full_like(query, float("nan")), k_cache, v_cache, *args,
                               scaling=0.125, enable_gqa=True, positions=positions, plan=plan)
        assert torch.equal(got, want) and not torch.isnan(got).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_keys_gathered_as_slices_give_the_gathers_rows_bit_for_bit(seed):
    """Rows whose slots come in a few stretches (one, three) are read as slices (a view, or one
    concatenation), a scattered row with one gather: every output row equals the gather path's, on
    fresh random KV, for a folded row (two sequences) and plain ones."""
    import dataclasses

    from amem_sgl.blend.attention import plan_extend, slot_stretches

    gen = torch.Generator().manual_seed(3000 + seed)
    slots, width = 4096, 900
    req_to_token = torch.zeros(3, width, dtype=torch.int32)
    req_to_token[0] = torch.arange(1000, 1000 + width)  # one stretch
    req_to_token[1] = torch.cat([torch.arange(50, 80), torch.arange(2000, 2500), torch.arange(300, 670)])  # three
    req_to_token[2] = torch.randperm(slots, generator=gen)[:width]  # scattered
    assert slot_stretches(req_to_token[0]) == [(1000, width)]
    assert slot_stretches(req_to_token[1]) == [(50, 30), (2000, 500), (300, 370)]
    assert slot_stretches(req_to_token[2]) is None
    kv = [int(torch.randint(400, width, (1,), generator=gen)) for _ in range(3)]
    picked = torch.randperm(kv[1] - 30, generator=gen)[:25].sort().values
    positions = torch.cat([picked, torch.arange(kv[1] - 30, kv[1]), torch.arange(kv[0] - 12, kv[0]),
                           torch.arange(kv[2] - 7, kv[2])])
    args = (req_to_token, torch.tensor([1, 1, 0, 2]), torch.tensor([kv[1] - 30, kv[1], kv[0], kv[2]]),
            torch.tensor([kv[1] - 55, kv[1] - 30, kv[0] - 12, kv[2] - 7]), torch.tensor([25, 30, 12, 7]))
    plan = plan_extend(*args, positions, torch.device("cpu"))
    assert plan.runs[0] is not None and plan.runs[1] is not None and plan.runs[2] is None
    gathered = dataclasses.replace(plan, runs={})
    for dtype in (torch.bfloat16, torch.float32):
        k_cache = (torch.randn(slots, KV_HEADS, DIM, generator=gen) * 2).to(dtype)
        v_cache = torch.randn(slots, KV_HEADS, DIM, generator=gen).to(dtype)
        query = (torch.randn(len(positions), HEADS, DIM, generator=gen) * 2).to(dtype)
        outs = [extend_attention(query, torch.full_like(query, float("nan")), k_cache, v_cache, *args,
                                 scaling=0.125, enable_gqa=True, positions=positions, plan=p)
                for p in (plan, gathered)]
        assert torch.equal(outs[0], outs[1]) and not torch.isnan(outs[0]).any()
