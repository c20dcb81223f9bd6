"""Perplexity as Wanda's evaluation defines it: windows, positions counted, the figure."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax.core.errors import UserError
from jackpot_jax.engine import perplexity as ppl

VOCAB = 5


def uniform_logits(params, tokens):
    return jnp.zeros(tokens.shape + (VOCAB,))


def bigram_logits(table, tokens):
    """Logits of a bigram model: row ``table[token]`` for the next token."""
    return jnp.log(table)[tokens]


def test_windows_drop_the_partial_one_and_a_short_text_is_one_window():
    np.testing.assert_array_equal(ppl.text_windows(range(7), 3), [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(ppl.text_windows(range(4), 8), [[0, 1, 2, 3]])
    with pytest.raises(UserError, match='context=1'):
        ppl.text_windows(range(7), 1)
    with pytest.raises(UserError, match='1 token'):
        ppl.text_windows([3], 4)


def test_uniform_model_has_the_vocabulary_as_perplexity():
    out = ppl.perplexity(uniform_logits, None, np.arange(20) % VOCAB, context=6, batch_size=2)
    assert out['windows'] == 3 and out['tokens'] == 3 * 5  # the 2 tokens left are dropped
    assert out['perplexity'] == pytest.approx(VOCAB, rel=1e-6)


def test_bigram_perplexity_matches_the_hand_computed_value():
    rng = np.random.default_rng(0)
    table = rng.random((VOCAB, VOCAB)) + 0.1
    table /= table.sum(1, keepdims=True)
    ids = rng.integers(0, VOCAB, 23)
    out = ppl.perplexity(bigram_logits, jnp.asarray(table), ids, context=5, batch_size=3)
    windows = ids[:20].reshape(4, 5)
    nll = [-math.log(table[w[t], w[t + 1]]) for w in windows for t in range(4)]
    assert out['tokens'] == 16
    assert out['loss'] == pytest.approx(np.mean(nll), rel=1e-5)
    assert out['perplexity'] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    capped = ppl.perplexity(bigram_logits, jnp.asarray(table), ids, context=5, max_windows=1)
    assert capped['windows'] == 1 and capped['loss'] == pytest.approx(np.mean(nll[:4]), rel=1e-5)


def test_a_context_longer_than_the_model_is_refused():
    with pytest.raises(UserError, match="context=64 is longer than the model's 32"):
        ppl.perplexity(uniform_logits, None, np.arange(100) % VOCAB, 64, model_context=32)


def test_greedy_continuation_follows_the_most_likely_token_and_stops_at_stop():
    from jackpot_jax.engine.generation import greedy_continuation

    table = np.full((VOCAB, VOCAB), 0.1)
    for token in range(VOCAB):
        table[token, (token + 2) % VOCAB] = 0.6  # after t, t + 2 is the most likely
    table = jnp.asarray(table / table.sum(1, keepdims=True))
    assert greedy_continuation(bigram_logits, table, [0], 4) == [2, 4, 1, 3]
    assert greedy_continuation(bigram_logits, table, [3, 0], 5, stop=1) == [2, 4]
    with pytest.raises(ValueError, match='prompt'):
        greedy_continuation(bigram_logits, table, [], 2)
