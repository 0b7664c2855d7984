"""The byte-level corpus ships with Python: offline, split into contiguous tails."""

import pytest

from benchmarks.problems import lm


def test_corpus_is_offline_and_split():
    corpus = lm.stdlib_corpus(0.1)
    total = len(corpus.train) + len(corpus.val)
    assert total > 500_000 and abs(len(corpus.val) / total - 0.1) < 1e-3
    assert len(corpus.sha256) == 64
    with pytest.raises(ValueError, match="val_fraction"):
        lm.stdlib_corpus(1.0)
