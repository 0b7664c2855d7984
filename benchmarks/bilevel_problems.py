"""Shared pieces of the bilevel studies: corrupted digits and the weighted MLP losses.

Data: scikit-learn's digits (1797 images of 8x8 pixels, 10 classes; offline). A fixed
stratified split into train / validation / test; features standardised on train.
A fraction of the training labels is replaced by a label drawn uniformly from the
*other* nine classes, so every replaced label is wrong.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from benchmarks import models
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


def digits_splits(
    seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_val, y_val, x_test, y_test)``, standardised on train."""
    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    val_share = val_fraction / (1.0 - test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, random_state=seed, stratify=y_rest
    )
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1.0)
    scale = lambda a: ((a - mean) / std).astype(np.float32)
    as_labels = lambda a: a.astype(np.int32)
    return (
        scale(x_train), as_labels(y_train), scale(x_val), as_labels(y_val),
        scale(x_test), as_labels(y_test),
    )  # fmt: skip


def corrupt_labels(
    labels: np.ndarray, fraction: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Replaces ``fraction`` of ``labels`` by a different class; returns (labels, mask)."""
    rng = np.random.default_rng(seed)
    corrupted = np.zeros(labels.shape, bool)
    chosen = rng.choice(labels.size, size=int(round(fraction * labels.size)), replace=False)
    corrupted[chosen] = True
    shift = rng.integers(1, num_classes, size=labels.size)
    noisy = np.where(corrupted, (labels + shift) % num_classes, labels).astype(np.int32)
    return noisy, corrupted


def cleaning_data(seed: int, corruption: float = 0.5) -> CleaningData:
    """The hyper-data-cleaning data set: the split is fixed, the corruption uses ``seed``."""
    x_train, y_train, x_val, y_val, x_test, y_test = digits_splits()
    noisy, corrupted = corrupt_labels(y_train, corruption, 10, seed)
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
