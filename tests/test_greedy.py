"""tests.greedy.assert_same_greedy, the tie-aware comparison the served tests use, can fail: a
divergence at a confident step, a near-tie at the first step, a missing logprob request."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.greedy import assert_same_greedy


def gen(ids, margins):
    """A Generation-like result: each step's top-2 (logprob, token id) with the given margin."""
    steps = [[(-0.1, tok, None), (-0.1 - m, tok + 1, None)] for tok, m in zip(ids, margins)]
    return SimpleNamespace(output_ids=list(ids), meta_info={"output_top_logprobs": steps})


def test_equal_answers_compare_every_step():
    assert assert_same_greedy(gen([5, 6, 7], [2, 2, 2]), gen([5, 6, 7], [1, 1, 1])) == 3


def test_a_divergence_after_a_near_tie_stops_the_comparison_there():
    assert assert_same_greedy(gen([5, 6, 7, 8], [2, 2, 0.1, 2]), gen([5, 6, 9, 9], [2, 2, 2, 2])) == 2


def test_a_divergence_at_a_confident_step_fails():
    with pytest.raises(AssertionError, match="step 1"):
        assert_same_greedy(gen([5, 6, 7], [2, 2, 2]), gen([5, 9, 7], [2, 2, 2]))


def test_a_near_tie_at_the_first_step_fails_as_a_weak_prompt():
    with pytest.raises(AssertionError, match="first step is a near-tie"):
        assert_same_greedy(gen([5, 6], [0.1, 2]), gen([5, 6], [2, 2]))


def test_answers_of_different_lengths_fail():
    with pytest.raises(AssertionError):
        assert_same_greedy(gen([5, 6, 7], [2, 2, 2]), gen([5, 6], [2, 2]))


def test_without_logprobs_it_says_how_to_ask():
    with pytest.raises(AssertionError, match="TOP2"):
        assert_same_greedy(SimpleNamespace(output_ids=[1], meta_info={}), gen([1], [2]))
