"""Small offline data sets for the studies.

Both ship inside scikit-learn, so the studies need no download: digits (1797 images of
8x8 pixels, 10 classes) and breast cancer Wisconsin (569 tumours, 30 features, binary
label: 1 = benign). Splits are stratified by label with a fixed seed, and features are
standardised with the mean and standard deviation of the training split only.
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


def standardized_split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float) -> Split:
    """A stratified split of ``(x, y)``, standardised on the train part."""
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # constant features (digits' border pixels)
    return Split(
        ((x_train - mean) / std).astype(np.float32),
        y_train.astype(np.int32),
        ((x_test - mean) / std).astype(np.float32),
        y_test.astype(np.int32),
    )


def digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """Digits (64 features, 10 classes)."""
    return standardized_split(*load_digits(return_X_y=True), seed, test_fraction)


def breast_cancer(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """Breast cancer Wisconsin (30 features, binary labels)."""
    return standardized_split(*load_breast_cancer(return_X_y=True), seed, test_fraction)
