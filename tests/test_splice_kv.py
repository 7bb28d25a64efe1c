"""splice_kv's CPU path (cos/sin gathered once per splice; slice copies for runs of consecutive
slots, else one gather + index_copy_ per layer; keys of delta-0 rows copied, not rotated) against
the kernel's torch reference applied layer by layer, on fresh random KV: the same values, bit for
bit, for bf16 and fp32 pools, both RoPE layouts, partial rotary dims and negative deltas."""

from __future__ import annotations

import types

import pytest
import torch

from amem_sgl.cache.splice import RopeSpec, splice_kv, splice_runs
from kernels.rope_rerotate import rope_rerotate_reference


def _pool(layers: int, slots: int, heads: int, head_dim: int, dtype, gen):
    k = [torch.randn(slots, heads, head_dim, generator=gen).to(dtype) for _ in range(layers)]
    v = [torch.randn(slots, heads, head_dim, generator=gen).to(dtype) for _ in range(layers)]
    return types.SimpleNamespace(start_layer=0, layer_num=layers, k=k, v=v,
                                 get_key_buffer=lambda i: k[i], get_value_buffer=lambda i: v[i])


def _table(positions: int, rotary_dim: int, mscale: float = 1.0) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv[None, :]
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * mscale).contiguous()


def _chunks(gen, slots: int, deltas: list[int]):
    """Rows as a splice of chunks makes them: each chunk's consecutive source slots into
    consecutive fresh slots, one delta per chunk (random lengths and places, disjoint)."""
    lengths = torch.randint(5, 40, (len(deltas),), generator=gen).tolist()
    starts = torch.randperm(slots // 100 - 1, generator=gen)[: 2 * len(deltas)] * 100
    src = torch.cat([torch.arange(int(s), int(s) + n) for s, n in zip(starts[: len(deltas)], lengths)])
    base = int(starts[len(deltas)])
    dst = torch.arange(base, base + sum(lengths)) if base + sum(lengths) <= slots else None
    if dst is None or bool(torch.isin(dst, src).any()):
        dst = torch.arange(slots - sum(lengths), slots)
        assert not bool(torch.isin(dst, src).any())
    delta = torch.cat([torch.full((n,), d, dtype=torch.int64) for n, d in zip(lengths, deltas)])
    return src, dst, delta


def _rows(layout: str, gen, slots: int, n: int):
    if layout == "chunks":  # a few runs, one of them in place (delta 0): slice copies
        return _chunks(gen, slots, [0, 17, -5, 290])
    perm = torch.randperm(slots, generator=gen)
    src, dst = perm[:n].contiguous(), perm[n: 2 * n].contiguous()
    delta = torch.randint(-200, 200, (n,), generator=gen)
    if layout == "scattered-some-zero":  # no runs, a third of the rows not rotated
        delta[torch.randperm(n, generator=gen)[: n // 3]] = 0
    elif layout == "scattered-all-zero":
        delta.zero_()
    return src, dst, delta


@pytest.mark.parametrize("layout", ["scattered", "chunks", "scattered-some-zero", "scattered-all-zero"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("is_neox,rotary_dim,mscale", [(True, 64, 1.0), (False, 64, 1.0), (True, 32, 1.3)])
def test_splice_kv_matches_the_reference_layer_by_layer(dtype, is_neox, rotary_dim, mscale, layout):
    gen = torch.Generator().manual_seed(rotary_dim + int(is_neox) + (dtype == torch.float32) + 10 * len(layout))
    layers, slots, heads, head_dim, n = 5, 600, 3, 64, 150
    pool = _pool(layers, slots, heads, head_dim, dtype, gen)
    want = _pool(layers, slots, heads, head_dim, dtype, gen)
    for i in range(layers):  # the same starting KV
        want.k[i].copy_(pool.k[i]), want.v[i].copy_(pool.v[i])
    src, dst, delta = _rows(layout, gen, slots, n)
    runs = splice_runs(src, dst, delta)
    assert (runs is not None and len(runs) == 4) if layout == "chunks" else runs is None
    table = _table(512, rotary_dim, mscale)
    rope = RopeSpec(torch.nn.Identity(), table, rotary_dim, head_dim, is_neox)
    splice_kv(pool, src, dst, delta, rope)
    for i in range(layers):
        rope_rerotate_reference(want.k[i], src, dst, delta, table, rotary_dim=rotary_dim, is_neox=is_neox)
        want.v[i][dst] = want.v[i][src]
        assert torch.equal(pool.k[i], want.k[i]) and torch.equal(pool.v[i], want.v[i])
    # The check can fail: the spliced slots did change (keys rotated, values copied).
    moved = delta != 0
    assert torch.equal(pool.v[0][dst], pool.v[0][src]) and torch.equal(pool.k[0][dst[~moved]], pool.k[0][src[~moved]])
    assert not moved.any() or not torch.equal(pool.k[0][dst[moved]], pool.k[0][src[moved]])


def test_splice_kv_rejects_bad_indices_before_moving_anything():
    gen = torch.Generator().manual_seed(7)
    pool = _pool(2, 64, 1, 8, torch.float32, gen)
    before = [k.clone() for k in pool.k]
    rope = RopeSpec(torch.nn.Identity(), _table(32, 8), 8, 8, True)
    with pytest.raises(IndexError):
        splice_kv(pool, torch.tensor([1, 2]), torch.tensor([3, 64]), torch.tensor([1, 1]), rope)
    with pytest.raises(ValueError):
        splice_kv(pool, torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([1, 40]), rope)
    assert all(torch.equal(a, b) for a, b in zip(pool.k, before))
