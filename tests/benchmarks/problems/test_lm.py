"""The byte-level corpus ships with Python: offline, split into contiguous tails."""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.problems import lm


def test_corpus_is_offline_and_split():
    corpus = lm.stdlib_corpus(0.1)
    total = len(corpus.train) + len(corpus.val)
    assert total > 500_000 and abs(len(corpus.val) / total - 0.1) < 1e-3
    assert len(corpus.sha256) == 64
    with pytest.raises(ValueError, match="val_fraction"):
        lm.stdlib_corpus(1.0)


def test_real_outliers_multiply_only_the_given_positions():
    x = jnp.ones((2, 4, 3))
    out = np.asarray(lm.with_real_outliers(x, jnp.array([1.0, 5.0, 1.0]), (0, 2)))
    expected = np.ones((2, 4, 3))
    expected[:, [0, 2], 1] = 5.0
    np.testing.assert_array_equal(out, expected)
    assert lm.with_real_outliers(x, None, (0,)) is x
