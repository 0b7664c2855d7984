"""Full-space first- and second-order oracles of a :class:`BilevelProblem`.

One forward-over-reverse pass (``jax.jvp`` of ``jax.value_and_grad``) of the inner
loss gives ``g``, ``grad_y g``, ``H z`` and ``J z`` together (``H = grad^2_yy g``,
``J z = grad_x <grad_y g, z>``); one reverse pass of the outer loss gives ``f``,
``grad_x f`` and ``grad_y f``. The loss values are kept so that a solver can skip a
step whose loss is not finite. :func:`after` orders the two passes so that XLA frees
the first one's activations before the second starts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optstab.bilevel.problem import BilevelProblem, PyTree


class OuterGradients(NamedTuple):
    x: PyTree  # float32 grad_x f
    y: PyTree  # float32 grad_y f
    loss: jax.Array  # () f


class InnerOracles(NamedTuple):
    grad_y: PyTree  # float32 grad_y g
    hessian_z: PyTree  # float32 H z
    cross_z: PyTree  # float32 J z, the structure of x
    loss: jax.Array  # () g


def to_float32(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.asarray(a, jnp.result_type(b)), tree, like)


def outer_gradients(problem: BilevelProblem, x: PyTree, y: PyTree, batch: Any) -> OuterGradients:
    """``grad_x f`` and ``grad_y f`` (float32) and ``f`` at ``(x, y)`` on ``batch``."""
    loss, (gx, gy) = jax.value_and_grad(problem.outer_loss, argnums=(0, 1))(x, y, batch)
    return OuterGradients(to_float32(gx), to_float32(gy), loss)


def inner_oracles(
    problem: BilevelProblem, x: PyTree, y: PyTree, z: PyTree, batch: Any
) -> InnerOracles:
    """``grad_y g``, ``H z`` and ``J z`` (float32) and ``g`` at ``(x, y)`` on ``batch``."""

    def gradients(y_):
        return jax.value_and_grad(problem.inner_loss, argnums=(0, 1))(x, y_, batch)

    (loss, (_, grad_y)), (_, (cross_z, hessian_z)) = jax.jvp(gradients, (y,), (cast_like(z, y),))
    return InnerOracles(to_float32(grad_y), to_float32(hessian_z), to_float32(cross_z), loss)


def after(done: Any, *values: Any) -> tuple[Any, ...]:
    """``values``, made to depend on ``done`` so that XLA computes ``done`` first.

    Sequencing the outer and inner passes keeps XLA from holding both passes'
    temporaries at once.
    """
    _, values = jax.lax.optimization_barrier((done, values))
    return values
