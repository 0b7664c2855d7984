"""Hyper-data cleaning on digits: the bilevel problem of ``bilevel_cleaning`` and
``bilevel_memory``.

Data: scikit-learn's digits with a fixed stratified split into train / validation /
test (:func:`benchmarks.problems.data.digits_splits`), features standardised on train.
A fraction of the training labels is replaced by a label drawn uniformly from the
*other* nine classes, so every replaced label is wrong.

Problem (:func:`cleaning_problem`): the upper variable ``x`` holds one weight logit per
training sample; the lower variable ``y`` is an MLP::

    g(x, y) = mean_i sigmoid(x_i) * CE_i(y; training batch) + l2/2 ||y||^2
    f(x, y) = mean CE(y; validation batch)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.problems import data, models
from optstab import bilevel


class CleaningData(NamedTuple):
    """Digits with corrupted training labels; float32 features, int32 labels."""

    x_train: np.ndarray  # (n_train, 64)
    y_train: np.ndarray  # (n_train,) labels after corruption
    corrupted: np.ndarray  # (n_train,) bool, True where the label was replaced
    x_val: np.ndarray  # (n_val, 64) clean validation split
    y_val: np.ndarray
    x_test: np.ndarray  # (n_test, 64) clean test split
    y_test: np.ndarray


def cleaning_data(seed: int, corruption: float = 0.5) -> CleaningData:
    """The hyper-data-cleaning data set: the split is fixed, the corruption uses ``seed``."""
    x_train, y_train, x_val, y_val, x_test, y_test = data.digits_splits()
    noisy, corrupted = data.corrupt_labels(y_train, corruption, 10, seed)
    return CleaningData(x_train, noisy, corrupted, x_val, y_val, x_test, y_test)


def per_sample_loss(params: models.Params, x: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy of the MLP for every sample of the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(models.mlp_apply(params, x), labels)


def squared_norm(params: models.Params) -> jax.Array:
    return sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params))


def cleaning_problem(init_params: models.Params, l2: float) -> bilevel.BilevelProblem:
    """Hyper-data cleaning: ``x`` holds one weight logit per training sample.

    * inner ``g(x, y, (idx, inputs, labels)) = mean_i sigmoid(x_idx_i) * loss_i(y)
      + l2/2 ||y||^2`` on a training batch;
    * outer ``f(x, y, (inputs, labels))`` = mean validation cross-entropy.
    """

    def inner_loss(x, y, batch):
        idx, inputs, labels = batch
        weights = jax.nn.sigmoid(x[idx])
        return jnp.mean(weights * per_sample_loss(y, inputs, labels)) + 0.5 * l2 * squared_norm(y)

    def outer_loss(x, y, batch):
        inputs, labels = batch
        return jnp.mean(per_sample_loss(y, inputs, labels))

    return bilevel.BilevelProblem(inner_loss, outer_loss, init_params)


def detection_f1(weight_logits: np.ndarray, corrupted: np.ndarray) -> float:
    """F1 of "sample is corrupted" predicted as ``sigmoid(logit) < 0.5``."""
    predicted = np.asarray(weight_logits) < 0.0
    true_positive = np.sum(predicted & corrupted)
    precision = true_positive / max(int(predicted.sum()), 1)
    recall = true_positive / max(int(corrupted.sum()), 1)
    return float(2 * precision * recall / max(precision + recall, 1e-12))


def bilevel_step(tx: optax.GradientTransformationExtraArgs):
    """``(x, state, inner_batch, outer_batch) -> (x, state)``: one update of ``x``."""

    def step(x, state, inner_batch, outer_batch):
        # The bilevel transform ignores the incoming updates; x stands in for them.
        updates, state = tx.update(x, state, x, inner_batch=inner_batch, outer_batch=outer_batch)
        return optax.apply_updates(x, updates), state

    return step
