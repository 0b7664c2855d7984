"""GNMR: runtime stability control from per-unit gradient norm-to-mean ratios.

Method: "GNMR" (Gradient Norm-to-Mean Ratio), Kong, Jia, Zhang et al., 2026,
https://arxiv.org/abs/2606.00539.

What is published (the abstract): each recoverable unit's current gradient norm is
compared with its historical mean (GNMR) and with a short recent window (Delta-GNMR);
local risk signals are mapped to bounded recovery actions under a hard budget
(maxO) and a short lock interval, without changing the numerical format or kernels.

What is reconstructed here (the paper's full text and code are not available to us;
every formula and default below is ours):

* ``n_u = ||g_u||`` in float32 over all elements of unit ``u`` (complex elements by
  their modulus; clipping rescales them and keeps their phase).
* Long-run mean ``m_u``: bias-corrected EMA with decay ``decay`` (0.99), or the
  cumulative mean (``mean_mode="cumulative"``). It is fed only finite norms from
  steps where the unit is not in recovery, and after warm-up each norm is capped at
  ``threshold * m_u`` first, so a spike never raises its own bar: not when it is
  recovered, nor when the budget denies it (then the bar rises by at most a factor
  ``1 + (threshold - 1) * w`` per step, ``w`` the running mean's current weight,
  ``1 - decay`` once the bias correction has faded; this also lets a lasting change
  of scale be learnt gradually).
* ``GNMR_u = n_u / (m_u + eps)``.
* Short signal ``s_u``: bias-corrected EMA with decay ``short_decay`` (0.5), or the
  mean of the last ``short_window`` norms; ``Delta-GNMR_u = n_u / (s_u + eps)`` with
  ``s_u`` taken *before* this step, so it catches a fast climb that has not yet
  crossed the GNMR bar. Fed and frozen like ``m_u`` (the same capped norms).
* A unit is at risk when ``GNMR_u > threshold``, or ``Delta-GNMR_u > delta_threshold``
  while ``GNMR_u > 1`` (after ``warmup_steps`` updates), or when ``n_u`` is not finite
  (always). A unit without history has ratio 1. The ``GNMR_u > 1`` gate is ours: a
  minibatch norm that merely returns to the unit's normal level after a few small
  ones doubles against the short signal all the time, and without the gate such
  noise took about 7% of the updates of a small MLP on clean data (69 triggers in
  1000 steps; 23 with the gate; 4 with Delta-GNMR off).
* Ranking score ``max(GNMR_u / threshold, Delta-GNMR_u / delta_threshold)`` (the
  second term only under the gate above); non-finite units rank first.
* Budget: at most ``max_recover`` units are in recovery at once, units still locked
  included. New candidates are taken in score order (``lax.top_k`` over the fixed
  score vector); the others are counted as denied.
* Lock: a lock covers ``lock_steps + 1`` updates. A unit that enters recovery at
  update ``t`` stays in recovery for updates ``t .. t + lock_steps`` (a countdown in
  the state) and is published in the recovery mask for the ``lock_steps`` forward
  passes after ``t``; so ``lock_steps >= 1``, or a unit would enter recovery without
  ever being published.
* Release: a unit released (on its last locked update) while its risk has lasted
  ``max(lock_steps + 1, 11)`` consecutive updates or more has a new level, not a
  spike. Its statistics are re-baselined at the current norm (counted in
  ``rebaselines``); without this a skipped unit, whose gradient cannot change while
  it is frozen, would re-enter recovery at every release and never train again. The
  11 updates are the default lock's, so a short lock shortens the action but not
  what counts as a spike: a risk shorter than 11 updates never moves the baseline
  (with ``lock_steps=1`` a lasting shift is re-entered until it has lasted 11
  updates, then accepted).
* Actions while in recovery (any combination):

  - ``"precision"``: the unit is published by :func:`recovery_mask`, for the model
    to run it in high precision (for NNX models with
    :class:`optstab.lowprec.QuantLinear` layers, one call to
    :func:`optstab.lowprec.set_high_precision`); the gradient passes through.
  - ``"clip"``: rescale ``g_u`` to norm at most ``threshold * m_u``.
  - ``"skip"``: zero the unit's update. With :func:`gnmr_wrap` the inner
    optimizer's state for that unit is also left exactly as it was; chained before
    an optimizer, the optimizer still sees a zero gradient (its moments decay).
  - ``"reset"`` (:func:`gnmr_wrap` only): zero the inner optimizer's per-parameter
    statistics (Adam's moments) of a unit when it enters recovery, as SPAM resets
    momentum, and ramp that unit's step size back up over ``reset_warmup_steps``
    updates with SPAM's half-cosine (:mod:`optstab.stability.warmup`): Adam's bias
    correction counts global steps, so unramped steps after a reset are several
    times too large.

* Non-finite gradients never reach the parameters or the statistics: such a unit's
  update is zeroed under every action (and, in :func:`gnmr_wrap`, its inner state is
  frozen). A non-finite unit denied by the budget is still zeroed.

Known limitation of this reconstruction: a *persistent* jump of a unit's gradient
norm costs about ``max(lock_steps + 1, 11)`` updates of recovery before it is accepted
as the new level (a unit denied by the budget meanwhile learns it only through the
capped updates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optstab import tree as ot
from optstab._checks import check_count, check_range
from optstab._state import find_unique
from optstab.stability import _inner_state
from optstab.stability.warmup import reset_ramp

PyTree = Any
ArrayLike = jax.typing.ArrayLike

ACTIONS = ("precision", "clip", "skip", "reset")
MEAN_MODES = ("ema", "cumulative")
_COUNT_CAP = 2**30  # saturating counters stop here: "long ago" and "never" look alike
# A risk that lasts this many consecutive updates (or the whole lock, if longer) is a
# new level: lock_steps + 1 for the default lock of 10.
_LEVEL_UPDATES = 11

jax.tree_util.register_static(ot.UnitLayout)  # static pytree data: no array leaves


class _AnyParams:
    """``units`` of the *template* state that ``init`` gives for a pytree without leaves.

    ``optax.tree.map_params`` finds the params inside a state by calling ``init`` on a
    placeholder pytree without leaves and matching the result against the real state.
    A template's per-unit vectors are empty and its ``units`` is this plain leaf, so
    that its structure is a prefix of every real state's, whatever the units. A
    template cannot be updated and has no units to report.
    """

    def __repr__(self) -> str:
        return "<units of any params>"


_ANY_PARAMS = _AnyParams()


# ----------------------------------------------------------------------------- state


class GNMRControl(NamedTuple):
    """What the controller carries from one update to the next. ``U`` units."""

    count: jax.Array  # int32 scalar: updates seen
    mean: jax.Array  # (U,) float32: long-run mean m_u (bias-corrected EMA or cumulative)
    mean_count: jax.Array  # (U,) int32: norms folded into mean
    short: jax.Array  # (U,) float32 short EMA s_u, or (U, short_window) ring buffer
    short_count: jax.Array  # (U,) int32: norms folded into short
    lock: jax.Array  # (U,) int32: recovery countdown; > 0 means published in the mask
    risk_steps: jax.Array  # (U,) int32: consecutive updates at risk, up to the last one


class GNMRTelemetry(NamedTuple):
    """What the last update measured and did, and cumulative counters. Never read by
    the controller. ``U`` units."""

    norm: jax.Array  # (U,) float32: unit gradient norms of the last update
    gnmr: jax.Array  # (U,) float32: GNMR of the last update (inf when non-finite)
    delta_gnmr: jax.Array  # (U,) float32: Delta-GNMR of the last update
    recovering: jax.Array  # (U,) bool: units acted on in the last update
    triggers: jax.Array  # int32 scalar: units that entered recovery, cumulative
    denied: jax.Array  # int32 scalar: at-risk units refused by the budget, cumulative
    recovered_steps: jax.Array  # int32 scalar: unit-steps spent in recovery, cumulative
    nonfinite: jax.Array  # int32 scalar: non-finite unit gradients seen, cumulative
    rebaselines: jax.Array  # int32 scalar: units re-baselined at a new level, cumulative


class GNMRState(NamedTuple):
    """State of :func:`gnmr`. Field order (and the fields' own) is the checkpoint
    format."""

    control: GNMRControl
    telemetry: GNMRTelemetry
    units: ot.UnitLayout  # static: unit names (index i of every (U,) vector), leaf shapes


class GNMRWrapState(NamedTuple):
    """State of :func:`gnmr_wrap`: the controller and the wrapped optimizer's state."""

    gnmr: GNMRState
    inner: PyTree
    reset_age: jax.Array  # (U,) int32: updates since each unit's last reset (saturates)


# ----------------------------------------------------------------------------- options


class _Hyper(NamedTuple):
    """The numeric options as float32 / int32 arrays (they may be traced)."""

    threshold: jax.Array
    delta_threshold: jax.Array | None
    max_recover: jax.Array
    lock_steps: jax.Array
    warmup_steps: jax.Array
    decay: jax.Array
    short_decay: jax.Array
    eps: jax.Array


@dataclasses.dataclass(frozen=True)
class _Options:
    """The options :func:`gnmr` and :func:`gnmr_wrap` share, validated once.

    Numeric options are kept as given (Python numbers or arrays, possibly traced under
    ``optax.inject_hyperparams``); only concrete values are checked.
    """

    threshold: ArrayLike
    delta_threshold: ArrayLike | None
    max_recover: ArrayLike
    lock_steps: ArrayLike
    warmup_steps: ArrayLike
    actions: frozenset[str]
    units: ot.UnitsSpec
    decay: ArrayLike
    short_decay: ArrayLike
    mean_mode: str
    short_window: int | None
    eps: ArrayLike

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], *, allow_inner: bool) -> _Options:
        """Picks the shared options by name from a public constructor's arguments and
        validates them; raises ``ValueError`` naming a bad one."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "actions"]
        given = {name: arguments[name] for name in names}
        actions = _normalize_actions(arguments["action"], allow_inner)
        options = cls(actions=actions, **given)
        options._validate()
        return options

    def _validate(self) -> None:
        check_range("threshold", self.threshold, lambda x: x > 0, "> 0")
        if self.delta_threshold is not None:
            allowed = "> 0 (or None to disable Delta-GNMR)"
            check_range("delta_threshold", self.delta_threshold, lambda x: x > 0, allowed)
        check_count("max_recover", self.max_recover)
        check_range(
            "lock_steps",
            self.lock_steps,
            lambda x: x >= 1 and float(x).is_integer(),
            "an integer >= 1 (a unit is published in recovery_mask for lock_steps forward passes)",
        )
        check_count("warmup_steps", self.warmup_steps)
        check_range("decay", self.decay, lambda x: 0 < x < 1, "in (0, 1)")
        check_range("short_decay", self.short_decay, lambda x: 0 <= x < 1, "in [0, 1)")
        check_range("eps", self.eps, lambda x: x > 0, "> 0")
        if self.mean_mode not in MEAN_MODES:
            raise ValueError(f"mean_mode must be one of {MEAN_MODES}, got {self.mean_mode!r}")
        window = self.short_window
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"short_window must be None or an int >= 1, got {window!r}")

    def arrays(self) -> _Hyper:
        """The numeric options as arrays, for one update."""
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        i32 = lambda x: jnp.asarray(x).astype(jnp.int32)
        delta = self.delta_threshold
        return _Hyper(
            threshold=f32(self.threshold),
            delta_threshold=None if delta is None else f32(delta),
            max_recover=i32(self.max_recover),
            lock_steps=i32(self.lock_steps),
            warmup_steps=i32(self.warmup_steps),
            decay=f32(self.decay),
            short_decay=f32(self.short_decay),
            eps=f32(self.eps),
        )


def _normalize_actions(action: str | Sequence[str], allow_inner: bool) -> frozenset[str]:
    actions = (action,) if isinstance(action, str) else tuple(action)
    unknown = [a for a in actions if a not in ACTIONS]
    if unknown or not actions:
        raise ValueError(f"action must be a non-empty subset of {ACTIONS}, got {action!r}")
    if "reset" in actions and not allow_inner:
        raise ValueError(
            "action 'reset' changes the inner optimizer's state: use "
            "optstab.gnmr_wrap(inner, action=...) instead of optstab.gnmr"
        )
    return frozenset(actions)


def _check_inner(inner: Any) -> None:
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(
            "inner must be an optax.GradientTransformation (an object with init and update), "
            f"such as optax.adam(1e-3); got {inner!r}"
        )


# ----------------------------------------------------------------------------- init


def _init_state(params: PyTree, options: _Options) -> GNMRState:
    """The state for ``params``; a template (see :class:`_AnyParams`) without leaves."""
    if jax.tree.leaves(params):
        layout = ot.make_partition(params, options.units).layout
        num = len(layout.names)
    else:
        layout, num = _ANY_PARAMS, 0
    # Every field gets its own buffer, so that the state can be donated to a jitted step.
    per_unit = lambda dtype, fill=0: jnp.full((num,), fill, dtype)
    counter = lambda: jnp.zeros((), jnp.int32)
    window = options.short_window
    control = GNMRControl(
        count=counter(),
        mean=per_unit(jnp.float32),
        mean_count=per_unit(jnp.int32),
        short=jnp.zeros((num,) if window is None else (num, window), jnp.float32),
        short_count=per_unit(jnp.int32),
        lock=per_unit(jnp.int32),
        risk_steps=per_unit(jnp.int32),
    )
    telemetry = GNMRTelemetry(
        norm=per_unit(jnp.float32),
        gnmr=per_unit(jnp.float32, 1),
        delta_gnmr=per_unit(jnp.float32, 1),
        recovering=per_unit(bool),
        triggers=counter(),
        denied=counter(),
        recovered_steps=counter(),
        nonfinite=counter(),
        rebaselines=counter(),
    )
    return GNMRState(control, telemetry, layout)


def _check_layout(state: GNMRState, partition: ot.UnitPartition) -> None:
    """Raises at trace time unless the updates have the leaves and units of the state."""
    if state.units is _ANY_PARAMS:
        raise ValueError(
            "this GNMR state was initialised from a pytree without leaves (a template for "
            "optax.tree.map_params); initialise it from the params to train"
        )
    mismatch = state.units.mismatch(partition.layout)
    if mismatch is not None:
        raise ValueError(
            f"the updates do not match the GNMR state that init built from the params: {mismatch}"
        )


# ----------------------------------------------------------------------------- decide


class _Risk(NamedTuple):
    """How each unit's norm compares with its history; every field is (U,)."""

    gnmr: jax.Array  # float32: n_u / (m_u + eps); 1 without history, inf if non-finite
    delta_gnmr: jax.Array  # float32: n_u / (s_u + eps), likewise
    score: jax.Array  # float32: ranking score, > 1 means over a bar
    at_risk: jax.Array  # bool


class _Decision(NamedTuple):
    """What the controller decided for one update; every field is (U,)."""

    finite: jax.Array  # bool
    entered: jax.Array  # bool: entered recovery at this update
    denied: jax.Array  # bool: at risk, not locked, refused by the budget
    recovering: jax.Array  # bool: entered now or still locked
    lock: jax.Array  # int32: the countdown after this update
    risk_steps: jax.Array  # int32: consecutive updates at risk, this one included
    rebaseline: jax.Array  # bool: released at a new level; statistics restart at n_u
    clip_factor: jax.Array  # float32 in (0, 1]: rescaling that brings n_u to threshold*m_u


def _short_mean(control: GNMRControl) -> jax.Array:
    if control.short.ndim == 1:
        return control.short
    window = control.short.shape[1]
    filled = jnp.minimum(control.short_count, window).astype(jnp.float32)
    return jnp.sum(control.short, axis=1) / jnp.maximum(filled, 1.0)


def _ratio(norm: jax.Array, reference: jax.Array, has_history: jax.Array, eps) -> jax.Array:
    """norm / (reference + eps); 1 without history, inf for a non-finite norm."""
    ratio = jnp.where(has_history, norm / (reference + eps), 1.0)
    return jnp.where(jnp.isfinite(norm), ratio, jnp.inf)


def _assess(norm: jax.Array, control: GNMRControl, hyper: _Hyper) -> _Risk:
    """GNMR, Delta-GNMR, the ranking score and which units are at risk."""
    gnmr = _ratio(norm, control.mean, control.mean_count > 0, hyper.eps)
    delta = _ratio(norm, _short_mean(control), control.short_count > 0, hyper.eps)
    score = gnmr / hyper.threshold
    if hyper.delta_threshold is not None:
        # A rise that still leaves the norm below the unit's own mean is not a climb.
        climbing = gnmr > 1.0
        score = jnp.maximum(score, jnp.where(climbing, delta / hyper.delta_threshold, 0.0))
    past_warmup = control.count >= hyper.warmup_steps
    at_risk = ~jnp.isfinite(norm) | (past_warmup & (score > 1.0))
    return _Risk(gnmr, delta, score, at_risk)


def _select_within_budget(
    candidate: jax.Array, score: jax.Array, free_slots: jax.Array
) -> jax.Array:
    """The ``free_slots`` highest-scoring candidates, with fixed shapes."""
    num = score.shape[0]
    ranked_score = jnp.where(candidate, score, -jnp.inf)
    _, order = jax.lax.top_k(ranked_score, num)
    rank = jnp.zeros((num,), jnp.int32).at[order].set(jnp.arange(num, dtype=jnp.int32))
    return candidate & (rank < free_slots)


def _decide(norm: jax.Array, risk: _Risk, control: GNMRControl, hyper: _Hyper) -> _Decision:
    """Applies the budget and the lock, and decides the release and the clip."""
    finite = jnp.isfinite(norm)
    locked = control.lock > 0
    candidate = risk.at_risk & ~locked
    free_slots = jnp.maximum(hyper.max_recover - jnp.sum(locked, dtype=jnp.int32), 0)
    entered = _select_within_budget(candidate, risk.score, free_slots)
    recovering = locked | entered
    lock = jnp.where(entered, hyper.lock_steps, jnp.maximum(control.lock - 1, 0))
    # A risk that outlasts the lock and _LEVEL_UPDATES is a new level, not a spike:
    # re-baseline the unit when it is released so that it does not re-enter recovery
    # for ever.
    risk_steps = jnp.where(risk.at_risk, jnp.minimum(control.risk_steps + 1, _COUNT_CAP), 0)
    level_steps = jnp.maximum(hyper.lock_steps + 1, _LEVEL_UPDATES)
    released = recovering & (lock == 0)
    rebaseline = released & risk.at_risk & finite & (risk_steps >= level_steps)
    bar = hyper.threshold * control.mean
    over = (control.mean_count > 0) & (norm > bar)
    clip_factor = jnp.where(over, bar / jnp.maximum(norm, 1e-30), 1.0)
    clip_factor = jnp.where(finite, clip_factor, 1.0)
    return _Decision(
        finite=finite,
        entered=entered,
        denied=candidate & ~entered,
        recovering=recovering,
        lock=lock,
        risk_steps=risk_steps,
        rebaseline=rebaseline,
        clip_factor=clip_factor,
    )


# ----------------------------------------------------------------------------- act


def _act_on_gradient(
    partition: ot.UnitPartition, updates: PyTree, decision: _Decision, actions: frozenset[str]
) -> tuple[PyTree, jax.Array]:
    """Clips and zeroes unit gradients; returns them and the mask of zeroed units."""
    if "clip" in actions:
        factor = jnp.where(decision.recovering, decision.clip_factor, 1.0)
        updates = ot.scale_units(partition, updates, factor)
    dropped = ~decision.finite
    if "skip" in actions:
        dropped = dropped | decision.recovering
    return ot.zero_units(partition, updates, dropped), dropped


# ----------------------------------------------------------------------------- advance


def _running_mean(
    mean: jax.Array, value: jax.Array, weight: jax.Array, observe: jax.Array
) -> jax.Array:
    return jnp.where(observe, mean + weight * (value - mean), mean)


def _fold_in(
    control: GNMRControl, norm: jax.Array, observe: jax.Array, hyper: _Hyper, mean_mode: str
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Folds ``norm`` into the long and short statistics of the units in ``observe``.

    A bias-corrected EMA is a running mean whose k-th weight is
    ``(1 - decay) / (1 - decay**k)``; the cumulative mean uses ``1 / k``.
    """
    safe = jnp.where(observe, norm, 0.0)
    k = (control.mean_count + 1).astype(jnp.float32)
    if mean_mode == "cumulative":
        weight = 1.0 / k
    else:
        weight = (1.0 - hyper.decay) / (1.0 - hyper.decay**k)
    mean = _running_mean(control.mean, safe, weight, observe)
    mean_count = control.mean_count + observe.astype(jnp.int32)

    if control.short.ndim == 1:
        k = (control.short_count + 1).astype(jnp.float32)
        weight = (1.0 - hyper.short_decay) / (1.0 - hyper.short_decay**k)
        short = _running_mean(control.short, safe, weight, observe)
    else:
        window = control.short.shape[1]
        slot = jax.nn.one_hot(control.short_count % window, window, dtype=bool)
        short = jnp.where(slot & observe[:, None], safe[:, None], control.short)
    short_count = control.short_count + observe.astype(jnp.int32)
    return mean, mean_count, short, short_count


def _advance(
    control: GNMRControl, norm: jax.Array, decision: _Decision, hyper: _Hyper, mean_mode: str
) -> GNMRControl:
    """The control state after this update: statistics fed, lock counted down."""
    observe = decision.finite & ~decision.recovering
    # After warm-up a unit's statistics see at most threshold * m_u, so an at-risk norm
    # that the budget denied raises the baseline by a bounded factor, not by the spike.
    past_warmup = control.count >= hyper.warmup_steps
    bar = hyper.threshold * control.mean
    capped = jnp.where(past_warmup & (control.mean_count > 0), jnp.minimum(norm, bar), norm)
    mean, mean_count, short, short_count = _fold_in(control, capped, observe, hyper, mean_mode)
    # A re-baselined unit's history is its current norm alone (a full short window).
    restart = decision.rebaseline
    per_row = (-1,) + (1,) * (short.ndim - 1)
    window = 1 if short.ndim == 1 else short.shape[1]
    return GNMRControl(
        count=optax.safe_increment(control.count),
        mean=jnp.where(restart, norm, mean),
        mean_count=mean_count,
        short=jnp.where(restart.reshape(per_row), norm.reshape(per_row), short),
        short_count=jnp.where(restart, jnp.maximum(short_count, window), short_count),
        lock=decision.lock,
        risk_steps=decision.risk_steps,
    )


def _record(
    telemetry: GNMRTelemetry, norm: jax.Array, risk: _Risk, decision: _Decision
) -> GNMRTelemetry:
    """The telemetry after this update."""
    count_of = lambda mask: jnp.sum(mask, dtype=jnp.int32)
    return GNMRTelemetry(
        norm=norm,
        gnmr=risk.gnmr,
        delta_gnmr=risk.delta_gnmr,
        recovering=decision.recovering,
        triggers=telemetry.triggers + count_of(decision.entered),
        denied=telemetry.denied + count_of(decision.denied),
        recovered_steps=telemetry.recovered_steps + count_of(decision.recovering),
        nonfinite=telemetry.nonfinite + count_of(~decision.finite),
        rebaselines=telemetry.rebaselines + count_of(decision.rebaseline),
    )


def _control_step(
    options: _Options, updates: PyTree, state: GNMRState
) -> tuple[ot.UnitPartition, _Decision, GNMRState]:
    """Measures the units of ``updates``, decides, and advances the state."""
    partition = ot.make_partition(updates, options.units)
    _check_layout(state, partition)
    hyper = options.arrays()
    norm = ot.unit_norms(partition, updates)
    risk = _assess(norm, state.control, hyper)
    decision = _decide(norm, risk, state.control, hyper)
    control = _advance(state.control, norm, decision, hyper, options.mean_mode)
    telemetry = _record(state.telemetry, norm, risk, decision)
    return partition, decision, GNMRState(control, telemetry, state.units)


# ----------------------------------------------------------------------------- transforms


def _chained(options: _Options) -> optax.GradientTransformationExtraArgs:
    """The controller as a transformation of the gradient (:func:`gnmr`)."""

    def init_fn(params: PyTree) -> GNMRState:
        return _init_state(params, options)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        partition, decision, state = _control_step(options, updates, state)
        updates, _ = _act_on_gradient(partition, updates, decision, options.actions)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _wrapped(
    options: _Options, inner: optax.GradientTransformation, reset_warmup_steps: ArrayLike
) -> optax.GradientTransformationExtraArgs:
    """The controller around ``inner``, acting on its state too (:func:`gnmr_wrap`)."""
    inner = optax.with_extra_args_support(inner)
    resets = "reset" in options.actions

    def init_fn(params: PyTree) -> GNMRWrapState:
        controller = _init_state(params, options)
        never_reset = jnp.full(controller.control.lock.shape, _COUNT_CAP, jnp.int32)
        return GNMRWrapState(gnmr=controller, inner=inner.init(params), reset_age=never_reset)

    def update_fn(updates, state, params=None, **extra_args):
        partition, decision, control = _control_step(options, updates, state.gnmr)
        grads, frozen = _act_on_gradient(partition, updates, decision, options.actions)
        per_parameter = _inner_state.per_parameter_map(inner, partition)
        inner_state, reset_age = state.inner, state.reset_age
        if resets:
            zero = lambda s: _inner_state.zero_leaves(partition, decision.entered, s)
            inner_state = per_parameter(zero, inner_state)
            reset_age = jnp.where(decision.entered, 0, jnp.minimum(reset_age + 1, _COUNT_CAP))
        new_updates, new_inner = inner.update(grads, inner_state, params, **extra_args)
        # The frozen units' per-parameter statistics stay as they were.
        keep = lambda new, old: _inner_state.select_leaves(partition, frozen, old, new)
        new_inner = per_parameter(keep, new_inner, inner_state)
        if resets:
            ramp = reset_ramp(reset_age, reset_warmup_steps)
            new_updates = ot.scale_units(partition, new_updates, ramp)
        new_updates = ot.zero_units(partition, new_updates, frozen)
        return new_updates, GNMRWrapState(gnmr=control, inner=new_inner, reset_age=reset_age)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- public API


def gnmr(
    threshold: ArrayLike = 3.0,
    delta_threshold: ArrayLike | None = 2.0,
    max_recover: ArrayLike = 1,
    lock_steps: ArrayLike = 10,
    warmup_steps: ArrayLike = 20,
    action: str | Sequence[str] = ("precision", "clip"),
    units: ot.UnitsSpec = None,
    *,
    decay: ArrayLike = 0.99,
    short_decay: ArrayLike = 0.5,
    mean_mode: str = "ema",
    short_window: int | None = None,
    eps: ArrayLike = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """GNMR stability control, to chain before an optimizer.

    For each unit ``u`` with gradient ``g_u``: ``GNMR_u = ||g_u|| / (m_u + eps)``
    against the long-run mean ``m_u``, ``Delta-GNMR_u = ||g_u|| / (s_u + eps)`` against
    the short-window mean ``s_u``. Units over a threshold enter recovery, at most
    ``max_recover`` at a time. A lock covers ``lock_steps + 1`` updates: the one that
    triggered and ``lock_steps`` more, which are also the forward passes for which the
    unit is published in :func:`recovery_mask`. See the module docstring for the full
    rules and what is reconstructed.

    Args:
      threshold: GNMR bar ``tau`` (> 0); also the clip bar ``tau * m_u``.
      delta_threshold: Delta-GNMR bar (> 0), or ``None`` to use GNMR alone.
      max_recover: budget maxO, the most units in recovery at once (int >= 0).
      lock_steps: forward passes a unit stays published in :func:`recovery_mask`
        after it enters recovery (int >= 1); the lock covers ``lock_steps + 1``
        updates, the one that triggered and ``lock_steps`` more.
      warmup_steps: updates before any trigger except non-finite ones (int >= 0).
      action: ``"precision"``, ``"clip"``, ``"skip"``, or a tuple of them.
      units: ``None`` (one unit per leaf, named by key path) or a callable
        ``params -> labels`` (see :mod:`optstab.units`).
      decay: EMA decay of the long-run mean, in (0, 1).
      short_decay: EMA decay of the short signal, in [0, 1) (0: the last norm).
      mean_mode: ``"ema"`` or ``"cumulative"`` long-run mean.
      short_window: if set, the short signal is the mean of the last
        ``short_window`` norms instead of an EMA (static int).
      eps: added to the denominators.

    Numeric arguments may be arrays, so ``optax.inject_hyperparams`` works; pass
    ``static_args=("action", "units", "mean_mode", "short_window")`` to it when
    ``units`` is a callable (it would otherwise be taken for a schedule).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`GNMRState`.

    Raises:
      ValueError: for a bad configuration, naming the argument.

    Example:
      >>> import jax.numpy as jnp, optax, optstab
      >>> params = {"a": jnp.ones(3), "b": jnp.ones(2)}
      >>> tx = optax.chain(optstab.gnmr(warmup_steps=2), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> grads = {"a": jnp.ones(3), "b": jnp.ones(2)}
      >>> for _ in range(3):
      ...     _, state = tx.update(grads, state, params)
      >>> spike = {"a": 100.0 * jnp.ones(3), "b": jnp.ones(2)}
      >>> updates, state = tx.update(spike, state, params)
      >>> {k: bool(v) for k, v in optstab.recovery_mask(state).items()}
      {'a': True, 'b': False}
      >>> float(jnp.linalg.norm(updates["a"]) / 0.1)  # clipped to 3 x mean norm
      5.196...

    References:
      Kong, Jia, Zhang et al., GNMR, 2026, https://arxiv.org/abs/2606.00539
    """
    return _chained(_Options.from_arguments(locals(), allow_inner=False))


def gnmr_wrap(
    inner: optax.GradientTransformation,
    threshold: ArrayLike = 3.0,
    delta_threshold: ArrayLike | None = 2.0,
    max_recover: ArrayLike = 1,
    lock_steps: ArrayLike = 10,
    warmup_steps: ArrayLike = 20,
    action: str | Sequence[str] = ("skip",),
    units: ot.UnitsSpec = None,
    *,
    decay: ArrayLike = 0.99,
    short_decay: ArrayLike = 0.5,
    mean_mode: str = "ema",
    short_window: int | None = None,
    eps: ArrayLike = 1e-12,
    reset_warmup_steps: ArrayLike = 150,
) -> optax.GradientTransformationExtraArgs:
    """GNMR wrapped around an optimizer, so that actions can reach its state.

    Same controller as :func:`gnmr`. In addition:

    * ``"skip"``: a recovering unit gets a zero update and the inner optimizer's
      per-parameter state for it stays exactly as it was. The per-parameter state is
      what ``optax.tree.map_params`` maps (Adam's ``mu`` and ``nu``); what is shared
      by all units (Adam's step count, a noise key, injected hyperparameters) still
      advances, whatever the shape of the params.
    * ``"reset"``: those per-parameter statistics are zeroed for a unit at the update
      where it enters recovery, and its updates are then scaled by SPAM's half-cosine
      ramp from 0.01 to 1 over ``reset_warmup_steps`` updates.
    * A unit with a non-finite gradient is always skipped this way.

    Args:
      inner: the optimizer to wrap (any ``optax.GradientTransformation``).
      threshold, delta_threshold, max_recover, lock_steps, warmup_steps, action,
        units, decay, short_decay, mean_mode, short_window, eps: as in :func:`gnmr`;
        ``action`` may also contain ``"reset"``.
      reset_warmup_steps: length of the step-size ramp after a reset (int >= 0; the
        default, 150, is SPAM's).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`GNMRWrapState`; extra args are passed on to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax, optstab
      >>> params = {"a": jnp.ones(3), "b": jnp.ones(2)}
      >>> tx = optstab.gnmr_wrap(optax.adam(0.1), warmup_steps=2)
      >>> state = tx.init(params)
      >>> grads = {"a": jnp.ones(3), "b": jnp.ones(2)}
      >>> for _ in range(3):
      ...     _, state = tx.update(grads, state, params)
      >>> spike = {"a": jnp.full(3, jnp.nan), "b": jnp.ones(2)}
      >>> updates, state = tx.update(spike, state, params)
      >>> bool(jnp.all(updates["a"] == 0)), bool(jnp.all(jnp.isfinite(state.inner[0].mu["a"])))
      (True, True)

    References:
      Kong, Jia, Zhang et al., GNMR, 2026, https://arxiv.org/abs/2606.00539
    """
    options = _Options.from_arguments(locals(), allow_inner=True)
    check_count("reset_warmup_steps", reset_warmup_steps)
    _check_inner(inner)
    return _wrapped(options, inner, reset_warmup_steps)


# ----------------------------------------------------------------------------- telemetry


def find_gnmr_state(opt_state: PyTree) -> GNMRState:
    """The :class:`GNMRState` inside a (possibly nested) optimizer state.

    Looks through ``optax.chain``, :func:`gnmr_wrap`, ``optax.inject_hyperparams``,
    ``optax.MultiSteps`` and any other pytree nesting.

    Raises:
      ValueError: when there is no GNMR state or more than one.
    """
    return _unwrap_variables(find_unique(opt_state, GNMRState, "GNMR"))


def _unwrap_variables(state: GNMRState) -> GNMRState:
    """Takes the arrays out of wrappers such as ``flax.nnx.Optimizer``'s ``OptArray``."""
    if state.units is _ANY_PARAMS:
        raise ValueError(
            "this GNMR state was initialised from a pytree without leaves (a template for "
            "optax.tree.map_params): it has no units"
        )
    is_wrapper = lambda x: hasattr(x, "get_value")
    unwrap = lambda x: x.get_value() if is_wrapper(x) else x
    return jax.tree.map(unwrap, state, is_leaf=is_wrapper)


def _per_unit(state: GNMRState, values: jax.Array) -> dict[str, jax.Array]:
    return {name: values[..., i] for i, name in enumerate(state.units.names)}


def recovery_mask(opt_state: PyTree) -> dict[str, jax.Array]:
    """``{unit_name: bool}``: the units to run in high precision on the next forward.

    A unit is in the mask for the ``lock_steps`` forward passes after it entered
    recovery (its lock covers ``lock_steps + 1`` updates: the one that triggered and
    the ``lock_steps`` whose gradients these forward passes compute). Works on
    vmapped states (the booleans then have the batch shape).
    :func:`optstab.lowprec.set_high_precision` applies it to a model's quantized layers.

    Example:
      >>> import jax.numpy as jnp, optstab
      >>> tx = optstab.gnmr(warmup_steps=2, lock_steps=2, action="precision")
      >>> ones = {"a": jnp.ones(3), "b": jnp.ones(2)}
      >>> state = tx.init(ones)
      >>> for _ in range(3):
      ...     _, state = tx.update(ones, state)
      >>> _, state = tx.update({"a": 50.0 * jnp.ones(3), "b": jnp.ones(2)}, state)
      >>> {k: bool(v) for k, v in optstab.recovery_mask(state).items()}
      {'a': True, 'b': False}
      >>> published = []  # for the lock_steps = 2 forward passes after the spike
      >>> for _ in range(3):
      ...     published.append(bool(optstab.recovery_mask(state)["a"]))
      ...     _, state = tx.update(ones, state)
      >>> published
      [True, True, False]
    """
    state = find_gnmr_state(opt_state)
    return _per_unit(state, state.control.lock > 0)


def gnmr_metrics(opt_state: PyTree) -> dict[str, Any]:
    """Telemetry of the GNMR state inside ``opt_state``.

    Returns:
      A dict with per-unit dicts ``gnmr``, ``delta_gnmr``, ``norm``, ``mean``,
      ``recovering`` (units acted on in the last update) and ``lock``, and the
      scalars ``num_recovering`` and the cumulative counters ``triggers``,
      ``denied``, ``recovered_steps``, ``nonfinite`` and ``rebaselines``. On
      vmapped states every value has the batch shape.

    Example:
      >>> import jax.numpy as jnp, optstab
      >>> tx = optstab.gnmr(warmup_steps=2)
      >>> ones = {"a": jnp.ones(3), "b": jnp.ones(2)}
      >>> state = tx.init(ones)
      >>> for _ in range(3):
      ...     _, state = tx.update(ones, state)
      >>> _, state = tx.update({"a": 50.0 * jnp.ones(3), "b": jnp.ones(2)}, state)
      >>> metrics = optstab.gnmr_metrics(state)
      >>> float(metrics["gnmr"]["a"]), float(metrics["gnmr"]["b"])  # norm / mean norm
      (50.0, 1.0)
      >>> bool(metrics["recovering"]["a"]), int(metrics["triggers"]), int(metrics["denied"])
      (True, 1, 0)
    """
    state = find_gnmr_state(opt_state)
    control, telemetry = state.control, state.telemetry
    return {
        "gnmr": _per_unit(state, telemetry.gnmr),
        "delta_gnmr": _per_unit(state, telemetry.delta_gnmr),
        "norm": _per_unit(state, telemetry.norm),
        "mean": _per_unit(state, control.mean),
        "recovering": _per_unit(state, telemetry.recovering),
        "lock": _per_unit(state, control.lock),
        "num_recovering": jnp.sum(telemetry.recovering, axis=-1, dtype=jnp.int32),
        "triggers": telemetry.triggers,
        "denied": telemetry.denied,
        "recovered_steps": telemetry.recovered_steps,
        "nonfinite": telemetry.nonfinite,
        "rebaselines": telemetry.rebaselines,
    }
