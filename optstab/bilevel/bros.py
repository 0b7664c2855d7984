"""BROS: bilevel optimisation with randomized subspaces (reconstructed).

BROS (Zhang, Kong, Zhang, Yuan 2026, https://arxiv.org/abs/2605.10288) is MA-SOBA
(:mod:`optstab.bilevel.soba`) whose lower and auxiliary updates live in random
subspaces. Only the abstract is public; the update below is our reconstruction.
For every projected leaf (see :mod:`optstab.bilevel.subspace`) with independent
Rademacher probes ``P, Q`` (``m x r``, entries ``+-1/sqrt(r)``, ``E[P P^T] = I``)::

    y <- y - (beta / k)    * P P^T grad_y g                      (unbiased lower step)
    z <- z - (gamma / k^2) * P (P^T H Q Q^T z - P^T grad_y f)    (bi-probe auxiliary step)
    D  = grad_x f - J Q Q^T z                                    (unbiased cross term)
    w <- (1 - theta) w + theta D,      output  w / k_max^2

with ``k = 1 + (m - 1) / r`` per leaf and ``k_max`` the largest ``k`` of ``y``
(``k = 1`` for leaves kept in full space, where ``P = Q = I``). Why two probes: with
one, ``E[P P^T H P P^T z] = (1 + 1/r) H z + (tr H / r) z - (2/r) diag(H) * z`` is
biased; with independent ``P`` and ``Q``, ``E[P P^T H Q Q^T z] = H z``.

**Step sizes that mean the same at every rank (ours).** The divisions by ``k`` make
``inner_lr``, ``aux_lr`` and the chained outer step *full-space-equivalent*: the
values that make MA-SOBA converge keep BROS stable at every rank.
``rank_scaled_steps=False`` applies the given steps unchanged.

*Second moment of a probe.* With ``M = P P^T``, ``M_ij = (1/r) sum_k s_ik s_jk`` for
independent signs ``s``; pairing the four signs of ``M_ia M_bj`` gives, for every
symmetric ``m x m`` matrix ``X``::

    E[M X M] = X + (X + tr(X) I - 2 diag(X)) / r,      so  E[M^2] = k I,

i.e. ``E||P P^T v||^2 = k ||v||^2`` exactly (for an ``m x n`` leaf ``P`` acts on every
column, and the same holds for the Frobenius norm).

*Lower step.* On a quadratic ``g`` with Hessian ``H`` the error ``e = y - y*`` moves to
``e' = e - beta K^{-1} M H e``, ``K`` holding each leaf's ``k``. As ``M`` is block
diagonal over leaves, ``E[M K^{-1} M] = I``, and in the norm ``||e||_K^2 = e^T K e``::

    E||e'||_K^2 = ||e||_K^2 - e^T (2 beta H - beta^2 H^2) e
               <= (1 - (1 - rho^2) / k_max) ||e||_K^2

whenever full-space steps contract, ``|1 - beta lambda| <= rho < 1`` for every
eigenvalue ``lambda`` of ``H``. Unscaled, the same step needs
``beta < 2 / (k lambda_max)``: rank 1 of ``m`` rows needs an ``m`` times smaller step
(``H = lambda I`` attains it).

*Auxiliary step.* With ``e = z - z*`` (``z* = H^{-1} grad_y f``) and ``c = k^2``,
``e' = e - (gamma/c) M_P H M_Q e - (gamma/c) M_P H (M_Q - I) z*``; the last term has
mean zero. For ``H = lambda I`` on a leaf, ``E||M_P H M_Q e||^2 = k^2 lambda^2 ||e||^2``
and the mean-square factor is ``1 - (1 - (1 - gamma lambda)^2) / k^2``: MA-SOBA's own
condition ``|1 - gamma lambda| < 1`` at every rank, and ``1 - 1/k^2`` is the best any
``gamma`` achieves. For ``H = A (x) I`` (``A`` acting on the rows), the formula above with
``X = A^2`` bounds the factor below 1 whenever ``gamma < 2 lambda_min (m + r - 1) /
(lambda_max^2 (m + r + 1))``, a condition that holds for every ``r >= 1`` once
``gamma lambda_max^2 (m + 2) < 2 m lambda_min``; unscaled, it tightens like ``(r/m)^2``.
The noise term's stationary spread is then ``(k - 1)/k * gamma lambda / (2 - gamma
lambda) * ||z*||^2`` (``H = lambda I``): bounded uniformly in the rank.

*Outer step.* MA-SOBA converges when ``x`` moves slower than ``z`` settles (a bound on
the ratio of the outer to the auxiliary step). Since ``z`` settles up to ``k^2`` times
more slowly whatever ``gamma``, the output is divided by ``k_max^2``, keeping MA-SOBA's
ratio: with a chained ``optax.sgd(alpha)``, ``x`` moves by ``alpha / k_max^2``. The
cost of randomisation is time, not stability: BROS needs up to ``k^2 ~ (m/r)^2`` times
more steps. The bounds are worst cases (isotropic curvature); networks whose curvature
is concentrated in a few directions may tolerate larger steps, which is what
``rank_scaled_steps=False`` is for. A chained optimiser that normalises its input
(Adam) undoes the output's scale.

The memory-efficient path (``factored=True``, the default) never forms full-size
``y`` gradients or Hessian actions of projected leaves: ``P^T grad_y g``,
``P^T H Q c`` (``c = Q^T z``) and ``J Q c`` come from one forward-over-reverse pass
of ``G(x, B1, B2) = g(x, y + P B1 + Q B2)`` at ``B = 0``, evaluated with
:func:`optstab.bilevel.subspace.call_factored`, and the outer pass
``P^T grad_y f`` runs before it, sequenced. ``factored=False`` forms ``y + P B`` as
dense matrices instead (same numbers up to rounding, more memory; kept to measure).

Ours, not the paper's: the step-size rule above, the ``rank`` rule (2-D leaves with
more than ``rank`` rows are projected), probes drawn from
``fold_in(key, count // resample_every)``, the defaults ``average=0.1`` and
``resample_every=1``, the factored evaluation, and skipping non-finite steps (as in
:mod:`optstab.bilevel.soba`). ``rank=None`` returns :func:`optstab.bilevel.ma_soba`
itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optstab.bilevel import _core, oracles, subspace
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
from optstab.bilevel.soba import ma_soba


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
    rank_scaled_steps: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """BROS: MA-SOBA with lower and auxiliary steps in random subspaces.

    Args:
      problem: the :class:`~optstab.bilevel.BilevelProblem`.
      rank: subspace dimension ``r >= 1`` of every projected leaf; ``None`` means
        full space, and then the result is exactly :func:`ma_soba`.
      inner_lr, aux_lr, average, radius, key: as :func:`ma_soba`; with
        ``rank_scaled_steps`` the step sizes are full-space-equivalent.
      resample_every: draw new probes every this many updates (``>= 1``).
      factored: evaluate the losses with factored projected leaves (saves memory);
        ``False`` forms the shifted weights densely.
      rank_scaled_steps: divide each projected leaf's lower step by ``k = 1 + (m-1)/r``,
        its auxiliary step by ``k^2`` and the output by ``k_max^2`` (the module
        docstring derives why); ``False`` uses the steps as given and outputs ``w``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` over ``x`` with the calling
      convention of :func:`ma_soba`; its output is ``w / k_max^2`` (``w`` with
      ``rank_scaled_steps=False``).

    Example:
      MA-SOBA's step sizes at rank 2 of 8 rows (``k = 4.5``). With
      ``rank_scaled_steps=False`` the same run diverges (``max|x - 1|`` passes 1e18,
      after which non-finite steps are skipped and counted):

      >>> import jax, jax.numpy as jnp, optax
      >>> from optstab import bilevel
      >>> problem = bilevel.BilevelProblem(
      ...     inner_loss=lambda x, y, b: 0.5 * jnp.sum((y["w"] - x) ** 2),
      ...     outer_loss=lambda x, y, b: 0.5 * jnp.sum((y["w"] - 1.0) ** 2),
      ...     inner_init={"w": jnp.zeros((8, 3))})
      >>> tx = optax.chain(bilevel.bros(problem, rank=2, inner_lr=0.2, aux_lr=0.2),
      ...                  optax.sgd(0.1))
      >>> @jax.jit
      ... def run(x):
      ...     def step(carry, _):
      ...         x, state = carry
      ...         updates, state = tx.update(x, state, x, inner_batch=None, outer_batch=None)
      ...         return (optax.apply_updates(x, updates), state), None
      ...     return jax.lax.scan(step, (x, tx.init(x)), length=3000)[0]
      >>> x, state = run(jnp.zeros((8, 3)))
      >>> bool(jnp.abs(x - 1.0).max() < 1e-3)
      True

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

        outer = _outer_pass(problem, probes, x, state.y, zeros, outer_batch, factored)
        x_, z_, inner_batch = oracles.after(outer, x, state.z, inner_batch)
        right_z = subspace.restrict(probes.right, z_)
        inner = _inner_pass(problem, probes, x_, state.y, zeros, right_z, inner_batch, factored)

        finite = _core.all_finite(outer, inner)
        guard = lambda tree: _core.zero_unless(finite, tree)
        scales = rank_scales(probes.left, rank, rank_scaled_steps)
        lr, aux_lr_ = beta(state.count), gamma(state.count)
        y = subspace.lift_descend(probes.left, state.y, guard(inner.grad_y), lr, scales.lower)
        aux_coordinates = jax.tree.map(jnp.subtract, inner.hessian_z, outer.y)
        z = subspace.lift_descend(probes.left, z_, guard(aux_coordinates), aux_lr_, scales.aux)
        direction = jax.tree.map(jnp.subtract, outer.x, inner.cross_z)
        return _core.Proposal(direction, y, z, finite, scales.output)

    return _core.bilevel_transform(problem, step, average, radius, key)


class RankScales(NamedTuple):
    """Static step multipliers of the rank rule (see the module docstring)."""

    lower: PyTree  # per leaf of y: 1 / k (1 for leaves in full space)
    aux: PyTree  # per leaf of y: 1 / k^2
    output: float  # 1 / k_max^2 over the leaves of y


def rank_scales(probes: PyTree, rank: int, enabled: bool = True) -> RankScales:
    """The multipliers for probes ``P`` (one per leaf, ``None`` in full space)."""
    moments = jax.tree.map(
        lambda p: 1.0 if p is None or not enabled else subspace.second_moment(p.shape[0], rank),
        probes,
        is_leaf=lambda p: p is None,
    )
    largest = max(jax.tree.leaves(moments), default=1.0)
    return RankScales(
        lower=jax.tree.map(lambda k: 1.0 / k, moments),
        aux=jax.tree.map(lambda k: 1.0 / k**2, moments),
        output=1.0 / largest**2,
    )


def _loss(factored: bool, loss):
    return (lambda *a: subspace.call_factored(loss, *a)) if factored else loss


def _outer_pass(problem, probes, x, y, zeros, batch, factored) -> oracles.OuterGradients:
    """``grad_x f``, ``P^T grad_y f`` (float32) and ``f``."""

    def outer(x_, first):
        shifted = subspace.shifted_one(y, probes.left, first, factored)
        return _loss(factored, problem.outer_loss)(x_, shifted, batch)

    loss, (grad_x, grad_first) = jax.value_and_grad(outer, argnums=(0, 1))(x, zeros)
    return oracles.OuterGradients(oracles.to_float32(grad_x), grad_first, loss)


def _inner_pass(problem, probes, x, y, zeros, right_z, batch, factored) -> oracles.InnerOracles:
    """``P^T grad_y g``, ``P^T H Q c``, ``J Q c`` for ``c = Q^T z`` (float32) and ``g``."""

    def inner(x_, first, second):
        shifted = subspace.shifted(y, probes, first, second, factored)
        return _loss(factored, problem.inner_loss)(x_, shifted, batch)

    def gradients(second):
        return jax.value_and_grad(inner, argnums=(0, 1))(x, zeros, second)

    (loss, (_, grad_y)), (_, (cross_z, hessian_z)) = jax.jvp(gradients, (zeros,), (right_z,))
    return oracles.InnerOracles(grad_y, hessian_z, oracles.to_float32(cross_z), loss)
