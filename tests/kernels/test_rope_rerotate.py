"""rope_rerotate: the Triton kernel (Triton interpreter on CPU) against its torch reference, and the
reference against SGLang's own RotaryEmbedding (plain, YaRN, llama3 scaling)."""

from __future__ import annotations

import pytest
import torch

import kernels.rope_rerotate as rope_module
from kernels.rope_rerotate import check_rerotate_indices, rope_rerotate, rope_rerotate_reference
from tests.pools import publish_cpu_context

# Tolerances for "Triton vs reference": both compute in fp32 and cast once, so fp32 agrees to
# rounding and the cast types to one unit in the last place.
ULP_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
           torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.fixture
def rng():
    seed = torch.seed()  # fresh inputs every run; the seed is in the failure message
    return torch.Generator().manual_seed(seed)


def cos_sin_table(rotary_dim: int, max_pos: int = 4096, base: float = 10000.0, mscale: float = 1.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * mscale).contiguous()


def case(rng, *, slots, heads, head_dim, n, dtype, max_delta=3000):
    k = torch.randn(slots, heads, head_dim, generator=rng).to(dtype)
    perm = torch.randperm(slots, generator=rng)
    src, dst = perm[:n].clone(), perm[n:2 * n].clone()
    delta = torch.randint(-max_delta, max_delta + 1, (n,), generator=rng)
    return k, src, dst, delta


SHAPES = [  # (kv heads, head_dim, rotary_dim, tokens): GQA kv-head counts, non-power-of-two everything
    (3, 64, 64, 37),     # SmolLM2: 3 kv heads x 64
    (8, 128, 128, 300),  # Llama-3-8B: 8 kv heads x 128
    (5, 96, 64, 1),      # partial rotary, odd heads, one token
    (1, 80, 80, 129),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads, head_dim, rotary_dim, n", SHAPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_triton_matches_reference_gather_scatter(rng, dtype, heads, head_dim, rotary_dim, n, is_neox):
    k, src, dst, delta = case(rng, slots=2 * n + 11, heads=heads, head_dim=head_dim, n=n, dtype=dtype)
    table = cos_sin_table(rotary_dim, mscale=1.25)
    untouched = torch.ones(k.shape[0], dtype=torch.bool)
    untouched[dst] = False
    want = rope_rerotate_reference(k.clone(), src, dst, delta, table, rotary_dim=rotary_dim,
                                   is_neox=is_neox)
    got = rope_rerotate(k.clone(), src, dst, delta, table, rotary_dim=rotary_dim, is_neox=is_neox,
                        backend="triton")
    torch.testing.assert_close(got, want, **ULP_TOL[dtype], msg=f"seed {rng.initial_seed()}")
    assert torch.equal(got[untouched], k[untouched])  # nothing else written
    # The pass-through dims are copied bit for bit.
    assert torch.equal(got[dst][..., rotary_dim:], k[src][..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_in_place_and_into_another_buffer(rng, dtype):
    k, src, _, delta = case(rng, slots=200, heads=3, head_dim=64, n=70, dtype=dtype)
    table = cos_sin_table(64)
    want = rope_rerotate_reference(k.clone(), src, src, delta, table, rotary_dim=64)
    got = rope_rerotate(k.clone(), src, src, delta, table, rotary_dim=64, backend="triton")
    torch.testing.assert_close(got, want, **ULP_TOL[dtype], msg=f"seed {rng.initial_seed()}")
    other = torch.zeros_like(k)
    dst = torch.arange(70)
    out = rope_rerotate(k, src, dst, delta, table, rotary_dim=64, k_dst=other, backend="triton")
    assert out is other
    torch.testing.assert_close(other[:70], want[src], **ULP_TOL[dtype], msg=f"seed {rng.initial_seed()}")


def test_rotations_compose_and_invert(rng):
    k, src, _, d1 = case(rng, slots=64, heads=4, head_dim=64, n=64, dtype=torch.float32, max_delta=1500)
    d2 = torch.randint(-1500, 1501, (64,), generator=rng)
    table = cos_sin_table(64, mscale=1.7)  # a scaled table must still rotate, not scale
    idx = torch.arange(64)
    twice = rope_rerotate(rope_rerotate(k.clone(), idx, idx, d1, table, rotary_dim=64), idx, idx, d2,
                          table, rotary_dim=64)
    once = rope_rerotate(k.clone(), idx, idx, d1 + d2, table, rotary_dim=64)
    # The table's own angles (pos * inv_freq in fp32, as models build it) are rounded to
    # ulp(3000 rad) = 2.4e-4, so two table rotations differ from one by up to that much.
    torch.testing.assert_close(twice, once, rtol=1e-3, atol=1e-3, msg=f"seed {rng.initial_seed()}")
    back = rope_rerotate(rope_rerotate(k.clone(), idx, idx, d1, table, rotary_dim=64), idx, idx, -d1,
                         table, rotary_dim=64)
    torch.testing.assert_close(back, k, rtol=1e-5, atol=1e-5, msg=f"seed {rng.initial_seed()}")
    torch.testing.assert_close(back.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512},
], ids=["plain", "yarn", "llama3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rerotated_keys_equal_sglang_rotary_embedding_at_the_new_position(rng, scaling, backend):
    publish_cpu_context()
    from amem_sgl.sglang_compat import get_rope

    rope = get_rope(64, 64, 4096, 100000, True, scaling, torch.float32)
    n, heads = 50, 3
    raw = torch.randn(n, heads * 64, generator=rng)
    old_pos = torch.randint(0, 1000, (n,), generator=rng)
    new_pos = torch.randint(0, 1000, (n,), generator=rng)
    _, k_old = rope.forward_native(old_pos, torch.zeros_like(raw), raw.clone())
    _, k_new = rope.forward_native(new_pos, torch.zeros_like(raw), raw.clone())
    table = rope._compute_cos_sin_cache().to(torch.float32).contiguous()
    idx = torch.arange(n)
    moved = rope_rerotate(k_old.view(n, heads, 64).clone(), idx, idx, new_pos - old_pos, table,
                          rotary_dim=64, backend=backend)
    # Both sides use fp32 angles up to ~1000 rad (ulp 6e-5) on keys up to ~4: measured worst case
    # 1.8e-4 over seeds, identical for both backends; a wrong rotation or layout errs by O(1).
    torch.testing.assert_close(moved, k_new.view(n, heads, 64), rtol=1e-3, atol=1e-3,
                               msg=f"seed {rng.initial_seed()}")


def test_launcher_validates_its_inputs(rng):
    k, src, dst, delta = case(rng, slots=40, heads=3, head_dim=64, n=10, dtype=torch.float32)
    table = cos_sin_table(64, max_pos=4096)
    ok = dict(rotary_dim=64)
    with pytest.raises(ValueError, match=r"\[slots, heads, head_dim\]"):
        rope_rerotate(k.view(40, -1), src, dst, delta, table, **ok)
    with pytest.raises(TypeError, match="int64"):
        rope_rerotate(k, src.int(), dst, delta, table, **ok)
    with pytest.raises(ValueError, match="1-D with 10"):
        rope_rerotate(k, src, dst[:5], delta, table, **ok)
    with pytest.raises(ValueError, match="cos_sin_cache must be contiguous fp32"):
        rope_rerotate(k, src, dst, delta, table.half(), **ok)
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_rerotate(k, src, dst, delta, table, rotary_dim=66)
    with pytest.raises(ValueError, match="exceeds the cos/sin table"):
        rope_rerotate(k, src, dst, delta + 5000, table, **ok)
    with pytest.raises(IndexError, match="dst_slots out of range"):
        rope_rerotate(k, src, dst + 100, delta, table, **ok)
    with pytest.raises(ValueError, match="must not repeat"):
        rope_rerotate(k, src, torch.zeros(10, dtype=torch.int64), delta, table, **ok)
    with pytest.raises(ValueError, match="in-place re-rotation"):
        rope_rerotate(k, src, torch.roll(src, 1), delta, table, **ok)
    with pytest.raises(TypeError, match="unsupported"):
        rope_rerotate(k.double(), src, dst, delta, table, **ok)
    with pytest.raises(ValueError, match="must match past dim 0"):
        rope_rerotate(k, src, dst, delta, table, k_dst=torch.zeros(40, 3, 64, dtype=torch.float16), **ok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unchecked_launch_after_a_host_side_check_matches_reference(rng, dtype):
    """The hot path: indices checked once on the CPU, then launched with check=False."""
    k, src, dst, delta = case(rng, slots=300, heads=8, head_dim=128, n=140, dtype=dtype)
    table = cos_sin_table(128)
    check_rerotate_indices(src, dst, delta, src_num_slots=k.shape[0], table_positions=table.shape[0])
    want = rope_rerotate_reference(k.clone(), src, dst, delta, table, rotary_dim=128)
    got = rope_rerotate(k.clone(), src, dst, delta, table, rotary_dim=128, backend="triton", check=False)
    torch.testing.assert_close(got, want, **ULP_TOL[dtype], msg=f"seed {rng.initial_seed()}")


def test_check_false_skips_only_the_index_value_checks(rng, monkeypatch):
    k, src, dst, delta = case(rng, slots=40, heads=3, head_dim=64, n=10, dtype=torch.float32)
    table = cos_sin_table(64)
    calls = []
    real = rope_module.check_rerotate_indices
    monkeypatch.setattr(rope_module, "check_rerotate_indices", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    rope_rerotate(k.clone(), src, dst, delta, table, rotary_dim=64, check=False)
    assert calls == []  # no index read-back on the hot path
    rope_rerotate(k.clone(), src, dst, delta, table, rotary_dim=64)
    assert calls == [1]  # the default stays checked
    # Layout checks need no read-back and stay on.
    with pytest.raises(TypeError, match="int64"):
        rope_rerotate(k, src.int(), dst, delta, table, rotary_dim=64, check=False)
    with pytest.raises(ValueError, match="1-D with 10"):
        rope_rerotate(k, src, dst[:5], delta, table, rotary_dim=64, check=False)
    with pytest.raises(ValueError, match="cos_sin_cache must be contiguous fp32"):
        rope_rerotate(k, src, dst, delta, table.half(), rotary_dim=64, check=False)


def test_host_side_check_rejects_what_the_launcher_rejects(rng):
    k, src, dst, delta = case(rng, slots=40, heads=3, head_dim=64, n=10, dtype=torch.float32)
    size = dict(src_num_slots=40, table_positions=4096)
    check_rerotate_indices(src, dst, delta, **size)  # valid
    check_rerotate_indices(src, src, delta, **size)  # in place, same slots
    with pytest.raises(ValueError, match="exceeds the cos/sin table"):
        check_rerotate_indices(src, dst, delta - 5000, **size)
    with pytest.raises(IndexError, match="src_slots out of range"):
        check_rerotate_indices(src - 40, dst, delta, **size)
    with pytest.raises(IndexError, match=r"dst_slots out of range \[0, 20\)"):
        check_rerotate_indices(src, dst + 20, delta, src_num_slots=40, dst_num_slots=20, table_positions=4096)
    with pytest.raises(ValueError, match="must not repeat"):
        check_rerotate_indices(src, torch.full((10,), 3, dtype=torch.int64), delta, **size)
    with pytest.raises(ValueError, match="in-place re-rotation"):
        check_rerotate_indices(src, torch.roll(src, 1), delta, **size)
    check_rerotate_indices(src, torch.roll(src, 1), delta, in_place=False, **size)  # another buffer: fine
    with pytest.raises(TypeError, match="int64"):
        check_rerotate_indices(src, dst.int(), delta, **size)
    check_rerotate_indices(src[:0], dst[:0], delta[:0], **size)  # nothing to move
