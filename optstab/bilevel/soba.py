"""SOBA and MA-SOBA: single-loop stochastic bilevel optimisation.

SOBA (Dagréou, Ablin, Vaiter, Moreau 2022, https://arxiv.org/abs/2201.13409) and
MA-SOBA (Chen, Xiao, Balasubramanian 2023, https://arxiv.org/abs/2306.12067). With
``H = grad^2_yy g``, ``J z = grad_x <grad_y g, z>`` and ``z = -v`` of the SOBA paper,
one update at ``(x, y, z)`` is::

    y <- y - beta  * grad_y g
    z <- z - gamma * (H z - grad_y f)          then, optionally, z <- Proj_{||z|| <= rho}(z)
    D  = grad_x f - J z                        (hypergradient estimate)
    w <- (1 - theta) * w + theta * D           (MA-SOBA's moving average)

and the transform outputs ``w``: chain it with any Optax optimiser of ``x`` (for
example ``optax.sgd(alpha)`` gives ``x <- x - alpha * w``). SOBA is MA-SOBA with
``theta = 1`` and no projection.

What is ours: all oracles are evaluated at the same ``(x_t, y_t, z_t)``; the outer
pass runs before the inner pass (sequenced so their temporaries do not overlap);
``z`` and ``w`` are kept in float32; the default ``average=0.1`` and ``key=0`` are our
choices, not the papers'. Non-finite oracles are not filtered: a NaN in a loss
reaches ``y``, ``z`` and the output, so check your losses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optstab._random import as_key
from optstab._state import find_unique
from optstab.bilevel import oracles
from optstab.bilevel.problem import (
    BilevelProblem,
    BilevelState,
    PyTree,
    as_schedule,
    check_average,
    check_problem,
    check_radius,
    initial_inner,
)

_MISSING = object()  # a batch may legitimately be None (deterministic problems)

# step(state, x, inner_batch, outer_batch) -> (hypergradient D, new y, new unprojected z)
Step = Callable[[BilevelState, PyTree, Any, Any], tuple[PyTree, PyTree, PyTree]]


def descend(tree: PyTree, direction: PyTree, lr: jax.Array) -> PyTree:
    """``tree - lr * direction``, computed in float32 and kept in ``tree``'s dtype."""
    return jax.tree.map(
        lambda t, d: (t.astype(jnp.float32) - lr * d).astype(t.dtype), tree, direction
    )


def project_ball(tree: PyTree, radius: jax.typing.ArrayLike | None) -> PyTree:
    """``tree`` scaled onto the ball ``||tree|| <= radius`` (unchanged if ``None``)."""
    if radius is None:
        return tree
    norm = optax.tree.norm(tree)
    factor = jnp.minimum(1.0, radius / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return jax.tree.map(lambda t: t * factor, tree)


def bilevel_transform(
    problem: BilevelProblem,
    step: Step,
    average: jax.typing.ArrayLike,
    radius: jax.typing.ArrayLike | None,
    key: jax.Array | int,
) -> optax.GradientTransformationExtraArgs:
    """The Optax transform around ``step``: state handling, averaging, projection."""

    def init_fn(x: PyTree) -> BilevelState:
        y = initial_inner(problem, x)
        return BilevelState(
            y=y,
            z=jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), y),
            w=jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), x),
            key=as_key(key),
            count=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates, state, params=None, *, inner_batch=_MISSING, outer_batch=_MISSING, **extra
    ):
        del updates, extra
        if params is None:
            raise ValueError("bilevel transforms need params (the upper variable x)")
        if inner_batch is _MISSING or outer_batch is _MISSING:
            raise ValueError("bilevel transforms need the inner_batch and outer_batch args")
        direction, y, z = step(state, params, inner_batch, outer_batch)
        w = jax.tree.map(lambda w_, d: (1 - average) * w_ + average * d, state.w, direction)
        new_state = BilevelState(
            y=y,
            z=project_ball(z, radius),
            w=w,
            key=state.key,
            count=optax.safe_increment(state.count),
        )
        return oracles.cast_like(w, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ma_soba(
    problem: BilevelProblem,
    inner_lr: optax.ScalarOrSchedule,
    aux_lr: optax.ScalarOrSchedule,
    average: jax.typing.ArrayLike = 0.1,
    radius: jax.typing.ArrayLike | None = None,
    key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
    """MA-SOBA: SOBA with a moving average of the hypergradient.

    Args:
      problem: the :class:`BilevelProblem`.
      inner_lr: ``beta``, the lower step: a number, an array or a schedule
        ``count -> beta``.
      aux_lr: ``gamma``, the auxiliary step, likewise.
      average: ``theta`` in (0, 1], the weight of the new hypergradient estimate.
      radius: optional radius ``rho > 0`` of the ball ``z`` is projected onto.
      key: PRNG key or int seed, kept in the state (unused by MA-SOBA itself; BROS
        draws its probes from it).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` over ``x``. Its ``update`` ignores
      the incoming updates, needs ``params=x`` and the extra arguments
      ``inner_batch`` (for ``g``) and ``outer_batch`` (for ``f``), and returns the
      averaged hypergradient ``w``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optstab import bilevel
      >>> problem = bilevel.BilevelProblem(
      ...     inner_loss=lambda x, y, b: 0.5 * jnp.sum((y - x) ** 2),
      ...     outer_loss=lambda x, y, b: 0.5 * jnp.sum((y - 1.0) ** 2),
      ...     inner_init=jnp.zeros(2))
      >>> tx = optax.chain(bilevel.ma_soba(problem, 0.5, 0.5, average=0.5), optax.sgd(0.1))
      >>> x = jnp.zeros(2)
      >>> state = tx.init(x)
      >>> for _ in range(200):
      ...     updates, state = tx.update(x, state, x, inner_batch=None, outer_batch=None)
      ...     x = optax.apply_updates(x, updates)
      >>> x.round(3)
      Array([1., 1.], dtype=float32)

    References:
      Chen, Xiao, Balasubramanian, *Optimal algorithms for stochastic bilevel
      optimization under relaxed smoothness conditions*, https://arxiv.org/abs/2306.12067
    """
    check_problem(problem)
    check_average(average)
    check_radius(radius)
    beta = as_schedule("inner_lr", inner_lr)
    gamma = as_schedule("aux_lr", aux_lr)

    def step(state: BilevelState, x, inner_batch, outer_batch):
        outer = oracles.outer_gradients(problem, x, state.y, outer_batch)
        x_, z_, inner_batch = oracles.after(outer, x, state.z, inner_batch)
        inner = oracles.inner_oracles(problem, x_, state.y, z_, inner_batch)
        y = descend(state.y, inner.grad_y, beta(state.count))
        aux_direction = jax.tree.map(jnp.subtract, inner.hessian_z, outer.y)
        z = descend(z_, aux_direction, gamma(state.count))
        direction = jax.tree.map(jnp.subtract, outer.x, inner.cross_z)
        return direction, y, z

    return bilevel_transform(problem, step, average, radius, key)


def soba(
    problem: BilevelProblem,
    inner_lr: optax.ScalarOrSchedule,
    aux_lr: optax.ScalarOrSchedule,
    radius: jax.typing.ArrayLike | None = None,
    key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
    """SOBA: :func:`ma_soba` with ``average=1`` (no moving average).

    Arguments as :func:`ma_soba`; the output is the current hypergradient estimate.

    References:
      Dagréou, Ablin, Vaiter, Moreau, *A framework for bilevel optimization that
      enables stochastic and global variance reduction algorithms*, NeurIPS 2022,
      https://arxiv.org/abs/2201.13409
    """
    return ma_soba(problem, inner_lr, aux_lr, average=1.0, radius=radius, key=key)


def find_bilevel_state(opt_state: PyTree) -> BilevelState:
    """The :class:`BilevelState` inside a (possibly nested) optimizer state.

    Raises:
      ValueError: when there is no bilevel state or more than one.
    """
    return find_unique(opt_state, BilevelState, "bilevel")


def inner_params(opt_state: PyTree) -> PyTree:
    """The current lower variable ``y`` of the bilevel solver inside ``opt_state``."""
    return find_bilevel_state(opt_state).y
