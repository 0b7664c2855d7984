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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optstab import tree as otree
from optstab._checks import check_count, check_range, is_concrete_number
from optstab.perturb import schedules
from optstab.perturb.composite import (
    Composite,
    Injection,
    Points,
    block_errors,
    jacobian_norms,
)

RECOVERED, LINGERING, DIVERGED = 0, 1, 2
OUTCOMES = ("recovered", "lingering", "diverged")

ScheduleSpec = Mapping[int, "schedules.Schedule | float"] | Callable | float | None


class Perturbation(NamedTuple):
    """Which operators are perturbed, and how much at each step.

    ``forward`` and ``backward`` are each ``None`` (no perturbation), a schedule or number
    applied to every operator, or a mapping ``{operator index: schedule or number}``
    (0-based, ``-1`` for the last operator). The modes are the model's
    (:class:`Composite`'s ``forward_mode`` / ``backward_mode``).

    Only the points named here are built (:meth:`points`): a point that ``None``, a
    Python ``0`` or a missing mapping entry leaves idle adds no operation to the
    training step. A named point whose size is 0 at a step (a schedule, a traced
    number) is an exact identity at that step, behind a ``lax.cond``.
    """

    forward: ScheduleSpec = None
    backward: ScheduleSpec = None

    def sizes(self, step: jax.Array, num_operators: int) -> tuple[jax.Array, jax.Array]:
        """Forward and backward sizes at ``step``, each ``(num_operators,)`` float32."""
        n = num_operators
        return _sizes(self.forward, step, n), _sizes(self.backward, step, n)

    def points(self, num_operators: int) -> Points:
        """The points this perturbation names (static); the others are not built."""
        n = num_operators
        return Points(_named(self.forward, n), _named(self.backward, n))

    def injection(self, keys: jax.Array, step: jax.Array, num_operators: int) -> Injection:
        """The :class:`Injection` of ``step`` with ``(num_operators, 2)`` ``keys``: the
        sizes of :meth:`sizes`, and only the points of :meth:`points` built."""
        forward, backward = self.sizes(step, num_operators)
        return Injection(keys, forward, backward, self.points(num_operators))


def _is_python_zero(value) -> bool:
    return is_concrete_number(value) and value == 0


def _indices(spec: Mapping, n: int) -> dict[int, Any]:
    """``{operator: value}`` with indices in ``0..n-1``; rejects bad or repeated ones."""
    out = {}
    for index, value in spec.items():
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise ValueError(f"operator index {index!r} out of range for {n} operators")
        if index % n in out:
            raise ValueError(f"operator index {index} names operator {index % n} twice")
        out[index % n] = value
    return out


def _named(spec: ScheduleSpec, n: int) -> tuple[bool, ...]:
    if spec is None or _is_python_zero(spec):
        return (False,) * n
    if not isinstance(spec, Mapping):
        return (True,) * n
    named = _indices(spec, n)
    return tuple(i in named and not _is_python_zero(named[i]) for i in range(n))


def _sizes(spec: ScheduleSpec, step: jax.Array, n: int) -> jax.Array:
    if spec is None or _is_python_zero(spec):
        return jnp.zeros((n,), jnp.float32)
    if not isinstance(spec, Mapping):
        return jnp.broadcast_to(schedules.as_schedule(spec)(step), (n,)).astype(jnp.float32)
    sizes = jnp.zeros((n,), jnp.float32)
    for index, value in _indices(spec, n).items():
        if not _is_python_zero(value):
            sizes = sizes.at[index].set(schedules.as_schedule(value)(step))
    return sizes


class SGDTrace(NamedTuple):
    """Per-step records of :func:`run_sgd`; every field has a leading step axis ``T``.

    Row ``t`` describes step ``t`` (0-based): the losses and norms are those of the
    parameters *before* the step's update, the sizes those used by it. ``N`` is the
    number of operators.

    Attributes:
      loss_clean: ``(T,)`` float32 objective ``l + R`` of the clean run, on the step's
        minibatch (or on ``eval_data`` when given).
      loss: ``(T,)`` float32 objective of the perturbed run, on the same data.
      grad_norm: ``(T,)`` float32 global L2 norm of the perturbed gradient ``g_hat``.
      grad_error: ``(T, N)`` float32 ``||g_hat_j - g_j||`` per block ``j``, where ``g`` is
        the exact gradient at the *perturbed* iterate (the perturbation's own effect).
      relative_grad_error: ``(T,)`` float32 ``||g_hat - g|| / ||g||`` over all blocks
        (the denominator floored at the smallest normal float32).
      lipschitz: ``(T, N)`` float32 power-iteration estimates of each ``L_i`` at the
        perturbed iterate, refreshed every ``lipschitz_every`` steps and carried over
        in between; all 0 when ``lipschitz_every == 0``.
      param_norm: ``(T,)`` float32 global L2 norm of the perturbed parameters.
      forward_size: ``(T, N)`` float32 forward perturbation size of each operator
        (0 where the :class:`Perturbation` names no forward point).
      backward_size: ``(T, N)`` float32 backward perturbation size of each operator.
    """

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
    """What :func:`run_sgd` returns (under ``jax.vmap`` every field gains the batch axis).

    Attributes:
      params_clean: the clean run's final parameters, a tuple of ``N`` blocks shaped
        and typed like the initial ``params``.
      params: the perturbed run's final parameters, same structure.
      trace: the :class:`SGDTrace` of every step.
      outcome: ``()`` int32 label of the perturbed run: :data:`RECOVERED` (0),
        :data:`LINGERING` (1) or :data:`DIVERGED` (2); names in :data:`OUTCOMES`.
      recovery_time: ``()`` int32 steps after ``t0`` until the perturbed loss is back
        within ``tolerance`` of the clean one for good; -1 if it never is.
    """

    params_clean: tuple  # N blocks, like the initial params
    params: tuple  # N blocks, like the initial params
    trace: SGDTrace
    outcome: jax.Array  # () int32: RECOVERED, LINGERING or DIVERGED
    recovery_time: jax.Array  # () int32 steps after t0; -1 if never back in the band


def _minibatch(data_key, step, x, y, batch_size):
    if batch_size is None:
        return x, y
    idx = jax.random.randint(jax.random.fold_in(data_key, step), (batch_size,), 0, x.shape[0])
    return x[idx], y[idx]


def _concrete(value) -> np.ndarray | None:
    """``value`` as a numpy array, or ``None`` when it is traced (not known yet)."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_data(model: Composite, params: tuple, x, y, names=("x", "y")) -> None:
    """``x`` fits ``params``, ``y`` holds one label per example in the loss's range.

    Shapes are checked always; label values only when ``y`` is concrete (a traced
    ``y`` cannot be inspected without a host sync).
    """
    x_name, y_name = names
    if jnp.ndim(x) != 2:
        raise ValueError(f"{x_name} must be 2-D (examples, features), got shape {jnp.shape(x)}")
    if jnp.shape(y) != (x.shape[0],):
        raise ValueError(
            f"{y_name} must hold one label per example of {x_name}, shape ({x.shape[0]},); "
            f"got shape {jnp.shape(y)}"
        )
    width = x.shape[1]
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), width))
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise ValueError(
            f"params do not have the structure of model.init(key, {width}): "
            f"{jax.tree.structure(params)} vs {jax.tree.structure(expected)}"
        )
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), want in zip(leaves, jax.tree.leaves(expected), strict=True):
        want = want.shape
        if jnp.shape(leaf) != want:
            raise ValueError(
                f"{x_name} has {width} features per example, but params were built for "
                f"another input width: params{jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(leaf)}, model.init(key, {width}) gives {want}"
            )
    outputs = jax.eval_shape(model.apply, params, x).shape[-1]
    labels = _concrete(y)
    if model.loss_name == "logistic":
        if outputs != 1:
            raise ValueError(f"the logistic loss needs 1 output per example; model gives {outputs}")
        if labels is not None and not np.all((labels >= 0) & (labels <= 1)):
            raise ValueError(
                f"{y_name} must hold labels in [0, 1] for the logistic loss, got values in "
                f"[{labels.min()}, {labels.max()}]"
            )
        return
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(
            f"{y_name} must hold integer class labels for the softmax loss, got dtype "
            f"{jnp.result_type(y)}"
        )
    if labels is not None and labels.size and not (0 <= labels.min() and labels.max() < outputs):
        raise ValueError(
            f"{y_name} must hold class labels in [0, {outputs}) for the softmax loss over "
            f"{outputs} outputs, got values in [{labels.min()}, {labels.max()}]"
        )


def _check_outcome_options(t0, horizon, tolerance, divergence_factor, radius) -> None:
    check_count("t0", t0)
    if horizon is not None:
        check_count("horizon", horizon)
    check_range("tolerance", tolerance, lambda v: v >= 0, ">= 0")
    check_range("divergence_factor", divergence_factor, lambda v: v > 0, "> 0")
    check_range("radius", radius, lambda v: v > 0, "> 0")


def classify_outcome(
    trace: SGDTrace,
    t0: int | jax.Array = 0,
    horizon: int | jax.Array | None = None,
    tolerance: float = 0.05,
    divergence_factor: float = 10.0,
    radius: float = 1e6,
) -> tuple[jax.Array, jax.Array]:
    """``(outcome, recovery_time)`` of a trace; see the module docstring."""
    _check_outcome_options(t0, horizon, tolerance, divergence_factor, radius)
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
    if not callable(learning_rate):
        check_range("learning_rate", learning_rate, lambda v: v >= 0, ">= 0 (or a schedule)")
    _check_outcome_options(t0, horizon, tolerance, divergence_factor, radius)
    perturbation = Perturbation() if perturbation is None else perturbation
    if not isinstance(perturbation, Perturbation):
        raise ValueError(f"perturbation must be a Perturbation or None, got {perturbation!r}")
    n = model.num_operators
    points = perturbation.points(n)  # also checks the operator indices
    x, y = jnp.asarray(x), jnp.asarray(y)  # numpy data cannot be indexed by traced indices
    _check_data(model, params, x, y)
    if eval_data is not None:
        eval_data = (jnp.asarray(eval_data[0]), jnp.asarray(eval_data[1]))
        _check_data(model, params, *eval_data, names=("eval_data[0]", "eval_data[1]"))
    lr_schedule = schedules.as_schedule(learning_rate)
    data_key, perturb_key = schedules.as_key(data_key), schedules.as_key(perturb_key)

    def step_fn(carry, t):
        clean, pert, lipschitz = carry
        xb, yb = _minibatch(data_key, t, x, y, batch_size)
        ex, ey = (xb, yb) if eval_data is None else eval_data
        forward, backward = perturbation.sizes(t, n)
        keys = schedules.operator_keys(perturb_key, t, n)
        injection = Injection(keys, forward, backward, points)
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
