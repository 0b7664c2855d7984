"""BROS: bilevel optimisation with randomized subspaces (reconstructed).

BROS (Zhang, Kong, Zhang, Yuan 2026, https://arxiv.org/abs/2605.10288) is MA-SOBA
(:mod:`optstab.bilevel.soba`) whose lower and auxiliary updates live in random
subspaces. Only the abstract is public; the update below is our reconstruction.
For every projected leaf (see :mod:`optstab.bilevel.subspace`) with independent
Rademacher probes ``P, Q`` (``m x r``, entries ``+-1/sqrt(r)``, ``E[P P^T] = I``)::

    y <- y - (beta / kappa)      * P P^T grad_y g                    (unbiased lower step)
    z <- z - (gamma / (k kappa)) * P (P^T H Q Q^T z - P^T grad_y f)  (bi-probe auxiliary step)
    D  = grad_x f - J Q Q^T z                                        (unbiased cross term)
    w <- (1 - theta) w + theta D,      output  w / kappa_max^2

with ``k = 1 + (m - 1) / r`` per leaf, ``1 <= kappa <= k`` its curvature inflation
(below) and ``kappa_max`` the largest ``kappa`` of ``y`` (``k = kappa = 1`` for leaves
kept in full space, where ``P = Q = I``). Why two probes: with
one, ``E[P P^T H P P^T z] = (1 + 1/r) H z + (tr H / r) z - (2/r) diag(H) * z`` is
biased; with independent ``P`` and ``Q``, ``E[P P^T H Q Q^T z] = H z``.

**Step sizes that mean the same at every rank (ours).** A projected step is noisier
than the full one, so the given ``inner_lr``, ``aux_lr`` and chained outer step are
divided by factors built from two numbers per projected leaf: the probe's second
moment ``k = 1 + (m - 1) / r`` and its *curvature inflation* ``kappa`` (``1 <= kappa
<= k``), giving the steps above with::

    lower: beta / kappa,     auxiliary: gamma / (k kappa),     output: w / kappa_max^2

(``k = kappa = 1`` for leaves in full space). ``rank_scaled_steps="worst_case"`` sets
``kappa = k`` (the rule of isotropic curvature); the default ``"curvature"`` uses a
*certified* ``kappa`` measured on the problem (below) that equals ``k`` unless the
statistics prove it smaller; ``"none"`` applies the given steps unchanged.

*Second moments.* With ``M = P P^T``, ``M_ij = (1/r) sum_k s_ik s_jk`` for independent
signs ``s``; pairing the four signs of ``M_ia M_bj`` gives, for every ``m x m``
matrix ``X``::

    E[M X M] = X + (X^T + tr(X) I - 2 diag(X)) / r,      so  E[M^2] = k I,

i.e. ``E||P P^T v||^2 = k ||v||^2`` exactly (an ``m x n`` leaf: ``P`` acts on every
column, and a Hessian block between columns ``a, b`` gets ``tr(H_ab) I`` in the trace
term). For a direction ``v`` of a leaf the inflation of the curvature seen by a
projected step is therefore::

    kappa_v = E[(M v)^T H (M v)] / v^T H v = 1 + v^T (H + T(H) - 2 D(H)) v / (r v^T H v)

with ``T(H)`` the row trace (``tr(H_ab) I`` per block) and ``D(H)`` the block
diagonals. Isotropic rows (``H = lambda I`` on the leaf) give ``kappa_v = k`` for
every ``v``. A network's weight matrix ``W`` (``a @ W``, rows = inputs) has curvature
``~ E[a a^T] (x) B``; then ``kappa_v ~ 1 + (1 + rho) / r`` for ``v`` in the top input
directions, ``rho = tr(A) / lambda_max(A)`` the inputs' effective rank, about 2-3 for
ReLU features at any width (at most ``E[a^2] / E[a]^2 = pi`` per unit) against
``m = 1024`` rows. This gap is what the worst-case rule pays for: up to ``k^2 ~
(m/r)^2`` times more steps.

*Lower step.* For a quadratic ``g`` and gradient ``G``, ``E g(y - beta' M G) = g(y) -
beta' ||G||^2 + beta'^2 kappa_G G^T H G / 2``. With ``beta' = beta / kappa`` and
``kappa >= kappa_G`` the expected decrease is at least ``1 / kappa`` times that of
MA-SOBA's step along ``G``: BROS descends whenever MA-SOBA does. With ``kappa = k`` it
also contracts in mean square for every ``H``: with ``K`` holding each leaf's ``k``,
``E[M K^{-1} M] = I``, and in the norm ``||e||_K^2 = e^T K e``::

    E||e'||_K^2 = ||e||_K^2 - e^T (2 beta H - beta^2 H^2) e
               <= (1 - (1 - rho^2) / k_max) ||e||_K^2

whenever ``|1 - beta lambda| <= rho < 1`` for every eigenvalue ``lambda`` of ``H``.
Unscaled, the step needs ``beta < 2 / (k lambda_max)`` (``H = lambda I`` attains it).

*Auxiliary step.* With ``e = z - z*`` (``z* = H^{-1} grad_y f``), ``e' = e - gamma'
M_P H M_Q e - gamma' M_P H (M_Q - I) z*`` (the last term has mean zero) and::

    E||M_P H M_Q e||^2 = k e^T E[M_Q H^2 M_Q] e.

The factor ``k`` does not depend on the curvature: the projected step spreads
``k - 1`` times its energy over all ``m`` rows, also into directions of nearly zero
curvature where nothing contracts it, and the second probe ``Q`` carries that energy
back into curved ones (the term ``e^T T(H^2) e / r``). Hence ``gamma / (k kappa)``:
``k`` for the spreading and ``kappa`` for the ``Q`` side. Without the ``k`` this loop
diverges on networks (the cleaning MLP at rank 8 of 1024: ``|z|`` grows without bound
with MA-SOBA's steps). For ``H = lambda I`` the mean-square factor is ``1 - (1 - (1 -
gamma lambda)^2) / k^2``: MA-SOBA's own condition at every rank. For ``H = A (x) I``
the formula above with ``X = A^2`` bounds it below 1 whenever ``gamma < 2 lambda_min
(m + r - 1) / (lambda_max^2 (m + r + 1))``, which holds for every ``r >= 1`` once
``gamma lambda_max^2 (m + 2) < 2 m lambda_min``. The noise term's stationary spread is
then ``(k - 1)/k * gamma lambda / (2 - gamma lambda) * ||z*||^2`` (``H = lambda I``).

*Outer step.* ``x`` must move slower than ``z`` settles, and the cross term ``J Q
Q^T z`` is noisier than ``J z`` by the same kind of inflation; for isotropic curvature
both ask for ``k^2``, so the output is ``w / kappa_max^2``. For anisotropic curvature
this keeps the same power of ``kappa`` (an assumption: ``z`` settles ``k kappa`` times
more slowly there, but it starts at zero, so a lagging ``z`` shortens ``D`` rather than
turning it). A chained optimiser that normalises its input (Adam) undoes the output's
scale.

*Certified inflation.* ``kappa`` is measured along ``z`` from products the update
already takes, per projected leaf, with ``c = Q^T z`` and ``P^T H Q c``::

    n = (P^T Q c)^T (P^T H Q c) = (M_Q z)^T M_P H (M_Q z),  E[n] = kappa_z z^T H z
    d = (P^T z)^T (P^T H Q c)   = (M_P z)^T H (M_Q z),      E[d] = z^T H z

(the leaf's rows of ``H``; ``P`` and ``Q`` independent, so averaging ``n`` over ``P``
first, with ``E[M_P] = I``, leaves ``(M_Q z)^T H (M_Q z)``). Both reuse ``P^T H Q c``;
``P^T z`` and ``||z||^2`` of the old ``z`` are read back from the new one (``z = z' +
a P B``), so that ``z`` is still updated in place. Only ``r x r`` and ``r x n``
products are added: the rule's compiled bytes are the worst-case rule's, plus six
floats of statistics per projected leaf. Why along ``z``: ``z`` tracks
``H^{-1} grad_y f``, which leans towards low curvature, so ``kappa_z`` is at least the
inflation along the gradient-like directions the steps take (on the cleaning MLP at
rank 8 of 512 rows: 4.6-5.3 along ``z`` against 1.3-1.7 along the lower gradient).
The samples, divided by ``||z||^2``, enter exponentially weighted sums (decay
``CURVATURE_DECAY = 0.99``); ``kappa`` is the ratio of an upper confidence bound on
``E[n]`` to a lower one on ``E[d]`` (``CONFIDENCE = 2`` standard errors), clipped to
``[1, k]``, and it is ``k`` until ``MIN_SAMPLES = 10`` effective samples are in and
while the lower bound on ``E[d]`` is not positive. A saving is thus taken only once
the data show it: for isotropic curvature ``kappa_z = k`` and the rule stays (within
its error) the worst-case rule, while on the cleaning MLP at width 1024 it certifies
``kappa`` of 1.3-6.7 per leaf at ranks 8-128 (``k`` up to 128). The factors of an
update use only earlier updates' statistics, so they are independent of its probes.

The memory-efficient path (``factored=True``, the default) never forms full-size
``y`` gradients or Hessian actions of projected leaves: ``P^T grad_y g``,
``P^T H Q c`` (``c = Q^T z``) and ``J Q c`` come from one forward-over-reverse pass
of ``G(x, B1, B2) = g(x, y + P B1 + Q B2)`` at ``B = 0``, evaluated with
:func:`optstab.bilevel.subspace.call_factored`, and the outer pass
``P^T grad_y f`` runs before it, sequenced. ``factored=False`` forms ``y + P B`` as
dense matrices instead (same numbers up to rounding, more memory; kept to measure).

Ours, not the paper's: the step-size rules above, the ``rank`` rule (2-D leaves with
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

# Constants of the certified curvature rule (see the module docstring).
CURVATURE_DECAY = 0.99  # the statistics forget with horizon ~100 updates
CONFIDENCE = 2.0  # one-sided bound in standard errors (~2.3% per leaf and update)
MIN_SAMPLES = 10.0  # effective samples before any saving is certified
READ_BACK_FLOOR = 1e-3  # relative size below which a read-back ||z||^2 is unknown
RULES = ("curvature", "worst_case", "none")


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
    rank_scaled_steps: bool | str = "curvature",
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
      rank_scaled_steps: how the steps shrink with the rank (the module docstring
        derives both rules). ``"curvature"`` (default, or ``True``): by the certified
        inflation ``kappa`` of each projected leaf, ``1 <= kappa <= k``;
        ``"worst_case"``: by ``k = 1 + (m - 1) / r``, the bound for isotropic curvature
        (what ``True`` meant before the curvature rule); ``"none"`` (or ``False``): the
        steps as given, output ``w``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` over ``x`` with the calling
      convention of :func:`ma_soba`; its output is ``w / kappa_max^2``.

    Example:
      MA-SOBA's step sizes at rank 2 of 8 rows (``k = 4.5``; this curvature is
      isotropic, so the default rule certifies no saving and uses ``k``). With
      ``rank_scaled_steps="none"`` the same run diverges (``max|x - 1|`` passes 1e18,
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
    rule = rule_name(rank_scaled_steps)
    if rank is None:
        return ma_soba(problem, inner_lr, aux_lr, average=average, radius=radius, key=key)
    rank = int(rank)
    beta = as_schedule("inner_lr", inner_lr)
    gamma = as_schedule("aux_lr", aux_lr)
    measured = rule == "curvature"

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
        # The factors come from the statistics of earlier updates only, so they are
        # independent of this update's probes.
        scales = rank_scales(probes.left, rank, rule, state.stats)
        lr, aux_lr_ = beta(state.count), gamma(state.count)
        y = subspace.lift_descend(probes.left, state.y, guard(inner.grad_y), lr, scales.lower)
        aux_coordinates = guard(jax.tree.map(jnp.subtract, inner.hessian_z, outer.y))
        z = subspace.lift_descend(probes.left, z_, aux_coordinates, aux_lr_, scales.aux)
        direction = jax.tree.map(jnp.subtract, outer.x, inner.cross_z)
        stats = None
        if measured:
            # What the statistics need of the old z, read back from the new one
            # (reading the old z would keep a copy of it beside the in-place update).
            coefficients = jax.tree.map(lambda s_: aux_lr_ * s_, scales.aux)
            seen_z = seen_projections(probes, z, aux_coordinates, coefficients)
            samples = curvature_samples(probes, seen_z, right_z, inner.hessian_z)
            stats = updated_stats(state.stats, samples, finite)
        return _core.Proposal(direction, y, z, finite, scales.output, stats)

    init_stats = (lambda y: initial_stats(y, rank)) if measured else None
    return _core.bilevel_transform(problem, step, average, radius, key, init_stats)


def rule_name(rank_scaled_steps: bool | str) -> str:
    """``"curvature"``, ``"worst_case"`` or ``"none"`` (``True`` is the default rule,
    ``"curvature"``, and ``False`` is ``"none"``); ``ValueError`` for anything else."""
    if rank_scaled_steps is True:
        return "curvature"
    if rank_scaled_steps is False:
        return "none"
    if isinstance(rank_scaled_steps, str) and rank_scaled_steps in RULES:
        return rank_scaled_steps
    raise ValueError(
        f"rank_scaled_steps must be one of {', '.join(map(repr, RULES))}, True or False, "
        f"got {rank_scaled_steps!r}"
    )


class RankScales(NamedTuple):
    """Step multipliers of the rank rule (see the module docstring)."""

    lower: PyTree  # per leaf of y: 1 / kappa (1 for leaves in full space)
    aux: PyTree  # per leaf of y: 1 / (k kappa)
    output: float | jax.Array  # 1 / kappa_max^2 over the leaves of y


def rank_scales(
    probes: PyTree, rank: int, rule: str = "worst_case", stats: PyTree = None
) -> RankScales:
    """The multipliers for probes ``P`` (one per leaf, ``None`` in full space).

    Under ``"worst_case"`` they are Python floats (``kappa = k``); under
    ``"curvature"`` ``kappa`` is :func:`certified_inflation` of ``stats``.
    """
    is_none = lambda p: p is None

    def moments(p):
        return 1.0 if p is None or rule == "none" else subspace.second_moment(p.shape[0], rank)

    k = jax.tree.map(moments, probes, is_leaf=is_none)
    if rule == "curvature":
        kappa = jax.tree.map(
            lambda p, k_, st: 1.0 if p is None else certified_inflation(st, k_),
            probes, k, stats, is_leaf=is_none,
        )  # fmt: skip
        leaves = [jnp.asarray(v, jnp.float32) for v in jax.tree.leaves(kappa)]
        largest = jnp.max(jnp.stack(leaves)) if leaves else 1.0
    else:
        kappa = k
        largest = max(jax.tree.leaves(kappa), default=1.0)
    return RankScales(
        lower=jax.tree.map(lambda c: 1.0 / c, kappa),
        aux=jax.tree.map(lambda k_, c: 1.0 / (k_ * c), k, kappa),
        output=1.0 / largest**2,
    )


# --------------------------------------------------------------- curvature statistics
#
# Per projected leaf a (6,) float32 vector of exponentially weighted sums over earlier
# updates t: [sum a_t, sum a_t^2, sum a_t n_t, sum a_t n_t^2, sum a_t d_t, sum a_t d_t^2],
# a_t = CURVATURE_DECAY^(age) * (z was nonzero), n_t and d_t the samples below divided
# by ||z||^2.


def initial_stats(y: PyTree, rank: int) -> PyTree:
    """Zero statistics for every projected leaf of ``y`` (``None`` elsewhere)."""
    return jax.tree.map(
        lambda leaf: jnp.zeros((6,), jnp.float32) if subspace.is_projected(leaf, rank) else None,
        y,
    )


def seen_projections(
    probes: subspace.Probes, new_z: PyTree, coordinates: PyTree, coefficients: PyTree
) -> PyTree:
    """Per projected leaf ``(P^T Q, P^T z, ||z||^2)`` (float32) of the old ``z = z' + a P
    B``, from the new ``z'``, the step's coordinates ``B`` and its coefficient ``a``
    (``r x r`` and ``r x n`` products only); ``None`` elsewhere."""

    def one(p, q, new, b, a):
        if p is None:
            return None
        p_new = p.T @ new.astype(jnp.float32)
        p_step = (p.T @ p) @ b  # P^T P B
        p_old = p_new + a * p_step
        terms = (jnp.vdot(new, new), 2 * a * jnp.vdot(p_new, b), a * a * jnp.vdot(b, p_step))
        norm = sum(terms)
        # The sum cancels when the old z is small against the step (it starts at 0): its
        # float32 error is ~eps * sum|terms|, so a norm below READ_BACK_FLOOR of that
        # is unknown and reported as 0 (the sample is then left out).
        known = norm > READ_BACK_FLOOR * sum(jnp.abs(t) for t in terms)
        return (p.T @ q, p_old, jnp.where(known, norm, 0.0))

    return jax.tree.map(
        one, probes.left, probes.right, new_z, coordinates, coefficients,
        is_leaf=lambda p: p is None,
    )  # fmt: skip


def curvature_samples(
    probes: subspace.Probes, seen_z: PyTree, right_z: PyTree, left_hessian: PyTree
) -> PyTree:
    """Per projected leaf ``(n, d, ||z||^2)`` with ``n = (P^T Q c)^T (P^T H Q c)`` and
    ``d = (P^T z)^T (P^T H Q c)``, from :func:`seen_projections` ``seen_z``, the
    coordinates ``c = Q^T z`` and ``P^T H Q c`` (the leaf's rows of ``H`` applied to
    every leaf's ``Q Q^T z``)."""

    def one(p, seen, c, left):
        if p is None:
            return None
        p_q, p_z, norm = seen
        return (jnp.vdot(p_q @ c, left), jnp.vdot(p_z, left), norm)

    return jax.tree.map(
        one, probes.left, seen_z, right_z, left_hessian, is_leaf=lambda p: p is None
    )


def updated_stats(stats: PyTree, samples: PyTree, finite: jax.Array) -> PyTree:
    """The statistics after one update; unchanged where the update was skipped."""

    def one(st, sample):
        if st is None:
            return None
        n, d, norm = sample
        present = finite & (norm > 0) & jnp.isfinite(n) & jnp.isfinite(d)
        safe = jnp.where(present, norm, 1.0)
        n, d = jnp.where(present, n / safe, 0.0), jnp.where(present, d / safe, 0.0)
        weight = jnp.where(present, 1.0, 0.0)
        decay = jnp.where(finite, CURVATURE_DECAY, 1.0)
        decays = jnp.stack([decay, decay**2, decay, decay, decay, decay])
        return decays * st + weight * jnp.stack([1.0, 1.0, n, n * n, d, d * d])

    # stats is the prefix: each of its (6,) leaves meets one (n, d, norm) triple.
    return jax.tree.map(one, stats, samples, is_leaf=lambda v: v is None)


def certified_inflation(stats: jax.Array, k: float) -> jax.Array:
    """``kappa`` in ``[1, k]``: an upper confidence bound on ``E[n] / E[d]``, or ``k``
    while the statistics cannot bound ``E[d]`` away from zero."""
    tiny = jnp.finfo(jnp.float32).tiny
    total, total_sq, n1, n2, d1, d2 = (stats[i] for i in range(6))
    weight = jnp.maximum(total, tiny)
    samples = total**2 / jnp.maximum(total_sq, tiny)  # effective sample size
    mean_n, mean_d = n1 / weight, d1 / weight
    error = lambda second, mean: jnp.sqrt(
        jnp.maximum(second / weight - mean**2, 0.0) / jnp.maximum(samples, 1.0)
    )
    upper_n = mean_n + CONFIDENCE * error(n2, mean_n)
    lower_d = mean_d - CONFIDENCE * error(d2, mean_d)
    ok = (samples >= MIN_SAMPLES) & (lower_d > 0) & jnp.isfinite(upper_n)
    kappa = jnp.where(ok, upper_n / jnp.where(ok, lower_d, 1.0), k)
    return jnp.clip(kappa, 1.0, k)


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
