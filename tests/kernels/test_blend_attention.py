"""blend_attention: the Triton kernel (Triton interpreter on CPU) against its torch reference on fresh
random inputs, and the reference against SDPA with a causal mask (an independent implementation)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from kernels.blend_attention import blend_attention, blend_attention_reference

# Triton and the reference both accumulate in fp32 and cast once: fp32 agrees to summation-order
# rounding, fp16/bf16 to one unit in the last place of the output.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(torch.seed())  # fresh inputs every run


def make_case(rng, *, kv_lens, q_counts, heads, kv_heads, head_dim, dtype, scattered=True):
    """Sequences whose keys sit in random slots of one pool; queries at random (scattered) positions
    or at the tail (an ordinary extend)."""
    slots_total = sum(kv_lens) + 17
    k_cache = torch.randn(slots_total, kv_heads, head_dim, generator=rng).to(dtype)
    v_cache = torch.randn(slots_total, kv_heads, head_dim, generator=rng).to(dtype)
    perm = torch.randperm(slots_total, generator=rng)[: sum(kv_lens)]
    positions = []
    for kv_len, n_q in zip(kv_lens, q_counts):
        if scattered:
            positions.append(torch.sort(torch.randperm(kv_len, generator=rng)[:n_q]).values)
        else:
            positions.append(torch.arange(kv_len - n_q, kv_len))
    q_pos = torch.cat(positions)
    q = torch.randn(q_pos.shape[0], heads, head_dim, generator=rng).to(dtype)
    return q, k_cache, v_cache, q_pos, torch.tensor(q_counts), perm, torch.tensor(kv_lens)


CASES = [  # kv lens, queries per sequence, heads, kv heads, head_dim
    ([150], [40], 9, 3, 64),             # SmolLM2 GQA 9/3, one sequence, blend-pass shape
    ([70, 130, 33], [5, 64, 33], 4, 4, 48),  # batch of three, MHA, non-power-of-two head_dim
    ([200, 90], [1, 90], 8, 2, 32),      # decode-like single query; a full causal prefill
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_lens,q_counts,heads,kv_heads,head_dim", CASES)
def test_triton_matches_reference(rng, dtype, kv_lens, q_counts, heads, kv_heads, head_dim):
    case = make_case(rng, kv_lens=kv_lens, q_counts=q_counts, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, dtype=dtype)
    got = blend_attention(*case, backend="triton")
    want = blend_attention_reference(*case)
    assert got.dtype == dtype and got.shape == case[0].shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_triton_tail_queries_match_reference(rng):
    """An ordinary extend: the last rows of each sequence."""
    case = make_case(rng, kv_lens=[96, 50], q_counts=[30, 50], heads=6, kv_heads=2, head_dim=64,
                     dtype=torch.float32, scattered=False)
    torch.testing.assert_close(blend_attention(*case, backend="triton"), blend_attention_reference(*case),
                               **TOL[torch.float32])


def test_unchecked_launch_with_a_given_longest_sequence_is_the_same_launch(rng):
    """``check=False`` + ``max_q_len`` (a caller that checked once: no host reads per call) writes
    what the checked launch writes; a ``max_q_len`` too small would leave rows unwritten, so the
    grid really is taken from it."""
    case = make_case(rng, kv_lens=[70, 130, 33], q_counts=[5, 64, 33], heads=4, kv_heads=2, head_dim=32,
                     dtype=torch.float32)
    checked = blend_attention(*case, backend="triton")
    unchecked = blend_attention(*case, backend="triton", check=False, max_q_len=64)
    assert torch.equal(checked, unchecked)
    short = blend_attention(*case, backend="triton", check=False, max_q_len=1, block_m=16)
    assert not torch.equal(short[5:69], checked[5:69])  # one block of 16 rows per sequence


def test_reference_matches_causal_sdpa(rng):
    """With every position queried in order, blend attention is causal self-attention."""
    n, heads, kv_heads, d = 57, 6, 3, 32
    q, k_cache, v_cache, q_pos, q_lens, slots, kv_lens = make_case(
        rng, kv_lens=[n], q_counts=[n], heads=heads, kv_heads=kv_heads, head_dim=d, dtype=torch.float32)
    k, v = k_cache[slots], v_cache[slots]
    want = scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                        is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    got = blend_attention_reference(q, k_cache, v_cache, q_pos, q_lens, slots, kv_lens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_query_never_sees_later_keys(rng):
    """Changing keys/values after a query's position leaves its output unchanged."""
    case = list(make_case(rng, kv_lens=[80], q_counts=[10], heads=2, kv_heads=1, head_dim=16,
                          dtype=torch.float32))
    before = blend_attention(*case, backend="triton")
    q_pos, slots = case[3], case[5]
    later = slots[int(q_pos.max()) + 1:]
    case[1] = case[1].clone()
    case[1][later] += 100.0
    case[2] = case[2].clone()
    case[2][later] -= 100.0
    torch.testing.assert_close(blend_attention(*case, backend="triton"), before)


@pytest.mark.parametrize("bad,match", [
    (lambda c: c.__setitem__(0, c[0][:, :5]), "multiple of KV heads"),
    (lambda c: c.__setitem__(3, c[3][:-1]), "one position per query"),
    (lambda c: c.__setitem__(6, c[6] + 1), "kv_lens must sum"),
    (lambda c: c.__setitem__(3, c[3].float()), "integer tensor"),
])
def test_launcher_rejects_bad_arguments(rng, bad, match):
    case = list(make_case(rng, kv_lens=[20], q_counts=[4], heads=6, kv_heads=3, head_dim=16, dtype=torch.float32))
    bad(case)
    with pytest.raises(ValueError, match=match):
        blend_attention(*case, backend="triton")


def test_dot_operands_stay_16_bit_on_a_gpu_and_fp32_elsewhere(monkeypatch):
    """The launcher's DOT_F32 choice: 16-bit q/k/v reach tl.dot as they are when compiled for a GPU
    (16-bit MMA; tests/kernels/test_aot_compile.py checks the PTX), fp32 or mixed inputs go as fp32
    (ieee), and the interpreter (inexact 16-bit dot, used by every other test here) always gets fp32."""
    import kernels.blend_attention as blend

    def tensors(*dtypes):
        return [torch.zeros(1, 1, 16, dtype=dt) for dt in dtypes]

    assert blend._dot_in_fp32(*tensors(torch.bfloat16, torch.bfloat16, torch.bfloat16))  # CPU: interpreter
    monkeypatch.setattr(blend._KERNEL, "interprets", lambda device: False)  # as compiled on CUDA
    assert not blend._dot_in_fp32(*tensors(torch.bfloat16, torch.bfloat16, torch.bfloat16))
    assert not blend._dot_in_fp32(*tensors(torch.float16, torch.float16, torch.float16))
    assert blend._dot_in_fp32(*tensors(torch.float32, torch.float32, torch.float32))
    assert blend._dot_in_fp32(*tensors(torch.bfloat16, torch.float16, torch.float16))
