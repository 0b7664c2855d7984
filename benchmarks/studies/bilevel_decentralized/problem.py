"""The decentralized hyper-data-cleaning problem: digits over nodes, ridge regression.

Data. The fixed digits train / validation / test split
(:func:`benchmarks.problems.data.digits_splits`), a bias column appended to the 64
standardised features. The training and validation samples are dealt to ``n`` nodes
(equal shards, :func:`split_nodes`, heterogeneity ``h`` as in the config); node ``i``
corrupts its training labels at its own rate. The test split stays pooled and clean.

Problem. ``x`` holds one weight logit per training sample (all nodes' samples: every
node keeps a copy of the whole ``x``); ``y`` is a ridge-regression classifier
``W`` (65 x 10) on one-hot targets::

    g_i(x, W) = mean_{s in batch_i} sigmoid(x_s) |a_s W - e_s|^2 / 2 + l2/2 |W|^2
    f_i(x, W) = mean_{v in val batch_i} CE(a_v W, label_v)

The averaged lower problem is a weighted ridge regression, so ``W*(x)`` has a closed
form and the hypergradient of ``F(x) = mean_i f_i(x, W*(x))`` over the full shards is
exact (:func:`exact_hypergradient`): the study's convergence measure needs no inner
solver. Because ``g`` is quadratic in ``W``, D-SOBA-FO's central differences are exact up
to rounding here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.problems import data
from optstab import bilevel

NUM_CLASSES = 10


class NodeData(NamedTuple):
    """Digits dealt to ``n`` nodes (``N`` training, ``M`` validation samples each)."""

    features: np.ndarray  # (n, N, 65) float32, bias column last
    labels: np.ndarray  # (n, N) int32, after corruption
    corrupted: np.ndarray  # (n, N) bool
    val_features: np.ndarray  # (n, M, 65) float32
    val_labels: np.ndarray  # (n, M) int32, clean
    test_features: np.ndarray  # (T, 65) float32, pooled
    test_labels: np.ndarray  # (T,) int32
    noise_rates: np.ndarray  # (n,) float: each node's corruption rate


def _with_bias(features: np.ndarray) -> np.ndarray:
    return np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)


def _deal(labels: np.ndarray, n: int, h: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` equal shards, ``(n, len // n)``: sorted by h*label + (1-h)*10*u."""
    key = h * labels + (1.0 - h) * NUM_CLASSES * rng.random(labels.size)
    order = np.argsort(key, kind="stable")
    per_node = labels.size // n
    return order[: n * per_node].reshape(n, per_node)


def split_nodes(n: int, heterogeneity: float, noise: float, seed: int) -> NodeData:
    """The samples dealt to ``n`` nodes and corrupted per node (see the module docstring)."""
    x_train, y_train, x_val, y_val, x_test, y_test = data.digits_splits()
    rng = np.random.default_rng([seed, n, round(heterogeneity * 1000)])
    train = _deal(y_train, n, heterogeneity, rng)
    val = _deal(y_val, n, heterogeneity, rng)
    spread = 2 * np.arange(n) / max(n - 1, 1) - 1
    rates = np.clip(noise * (1 + heterogeneity * spread), 0.0, 0.95)
    labels, corrupted = [], []
    for i in range(n):
        node_seed = int(rng.integers(2**31))
        noisy, hit = data.corrupt_labels(y_train[train[i]], rates[i], NUM_CLASSES, node_seed)
        labels.append(noisy)
        corrupted.append(hit)
    return NodeData(
        features=_with_bias(x_train)[train],
        labels=np.stack(labels).astype(np.int32),
        corrupted=np.stack(corrupted),
        val_features=_with_bias(x_val)[val],
        val_labels=y_val[val].astype(np.int32),
        test_features=_with_bias(x_test),
        test_labels=y_test.astype(np.int32),
        noise_rates=rates,
    )


def problem(l2: float) -> bilevel.BilevelProblem:
    """One node's ``g`` and ``f`` on batches ``(idx, features, labels)`` and
    ``(features, labels)``; ``idx`` are global sample indices into ``x``."""

    def inner_loss(x, w, batch):
        idx, features, labels = batch
        residual = features @ w - jax.nn.one_hot(labels, NUM_CLASSES)
        weights = jax.nn.sigmoid(x[idx])
        return 0.5 * jnp.mean(weights * jnp.sum(residual**2, axis=-1)) + 0.5 * l2 * jnp.sum(w**2)

    def outer_loss(x, w, batch):
        del x
        features, labels = batch
        logits = features @ w
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return bilevel.BilevelProblem(inner_loss, outer_loss, jnp.zeros((65, NUM_CLASSES)))


def ridge_solution(x: jax.Array, nodes: NodeData, l2: float) -> jax.Array:
    """``W*(x)`` of the averaged lower problem over every node's whole shard."""
    a = jnp.asarray(nodes.features).reshape(-1, 65)
    targets = jax.nn.one_hot(jnp.asarray(nodes.labels).reshape(-1), NUM_CLASSES)
    weights = jax.nn.sigmoid(x) / a.shape[0]
    hessian = (a * weights[:, None]).T @ a + l2 * jnp.eye(65)
    return jnp.linalg.solve(hessian, (a * weights[:, None]).T @ targets)


def upper_objective(x: jax.Array, nodes: NodeData, l2: float) -> jax.Array:
    """``F(x)``: mean validation cross-entropy of ``W*(x)`` over every node's shard."""
    w = ridge_solution(x, nodes, l2)
    features = jnp.asarray(nodes.val_features).reshape(-1, 65)
    labels = jnp.asarray(nodes.val_labels).reshape(-1)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(features @ w, labels))


def exact_hypergradient(x: jax.Array, nodes: NodeData, l2: float) -> jax.Array:
    """``grad F(x)`` through the closed-form ``W*(x)`` (float32)."""
    return jax.grad(upper_objective)(x, nodes, l2)


def heterogeneity_measure(nodes: NodeData, l2: float) -> float:
    """``zeta^2``: the spread of the nodes' local gradients at the start (``x = 0``, the
    averaged problem's ``W*``): ``mean_i |grad_W g_i - grad_W g|^2 + |grad_W f_i - grad_W f|^2``
    over the whole shards (the averaged ``grad_W g`` is 0 there)."""
    n = nodes.features.shape[0]
    x = jnp.zeros(nodes.labels.size)
    w = ridge_solution(x, nodes, l2)
    spec = problem(l2)
    per_node_idx = jnp.arange(nodes.labels.size).reshape(n, -1)
    inner = (per_node_idx, jnp.asarray(nodes.features), jnp.asarray(nodes.labels))
    outer = (jnp.asarray(nodes.val_features), jnp.asarray(nodes.val_labels))
    gy = jax.vmap(jax.grad(spec.inner_loss, argnums=1), (None, None, 0))(x, w, inner)
    gf = jax.vmap(jax.grad(spec.outer_loss, argnums=1), (None, None, 0))(x, w, outer)
    spread = lambda g: jnp.mean(jnp.sum((g - g.mean(0)) ** 2, axis=(1, 2)))
    return float(spread(gy) + spread(gf))


def smoothness_bound(nodes: NodeData, l2: float, batch: int) -> float:
    """``L`` of the step-size rule: max node ``lambda_max(A^T A / N)`` + max ``|a|^2 / batch``
    + ``l2`` (the weights ``sigmoid`` are at most 1)."""
    a = np.asarray(nodes.features, np.float64)
    gram = np.einsum("nsi,nsj->nij", a, a) / a.shape[1]
    top = max(np.linalg.eigvalsh(g)[-1] for g in gram)
    return float(top + np.max(np.sum(a**2, axis=-1)) / batch + l2)


def test_accuracy(w: jax.Array, nodes: NodeData) -> jax.Array:
    """Accuracy of the classifier ``W`` on the pooled clean test split."""
    logits = jnp.asarray(nodes.test_features) @ w
    return jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(nodes.test_labels))
