"""The problems of ``perturbed_sgd``: operator chains on breast cancer, and the probes'
shared pieces (the exact-vs-perturbed gradient as two lanes of one vmap, line fits)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import parallel
from optstab import perturb

PROBLEMS = ("deep_linear", "tanh")


class ShardedMinibatches(perturb.Composite):
    """A ``Composite`` whose loss splits minibatches over a mesh's ``data`` axis.

    ``perturb.run_sgd`` draws each step's minibatch inside its scan, so the loss is
    where the study can place it: batches of exactly ``batch_size`` examples are
    sharded; other batches (the whole training split) are left as they are.
    """

    def __init__(self, operators, *, mesh, batch_size, **kwargs):
        super().__init__(operators, **kwargs)
        self.mesh, self.batch_size = mesh, batch_size

    def loss(self, params, x, y, injection=None):
        if x.shape[0] == self.batch_size:
            x, y = parallel.batch_constraint((x, y), self.mesh)
        return super().loss(params, x, y, injection)


def composite(operators, mesh=None, batch_size=None, **kwargs) -> perturb.Composite:
    """``perturb.Composite``, or with a mesh :class:`ShardedMinibatches`."""
    if mesh is None:
        return perturb.Composite(operators, **kwargs)
    return ShardedMinibatches(operators, mesh=mesh, batch_size=batch_size, **kwargs)


def chain(kind: str, config, mesh=None, batch_size=None, **modes) -> perturb.Composite:
    """The N-operator chain ``kind`` (``deep_linear`` or ``tanh``) with L2 regularisation.

    With a ``mesh``, minibatches of ``batch_size`` examples are split over it.
    """
    n = config.num_operators
    if kind == "deep_linear":
        body = [perturb.linear(config.linear_gain) for _ in range(n - 1)]
    else:
        body = [perturb.dense(30, "tanh") for _ in range(n - 1)]
    return composite(
        [*body, perturb.logistic_head()],
        mesh,
        batch_size,
        regularizer="l2",
        reg_strength=config.l2_strength,
        **modes,
    )


def convex(config, mesh=None, batch_size=None, **modes) -> perturb.Composite:
    return composite(
        [perturb.logistic_head()],
        mesh,
        batch_size,
        regularizer="l2",
        reg_strength=config.l2_strength,
        **modes,
    )


def seed_keys(config) -> jax.Array:
    return jax.random.split(jax.random.key(config.seed), config.num_seeds)


def fit_line(x, y) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: returns ``(b, a, R^2)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    b, a = np.polyfit(x, y, 1)
    residual = y - (a + b * x)
    r2 = 1.0 - residual.var() / y.var() if y.var() > 0 else 1.0
    return float(b), float(a), float(r2)


def gradient_change(model, params, x, y, keys, forward=None, backward=None) -> jax.Array:
    """``(N,)`` block gradient errors of one perturbed pass against the exact gradient.

    The exact gradient is the same computation with every size 0 (an exact identity),
    run as the other lane of one ``vmap``, so a block the perturbation cannot reach
    compares equal bit for bit (two separately compiled passes may differ in the last
    bit through different fusion).
    """
    both = jax.tree.map(
        lambda *v: jnp.stack(v),
        model.make_injection(keys),
        model.make_injection(keys, forward, backward),
    )
    exact, perturbed = (
        jax.tree.map(
            lambda g, i=i: g[i], jax.vmap(lambda inj: model.gradient(params, x, y, inj))(both)
        )
        for i in range(2)
    )
    return perturb.block_errors(perturbed, exact)


def changes_per_operator(model, params, x, y, keys, size, direction) -> jax.Array:
    """``(N, N)`` block errors: row k perturbs operator k only (``direction`` forward/backward)."""
    sizes = size * jnp.eye(model.num_operators, dtype=jnp.float32)

    def one(row):
        fwd, bwd = (row, None) if direction == "forward" else (None, row)
        return gradient_change(model, params, x, y, keys, fwd, bwd)

    return jax.vmap(one)(sizes)


def map_seeds(measure, keys, x, y, mesh) -> Any:
    """``measure(seed_key, x, y)`` for every seed key in one jit, the probe batch
    ``(x, y)`` split over the mesh's ``data`` axis."""

    def over_seeds(keys):
        probe = parallel.batch_constraint((x, y), mesh)
        # lax.map, not vmap: a vmapped batch of 10 seeds hung XLA:CPU (all threads idle
        # in futex waits) on jax 0.10.2; seeds one after another compile once as well.
        return jax.lax.map(lambda key: measure(key, *probe), keys)

    return jax.jit(over_seeds)(keys)


def probe_keys(key, config) -> jax.Array:
    """``(probe_keys, N, 2)`` noise keys."""
    n = config.num_operators
    return jax.vmap(lambda k: perturb.operator_keys(k, 0, n))(
        jax.random.split(key, config.probe_keys)
    )
