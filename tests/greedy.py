"""Comparing greedy answers of two different computations (spliced KV vs a full prefill, KV restored
from disk vs KV kept on the device) without depending on last bits.

SmolLM2 runs in bf16 here: near 16-32 a logit moves in steps of 0.125, so a last-bit change in the
forward (another kernel shape, another row count) can swap two tokens whose log-probabilities are
within a step or two. ``assert_same_greedy`` asks for the ids to be equal until a step where either
run was that close to a tie; a divergence at a confident step fails, and so does a first step that
is already a near-tie (the prompt then says nothing)."""

from __future__ import annotations

# Two bf16 steps of a logit near its magnitude: closer top-2 log-probabilities may swap.
NEAR_TIE = 0.25

# /generate fields that return each step's top-2 log-probabilities (ChunkClient.generate's extra).
TOP2 = {"return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 2}


def margins(generation) -> list[float]:
    """Each generated step's top-1 minus top-2 log-probability (from a request made with TOP2)."""
    steps = generation.meta_info.get("output_top_logprobs")
    assert steps, "ask with tests.greedy.TOP2 to compare greedy answers"
    return [step[0][0] - step[1][0] if len(step) > 1 else float("inf") for step in steps]


def assert_same_greedy(got, want, *, near_tie: float = NEAR_TIE) -> int:
    """``got``'s output ids equal ``want``'s up to the first step where either was within
    ``near_tie`` of a tie (from there on they may part); returns the steps compared (>= 1)."""
    got_m, want_m = margins(got), margins(want)
    n = min(len(got.output_ids), len(want.output_ids))
    for i in range(n):
        if min(got_m[i], want_m[i]) < near_tie:
            assert i >= 1, f"the first step is a near-tie ({got_m[0]:.3f}, {want_m[0]:.3f}): a weak prompt"
            return i
        assert got.output_ids[i] == want.output_ids[i], (
            f"step {i}: {got.output_ids[i]} vs {want.output_ids[i]} with margins {got_m[i]:.3f}, {want_m[i]:.3f} "
            f"(ids {got.output_ids} vs {want.output_ids})")
    assert len(got.output_ids) == len(want.output_ids), (got.output_ids, want.output_ids)
    return n
