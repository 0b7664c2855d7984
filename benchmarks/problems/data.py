"""Small offline data sets for the studies.

Both ship inside scikit-learn, so the studies need no download: digits (1797 images of
8x8 pixels, 10 classes) and breast cancer Wisconsin (569 tumours, 30 features, binary
label: 1 = benign). Splits are stratified by label with a fixed seed, and features are
standardised with the mean and standard deviation of the training split only.
:func:`corrupt_labels` replaces a fraction of labels by a *different* class (the label
noise of the bilevel studies).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split


class Split(NamedTuple):
    """A train/test split as float32 features and int32 labels."""

    x_train: np.ndarray  # (n_train, num_features) float32
    y_train: np.ndarray  # (n_train,) int32
    x_test: np.ndarray  # (n_test, num_features) float32
    y_test: np.ndarray  # (n_test,) int32

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def standardize(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every array standardised with the mean and std of ``x_train`` (float32); constant
    features (digits' border pixels) are only centred."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [((x - mean) / std).astype(np.float32) for x in (x_train, *others)]


def standardized_split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float) -> Split:
    """A stratified split of ``(x, y)``, standardised on the train part."""
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_train, x_test = standardize(x_train, x_test)
    return Split(x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32))


def digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """Digits (64 features, 10 classes)."""
    return standardized_split(*load_digits(return_X_y=True), seed, test_fraction)


def breast_cancer(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """Breast cancer Wisconsin (30 features, binary labels)."""
    return standardized_split(*load_breast_cancer(return_X_y=True), seed, test_fraction)


def digits_splits(
    seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> tuple[np.ndarray, ...]:
    """Digits as ``(x_train, y_train, x_val, y_val, x_test, y_test)``, stratified,
    standardised on train (1077 / 360 / 360 images at the defaults)."""
    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    val_share = val_fraction / (1.0 - test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, random_state=seed, stratify=y_rest
    )
    x_train, x_val, x_test = standardize(x_train, x_val, x_test)
    labels = [y.astype(np.int32) for y in (y_train, y_val, y_test)]
    return x_train, labels[0], x_val, labels[1], x_test, labels[2]


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
