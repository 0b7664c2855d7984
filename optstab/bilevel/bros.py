"""BROS: bilevel optimisation with randomized subspaces (reconstructed).

BROS (Zhang, Kong, Zhang, Yuan 2026, https://arxiv.org/abs/2605.10288) is MA-SOBA
(:mod:`optstab.bilevel.soba`) whose lower and auxiliary updates live in random
subspaces. Only the abstract is public; the update below is our reconstruction.
For every projected leaf (see :mod:`optstab.bilevel.subspace`) with independent
Rademacher probes ``P, Q`` (``E[P P^T] = E[Q Q^T] = I``)::

    y <- y - beta  * P P^T grad_y g                         (unbiased lower step)
    z <- z - gamma * P (P^T H Q Q^T z - P^T grad_y f)       (bi-probe auxiliary step)
    D  = grad_x f - J Q Q^T z                               (unbiased cross term)
    w <- (1 - theta) w + theta D

Leaves kept in full space use ``P = Q = I``. Why two probes: with one probe,
``E[P P^T H P P^T z] = (1 + 1/r) H z + (tr H / r) z - (2/r) diag(H) * z`` is biased;
with independent ``P`` and ``Q``, ``E[P P^T H Q Q^T z] = H z``.

The memory-efficient path (``factored=True``, the default) never forms full-size
``y`` gradients or Hessian actions of projected leaves: ``P^T grad_y g``,
``P^T H Q c`` (``c = Q^T z``) and ``J Q c`` come from one forward-over-reverse pass
of ``G(x, B1, B2) = g(x, y + P B1 + Q B2)`` at ``B = 0``, evaluated with
:func:`optstab.bilevel.subspace.call_factored`, and the outer pass
``P^T grad_y f`` runs before it, sequenced. ``factored=False`` forms ``y + P B`` as
dense matrices instead (same numbers up to rounding, more memory; kept to measure).

Ours, not the paper's: the ``rank`` rule (2-D leaves with more than ``rank`` rows are
projected), probes drawn from ``fold_in(key, count // resample_every)``, the defaults
``average=0.1`` and ``resample_every=1``, and the factored evaluation.
``rank=None`` returns :func:`optstab.bilevel.ma_soba` itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optstab.bilevel import oracles, subspace
from optstab.bilevel.problem import (
    BilevelProblem,
    BilevelState,
    PyTree,
    as_schedule,
    check_average,
    check_positive_int,
    check_problem,
    check_radius,
    check_rank,
)
from optstab.bilevel.soba import bilevel_transform, ma_soba


def bros(
    problem: BilevelProblem,
    rank: int | None,
    inner_lr: optax.ScalarOrSchedule,
    aux_lr: optax.ScalarOrSchedule,
    average: jax.typing.ArrayLike = 0.1,
    radius: jax.typing.ArrayLike | None = None,
    key: jax.Array | int = 0,
    *,
    resample_every: int = 1,
    factored: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """BROS: MA-SOBA with lower and auxiliary steps in random subspaces.

    Args:
      problem: the :class:`~optstab.bilevel.BilevelProblem`.
      rank: subspace dimension ``r >= 1`` of every projected leaf; ``None`` means
        full space, and then the result is exactly :func:`ma_soba`.
      inner_lr, aux_lr, average, radius, key: as :func:`ma_soba`.
      resample_every: draw new probes every this many updates (``>= 1``).
      factored: evaluate the losses with factored projected leaves (saves memory);
        ``False`` forms the shifted weights densely.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` over ``x`` with the calling
      convention of :func:`ma_soba`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optstab import bilevel
      >>> problem = bilevel.BilevelProblem(
      ...     inner_loss=lambda x, y, b: 0.5 * jnp.sum((y["w"] - x) ** 2),
      ...     outer_loss=lambda x, y, b: 0.5 * jnp.sum((y["w"] - 1.0) ** 2),
      ...     inner_init={"w": jnp.zeros((8, 3))})
      >>> tx = optax.chain(bilevel.bros(problem, rank=2, inner_lr=0.2, aux_lr=0.2),
      ...                  optax.sgd(0.5))
      >>> x = jnp.zeros((8, 3))
      >>> state = tx.init(x)
      >>> updates, state = tx.update(x, state, x, inner_batch=None, outer_batch=None)
      >>> bilevel.inner_params(state)["w"].shape
      (8, 3)

    References:
      Zhang, Kong, Zhang, Yuan, *BROS*, 2026, https://arxiv.org/abs/2605.10288 (abstract
      only; reconstructed).
    """
    check_problem(problem)
    check_rank(rank)
    check_positive_int("resample_every", resample_every)
    check_average(average)
    check_radius(radius)
    if rank is None:
        return ma_soba(problem, inner_lr, aux_lr, average=average, radius=radius, key=key)
    rank = int(rank)
    beta = as_schedule("inner_lr", inner_lr)
    gamma = as_schedule("aux_lr", aux_lr)

    def step(state: BilevelState, x: PyTree, inner_batch: Any, outer_batch: Any):
        period_key = jax.random.fold_in(state.key, state.count // resample_every)
        probes = subspace.draw_probes(period_key, state.y, rank)
        zeros = subspace.zero_coordinates(probes.left, state.y)

        outer_x, outer_y = _outer_pass(problem, probes, x, state.y, zeros, outer_batch, factored)
        x_, z_, inner_batch = oracles.after((outer_x, outer_y), x, state.z, inner_batch)
        right_z = subspace.restrict(probes.right, z_)
        grad_y, hessian_z, cross_z = _inner_pass(
            problem, probes, x_, state.y, zeros, right_z, inner_batch, factored
        )

        y = subspace.lift_descend(probes.left, state.y, grad_y, beta(state.count))
        aux_coordinates = jax.tree.map(jnp.subtract, hessian_z, outer_y)
        z = subspace.lift_descend(probes.left, z_, aux_coordinates, gamma(state.count))
        direction = jax.tree.map(jnp.subtract, outer_x, cross_z)
        return direction, y, z

    return bilevel_transform(problem, step, average, radius, key)


def _loss(factored: bool, loss):
    return (lambda *a: subspace.call_factored(loss, *a)) if factored else loss


def _outer_pass(problem, probes, x, y, zeros, batch, factored):
    """``grad_x f`` and ``P^T grad_y f`` (float32)."""

    def outer(x_, first):
        shifted = subspace.shifted_one(y, probes.left, first, factored)
        return _loss(factored, problem.outer_loss)(x_, shifted, batch)

    grad_x, grad_first = jax.grad(outer, argnums=(0, 1))(x, zeros)
    return oracles.to_float32(grad_x), grad_first


def _inner_pass(problem, probes, x, y, zeros, right_z, batch, factored):
    """``P^T grad_y g``, ``P^T H Q c`` and ``J Q c`` for ``c = Q^T z`` (float32)."""

    def inner(x_, first, second):
        shifted = subspace.shifted(y, probes, first, second, factored)
        return _loss(factored, problem.inner_loss)(x_, shifted, batch)

    def gradients(second):
        return jax.grad(inner, argnums=(0, 1))(x, zeros, second)

    (_, grad_y), (cross_z, hessian_z) = jax.jvp(gradients, (zeros,), (right_z,))
    return grad_y, hessian_z, oracles.to_float32(cross_z)
