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
choices, not the papers'. A step whose losses or derivatives are not all finite is
skipped: ``y``, ``z`` and ``w`` keep their values, the output is zero and the state's
``nonfinite`` counter goes up (see :mod:`optstab.bilevel._core`). ``x`` whose tree or
shapes differ from ``init``'s, a batch a loss cannot take, or a loss that does not
return a scalar raise ``ValueError`` when the update is traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optstab._state import find_unique
from optstab.bilevel import _core, oracles
from optstab.bilevel.problem import (
    BilevelProblem,
    BilevelState,
    PyTree,
    as_schedule,
    check_average,
    check_problem,
    check_radius,
)


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
      averaged hypergradient ``w`` (zeros for a skipped non-finite step, counted in
      the state's ``nonfinite``).

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

    def step(state: BilevelState, x, inner_batch, outer_batch) -> _core.Proposal:
        outer = oracles.outer_gradients(problem, x, state.y, outer_batch)
        x_, z_, inner_batch = oracles.after(outer, x, state.z, inner_batch)
        inner = oracles.inner_oracles(problem, x_, state.y, z_, inner_batch)
        finite = _core.all_finite(outer, inner)
        guard = lambda tree: _core.zero_unless(finite, tree)
        y = _core.descend(state.y, guard(inner.grad_y), beta(state.count))
        aux_direction = jax.tree.map(jnp.subtract, inner.hessian_z, outer.y)
        z = _core.descend(z_, guard(aux_direction), gamma(state.count))
        direction = jax.tree.map(jnp.subtract, outer.x, inner.cross_z)
        return _core.Proposal(direction, y, z, finite)

    return _core.bilevel_transform(problem, step, average, radius, key)


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
