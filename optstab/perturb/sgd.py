"""Paired clean/perturbed SGD runs on a :class:`~optstab.perturb.Composite`.

Part of the perturbed forward-backward SGD lab (arXiv 2602.20646, reconstructed; see
:mod:`optstab.perturb.ops`). :func:`run_sgd` trains two copies of the same model from
the same initialisation on the same minibatches, one exactly and one with the
perturbations of a :class:`Perturbation`, in one ``lax.scan``. At every step it records,
for the perturbed run, the gradient error of each block against the *clean gradient at
the same iterate*, so the error is the perturbation's effect alone, not the drift
between the two trajectories.

Outcome labels (the definitions are ours, after the reconstruction in our notes), all
judged at the check step ``t0 + horizon`` (the last step by default): the perturbed run
has *diverged* if its loss or parameters were ever non-finite, or if at the check step
its loss exceeds ``divergence_factor`` times its initial loss or its parameter norm
exceeds ``radius``; otherwise it has *recovered* if at the check step its loss is within
``tolerance`` (relative) of the clean run's, and is *lingering* if not. A transient
blow-up that has healed by the check step therefore counts as recovered, not diverged. The recovery
time is the number of steps after ``t0`` until the perturbed loss enters that band and
stays there to the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optstab import tree as otree
from optstab._checks import check_count, check_range
from optstab.perturb import schedules
from optstab.perturb.composite import Composite, Injection, block_errors, jacobian_norms

RECOVERED, LINGERING, DIVERGED = 0, 1, 2
OUTCOMES = ("recovered", "lingering", "diverged")

ScheduleSpec = Mapping[int, "schedules.Schedule | float"] | Callable | float | None


class Perturbation(NamedTuple):
    """Which operators are perturbed, and how much at each step.

    ``forward`` and ``backward`` are each ``None`` (no perturbation), a schedule or number
    applied to every operator, or a mapping ``{operator index: schedule or number}``
    (0-based, ``-1`` for the last operator). The modes are the model's
    (:class:`Composite`'s ``forward_mode`` / ``backward_mode``).
    """

    forward: ScheduleSpec = None
    backward: ScheduleSpec = None

    def sizes(self, step: jax.Array, num_operators: int) -> tuple[jax.Array, jax.Array]:
        """Forward and backward sizes at ``step``, each ``(num_operators,)`` float32."""
        n = num_operators
        return _sizes(self.forward, step, n), _sizes(self.backward, step, n)


def _sizes(spec: ScheduleSpec, step: jax.Array, n: int) -> jax.Array:
    if spec is None or not isinstance(spec, Mapping):
        return jnp.broadcast_to(schedules.as_schedule(spec)(step), (n,)).astype(jnp.float32)
    sizes = jnp.zeros((n,), jnp.float32)
    for index, value in spec.items():
        if not -n <= index < n:
            raise ValueError(f"operator index {index} out of range for {n} operators")
        sizes = sizes.at[index].set(schedules.as_schedule(value)(step))
    return sizes


class SGDTrace(NamedTuple):
    """Per-step records of :func:`run_sgd` (leading axis: step)."""

    loss_clean: jax.Array  # (T,) float32 clean run's objective
    loss: jax.Array  # (T,) float32 perturbed run's objective
    grad_norm: jax.Array  # (T,) float32 norm of the perturbed gradient
    grad_error: jax.Array  # (T, N) float32 ||g_hat_j - g_j|| at the perturbed iterate
    relative_grad_error: jax.Array  # (T,) float32 ||g_hat - g|| / ||g||
    lipschitz: jax.Array  # (T, N) float32 power-iteration L_i (0 when not tracked)
    param_norm: jax.Array  # (T,) float32 norm of the perturbed parameters
    forward_size: jax.Array  # (T, N) float32 forward sizes used
    backward_size: jax.Array  # (T, N) float32 backward sizes used


class SGDResult(NamedTuple):
    params_clean: tuple
    params: tuple
    trace: SGDTrace
    outcome: jax.Array  # () int32: RECOVERED, LINGERING or DIVERGED
    recovery_time: jax.Array  # () int32 steps after t0; -1 if never back in the band


def _minibatch(data_key, step, x, y, batch_size):
    if batch_size is None:
        return x, y
    idx = jax.random.randint(jax.random.fold_in(data_key, step), (batch_size,), 0, x.shape[0])
    return x[idx], y[idx]


def classify_outcome(
    trace: SGDTrace,
    t0: int | jax.Array = 0,
    horizon: int | jax.Array | None = None,
    tolerance: float = 0.05,
    divergence_factor: float = 10.0,
    radius: float = 1e6,
) -> tuple[jax.Array, jax.Array]:
    """``(outcome, recovery_time)`` of a trace; see the module docstring."""
    steps = trace.loss.shape[0]
    horizon = steps - 1 if horizon is None else horizon
    loss = trace.loss
    check_at = jnp.minimum(jnp.asarray(t0) + horizon, steps - 1)
    finite = jnp.all(jnp.isfinite(loss)) & jnp.all(jnp.isfinite(trace.param_norm))
    too_large = (loss[check_at] > divergence_factor * loss[0]) | (
        trace.param_norm[check_at] > radius
    )
    diverged = ~finite | too_large
    in_band = loss <= (1.0 + tolerance) * trace.loss_clean
    t = jnp.arange(steps)
    outside_after_t0 = (t >= t0) & ~in_band
    last_outside = jnp.max(jnp.where(outside_after_t0, t, jnp.asarray(t0) - 1))
    recovery_time = jnp.where(last_outside < steps - 1, last_outside + 1 - t0, -1)
    outcome = jnp.where(diverged, DIVERGED, jnp.where(in_band[check_at], RECOVERED, LINGERING))
    return outcome.astype(jnp.int32), recovery_time.astype(jnp.int32)


def run_sgd(
    model: Composite,
    params: tuple,
    x: jax.Array,
    y: jax.Array,
    *,
    num_steps: int,
    learning_rate: schedules.Schedule | float,
    perturbation: Perturbation | None = None,
    data_key: jax.Array | int = 0,
    perturb_key: jax.Array | int = 1,
    batch_size: int | None = None,
    eval_data: tuple[jax.Array, jax.Array] | None = None,
    lipschitz_every: int = 0,
    t0: int | jax.Array = 0,
    horizon: int | jax.Array | None = None,
    tolerance: float = 0.05,
    divergence_factor: float = 10.0,
    radius: float = 1e6,
) -> SGDResult:
    """Runs clean and perturbed SGD side by side for ``num_steps`` steps.

    Both runs start at ``params`` and take ``w <- w - lr(t) * g`` on the minibatch of
    step ``t`` (``batch_size`` examples drawn with replacement by
    ``fold_in(data_key, t)``; the full data when ``batch_size`` is None). The perturbed
    run's gradient is that of the model under the :class:`Perturbation`, with keys
    ``operator_keys(perturb_key, t, N)``.

    The function is pure and jit-compatible (``num_steps``, ``batch_size`` and
    ``lipschitz_every`` are static; ``model`` and ``perturbation`` are Python objects
    closed over), and ``jax.vmap`` runs seeds or sizes in parallel.

    Args:
      model: the :class:`Composite`.
      params: initial parameters (``model.init(...)``).
      x, y: training data.
      num_steps: number of SGD steps ``T``.
      learning_rate: a number or a schedule ``step -> lr``.
      perturbation: the forward/backward perturbation schedules (default: none).
      data_key / perturb_key: keys (or int seeds) of the data order and of the noise.
      batch_size: minibatch size, or None for full-batch gradient descent.
      eval_data: ``(x, y)`` on which the recorded losses are computed (default: the
        step's minibatch).
      lipschitz_every: record power-iteration estimates of each ``L_i`` at the perturbed
        iterate every this many steps (0: never; the last estimate is carried over).
      t0, horizon, tolerance, divergence_factor, radius: see :func:`classify_outcome`.

    Returns:
      An :class:`SGDResult` with the final parameters of both runs, the
      :class:`SGDTrace`, the outcome label and the recovery time.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from optstab import perturb
      >>> model = perturb.Composite([perturb.dense(4, "tanh"), perturb.logistic_head()],
      ...                           regularizer="l2", reg_strength=1e-2)
      >>> x = jax.random.normal(jax.random.key(0), (32, 3)); y = (x[:, 0] > 0).astype(int)
      >>> params = model.init(jax.random.key(1), in_dim=3)
      >>> spike = perturb.Perturbation(backward={-1: perturb.spike(t0=20, size=50.0)})
      >>> result = perturb.run_sgd(model, params, x, y, num_steps=200, learning_rate=0.5,
      ...                          perturbation=spike, t0=20, horizon=150)
      >>> perturb.OUTCOMES[int(result.outcome)], int(result.recovery_time)
      ('recovered', 43)
    """
    check_range("num_steps", num_steps, lambda v: v >= 1 and float(v).is_integer(), "an int >= 1")
    check_count("lipschitz_every", lipschitz_every)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    check_range("tolerance", tolerance, lambda v: v >= 0, ">= 0")
    perturbation = Perturbation() if perturbation is None else perturbation
    lr_schedule = schedules.as_schedule(learning_rate)
    data_key, perturb_key = schedules.as_key(data_key), schedules.as_key(perturb_key)
    x, y = jnp.asarray(x), jnp.asarray(y)  # numpy data cannot be indexed by traced indices
    if eval_data is not None:
        eval_data = (jnp.asarray(eval_data[0]), jnp.asarray(eval_data[1]))
    n = model.num_operators

    def step_fn(carry, t):
        clean, pert, lipschitz = carry
        xb, yb = _minibatch(data_key, t, x, y, batch_size)
        ex, ey = (xb, yb) if eval_data is None else eval_data
        forward, backward = perturbation.sizes(t, n)
        injection = Injection(schedules.operator_keys(perturb_key, t, n), forward, backward)
        lr = lr_schedule(t)
        g_clean_run = model.gradient(clean, xb, yb)
        g_exact = model.gradient(pert, xb, yb)
        g_pert = model.gradient(pert, xb, yb, injection)
        if lipschitz_every:
            power_key = jax.random.fold_in(perturb_key, t)
            lipschitz = jax.lax.cond(
                t % lipschitz_every == 0,
                lambda: jacobian_norms(model, pert, xb, "power", power_key)[0],
                lambda: lipschitz,
            )
        grad_error = block_errors(g_pert, g_exact)
        record = SGDTrace(
            loss_clean=model.loss(clean, ex, ey),
            loss=model.loss(pert, ex, ey),
            grad_norm=otree.global_norm(g_pert),
            grad_error=grad_error,
            relative_grad_error=jnp.linalg.norm(grad_error)
            / jnp.maximum(otree.global_norm(g_exact), jnp.finfo(jnp.float32).tiny),
            lipschitz=lipschitz,
            param_norm=otree.global_norm(pert),
            forward_size=forward,
            backward_size=backward,
        )
        sgd = lambda w, g: jax.tree.map(lambda p, d: p - (lr * d).astype(p.dtype), w, g)  # noqa: E731
        return (sgd(clean, g_clean_run), sgd(pert, g_pert), lipschitz), record

    init = (params, params, jnp.zeros((n,), jnp.float32))
    (clean, pert, _), trace = jax.lax.scan(step_fn, init, jnp.arange(num_steps))
    outcome, recovery_time = classify_outcome(
        trace, t0, horizon, tolerance, divergence_factor, radius
    )
    return SGDResult(clean, pert, trace, outcome, recovery_time)
