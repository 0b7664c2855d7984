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
  while ``GNMR_u > delta_gate`` (after ``warmup_steps`` updates), or when ``n_u`` is
  not finite (always). A unit without history has ratio 1. The gate is ours: a
  minibatch norm that merely returns to the unit's normal level after a few small
  ones doubles against the short signal all the time, and without the gate such
  noise took about 7% of the updates of a small MLP on clean data (69 triggers in
  1000 steps; 23 with a gate at 1; 4 with Delta-GNMR off).
* Ranking score ``max(GNMR_u / threshold, Delta-GNMR_u / delta_threshold)`` (the
  second term only under the gate above); non-finite units rank first (score inf).
  A unit is at risk exactly when its score exceeds 1 (or it is not finite).
* Default bars (ours; the paper's are not available to us): ``threshold=4.5``,
  ``delta_threshold=3``, ``delta_gate=3.5``, calibrated on clean training only (the
  ``gnmr_calibration`` study of the repository's benchmarks, never on a stress
  result). Its rule: on clean runs of a digits MLP and of a byte-level LM (float32
  and int8), several seeds, GNMR watching without acting, keep the bars whose
  at-risk rate is at most 0.5 per 1000 unit-updates on every problem, and of those
  take the bars that make the smallest spike visible. On held-out clean seeds the
  old bars (3, 2, 1; lock 10) raised 4.3 false triggers per 1000 unit-updates on
  the MLP and 1.4-1.5 on the LM, the calibrated bars 0.085-0.13. The price: a jump
  must now reach 4.5x the unit's mean (or 3.5x with a 3x climb over its recent
  level, Delta-GNMR) to be seen, against 3x (or 2x above the mean) before.
  ``max_recover=1`` and ``warmup_steps=20`` are not calibrated: at these bars the
  clean runs leave the single slot to noise a few percent of the time at most
  (rate x units x lock), and a severe event preempts a unit locked on noise.
* Default lock (ours; ``lock_steps=None``): 10 updates when the actions include
  ``"precision"``, else 1. The minimum lock covers what outlasts the event's own
  updates: a model's low-precision numbers keep the event in their memory (a delayed
  scale's amax history) after the gradient has calmed, so the precision action keeps
  the layer in high precision for 10 more forward passes. ``"clip"`` and ``"skip"``
  act on the update itself: past the event, clipping at ``threshold * m_u`` is a
  no-op and skipping throws away good updates, while the lock holds the budget, so
  their lock is the minimum, 1; an event that stays over the GNMR bar is held anyway
  (see holding, below, up to ``4 * lock_steps``).
* Budget: at most ``max_recover`` units are in recovery at once, units still locked
  included. New candidates are taken in score order (``lax.top_k`` over the fixed
  score vector; ties by unit order); the others are counted as denied.
* Lock: a unit that enters recovery at update ``t`` stays in recovery for at least
  updates ``t .. t + lock_steps`` (a countdown in the state) and is published in the
  recovery mask for the forward passes after them; so ``lock_steps >= 1``, or a unit
  would enter recovery without ever being published.
* Release: a unit released (on its last locked update) while its risk has lasted
  ``max(lock_steps + 1, 11)`` consecutive updates or more has a new level, not a
  spike. Its statistics are re-baselined at the current norm (counted in
  ``rebaselines``); without this a skipped unit, whose gradient cannot change while
  it is frozen, would re-enter recovery at every release and never train again. The
  11 updates are the precision action's default lock's, so a short lock shortens the
  action but not what counts as a spike: a risk shorter than 11 updates never moves
  the baseline.
* Actions while in recovery (any combination):

  - ``"precision"``: the unit is published by :func:`recovery_mask`, for the model
    to run it in high precision (for NNX models with
    :class:`optstab.lowprec.QuantLinear` layers, one call to
    :func:`optstab.lowprec.set_high_precision`); the gradient passes through.
  - ``"clip"``: rescale ``g_u`` to norm at most ``threshold * m_u`` (``m_u`` of the
    gradient norm, whatever the signals).
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
  frozen); a non-finite unit denied by the budget is still zeroed. With ``"precision"``
  as the only action of :func:`gnmr` (which leaves the gradient as it is), only the
  non-finite *elements* are zeroed, as ``optax.zero_nans`` does, so that each
  leaf's update depends on that leaf alone and can start as soon as its gradient
  exists (the controller still counts the unit as non-finite and ranks it first).

Extensions (ours, not the paper's; each can be switched off or set to the behaviour
above with one argument):

* Preemption (``preempt_factor``, default 10; ``None`` disables it): when the budget
  is full, a candidate whose score exceeds ``preempt_factor`` times a locked unit's
  *peak score* (the highest score it had since it entered recovery) takes that
  unit's slot in the same update. The preempted unit is released cleanly (out of the
  mask, its statistics fed again from this update, counted in ``preempted``). The
  strongest remaining candidates are matched with the weakest locked units: the
  ``j``-th candidate after the free slots preempts the locked unit with the
  ``j``-th lowest peak if its score exceeds ``preempt_factor`` times that peak. So
  the budget is never exceeded, the highest candidates win, and a severe event
  (GNMR in the hundreds) never waits behind a unit locked on noise (score near 1).
* Holding a unit while its risk lasts (``max_lock_steps``, default
  ``4 * lock_steps``; ``max_lock_steps=lock_steps`` gives the fixed lock): after the
  minimum lock, a unit still *raised* at the end of its countdown stays in recovery
  one more update at a time, up to ``max_lock_steps`` published forward passes
  after it entered; it is released at the first update where it is no longer
  raised. Raised means over the long-run bar: some signal's ``GNMR_u > threshold``
  (or under the collapse bar, or not finite). Delta-GNMR is left out: it marks an
  onset, and its short signal is frozen with the rest of the unit's statistics
  during the lock, which would make it a second, lower GNMR bar (a layer whose
  gradient stayed at 2.4x its mean after an unclipped spike was held on it).
  Statistics stay frozen meanwhile, so "raised" is measured against the unit's
  level before the event. For the precision action this keeps a layer in high
  precision for a burst that outlasts the lock instead of releasing it mid-event.
  The multiple 4 needs no knowledge of any stress: an event four times longer than
  the lock is more likely a new level than an event, and a unit still at risk at its
  cap is re-baselined as above (at once when ``max_lock_steps >= 10``), so a lasting
  shift still costs a bounded number of updates and never loops under ``"skip"``.
* External signals (``signal``): ``"gradient"`` (default) watches the gradient
  norms; ``"external"`` watches a non-negative scalar per unit passed to ``update``
  as ``unit_signal={unit_name: value}`` (for instance each quantized layer's input
  amax from :func:`optstab.lowprec.amax_signal`, a forward-pass signal that sees
  what the gradient cannot); ``("gradient", "external")`` watches both. Each signal
  has its own mean, short signal, GNMR and Delta-GNMR (the same rules, capping and
  re-baselining); a unit's score is the highest of its signals' scores, and one
  budget and one lock serve both. A negative or non-finite external value is
  treated like a non-finite gradient norm: at risk, ranked first, never folded into
  the statistics (the gradient itself is only zeroed when it is not finite).
  ``"clip"`` bounds the gradient by ``threshold`` times the gradient's mean norm,
  so it needs ``"gradient"`` among the signals.
* Collapse rule (``collapse_threshold``, default ``None``: off): when set (``c > 1``),
  a unit whose value falls far below its mean is also at risk, with the symmetric
  score ``m_u / (n_u + eps) / c`` (above 1 when ``n_u`` is below about ``m_u / c``);
  after warm-up, values folded into the statistics are also floored at ``m_u / c``,
  so a collapse never lowers its own bar.
* Units that are not watched: a leaf labelled ``None`` by ``units`` belongs to no
  unit. It is not measured, never recovered, and passed through unchanged by every
  action (in :func:`gnmr_wrap` its inner state advances normally); GNMR's
  non-finite guard does not cover it. With every leaf labelled ``None`` there are
  no units and GNMR passes everything through.

Cost per update, for ``P`` parameter elements in ``L`` leaves, ``U`` units and ``S``
signals: ``O(P)`` for the unit norms (one read of the gradient), plus one
element-wise pass when an action rescales or zeroes units; ``O(U log K)`` for the
budget, ``K = max_recover`` when it is a Python number (``lax.top_k`` looks for the
``K`` strongest candidates, and the ``K`` weakest locked units for preemption), but
a full sort, ``O(U log U)``, when ``max_recover`` is traced (under
``optax.inject_hyperparams`` unless it is in ``static_args``); ``O(S * U)`` for the
statistics; state memory ``O(S * U)`` (``O(S * U * w)`` with a ``short_window`` of
``w``). The per-unit sums are scattered leaf by leaf, so tracing and compiling grow
with ``L``. Measured on 2 CPU cores, one AdamW step with one unit per row of a
matrix: 1e4 rows of 1024 elements cost 1.2x AdamW's time, 1e5 rows of 128
elements 1.6x (3.3x with a traced budget; the overhead study's sweep, 1e5 rows of 64
elements, gives 1.47x and 5.4x); with one unit per leaf, the controller
adds a fixed few tens of microseconds to the ``O(P)`` read.

Known limitation of this reconstruction: a *persistent* jump of a unit's gradient
norm costs about ``max(max_lock_steps + 1, 11)`` updates of recovery before it is
accepted as the new level (a unit denied by the budget meanwhile learns it only
through the capped updates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optstab import tree as ot
from optstab._checks import check_count, check_range, is_concrete_number
from optstab._state import find_unique
from optstab.stability import _inner_state
from optstab.stability.warmup import reset_ramp

PyTree = Any
ArrayLike = jax.typing.ArrayLike

ACTIONS = ("precision", "clip", "skip", "reset")
MEAN_MODES = ("ema", "cumulative")
SIGNALS = ("gradient", "external")  # also the order of the rows of per-signal arrays
_COUNT_CAP = 2**30  # saturating counters stop here: "long ago" and "never" look alike
# A risk that lasts this many consecutive updates (or the whole lock, if longer) is a
# new level: lock_steps + 1 for the precision action's default lock of 10.
_LEVEL_UPDATES = 11
# The default minimum lock with the precision action (lock_steps=None); other actions: 1.
_PRECISION_LOCK = 10
# The default cap of a held lock, in minimum locks: max_lock_steps = 4 * lock_steps.
_HOLD_LOCKS = 4

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


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SignalNames:
    """The signals a GNMR state watches (static): row ``s`` of every per-signal array
    is ``names[s]``, in the order of :data:`SIGNALS`."""

    names: tuple[str, ...]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# ----------------------------------------------------------------------------- state


class GNMRControl(NamedTuple):
    """What the controller carries from one update to the next. ``S`` signals, ``U``
    units."""

    count: jax.Array  # int32 scalar: updates seen
    mean: jax.Array  # (S, U) float32: long-run mean m_u (bias-corrected EMA or cumulative)
    mean_count: jax.Array  # (S, U) int32: values folded into mean
    short: jax.Array  # (S, U) float32 short EMA s_u, or (S, U, short_window) ring buffer
    short_count: jax.Array  # (S, U) int32: values folded into short
    lock: jax.Array  # (U,) int32: recovery countdown; > 0 means published in the mask
    lock_age: jax.Array  # (U,) int32: updates since the unit entered recovery; 0 when free
    lock_score: jax.Array  # (U,) float32: peak score since it entered recovery; 0 when free
    risk_steps: jax.Array  # (U,) int32: consecutive updates at risk, up to the last one


class GNMRTelemetry(NamedTuple):
    """What the last update measured and did, and cumulative counters. Never read by
    the controller. ``S`` signals, ``U`` units."""

    norm: jax.Array  # (U,) float32: unit gradient norms of the last update
    value: jax.Array  # (S, U) float32: each signal's value (gradient row: the norm)
    gnmr: jax.Array  # (S, U) float32: GNMR of the last update (inf when not valid)
    delta_gnmr: jax.Array  # (S, U) float32: Delta-GNMR of the last update
    score: jax.Array  # (U,) float32: ranking score (> 1: over a bar; inf: not finite)
    recovering: jax.Array  # (U,) bool: units acted on in the last update
    triggers: jax.Array  # int32 scalar: units that entered recovery, cumulative
    denied: jax.Array  # int32 scalar: at-risk units refused by the budget, cumulative
    preempted: jax.Array  # int32 scalar: locked units that gave their slot, cumulative
    recovered_steps: jax.Array  # int32 scalar: unit-steps spent in recovery, cumulative
    nonfinite: jax.Array  # int32 scalar: units with a non-finite gradient or an invalid
    #   external value, cumulative
    rebaselines: jax.Array  # int32 scalar: units re-baselined at a new level, cumulative


class GNMRState(NamedTuple):
    """State of :func:`gnmr`. Field order (and the fields' own) is the checkpoint
    format."""

    control: GNMRControl
    telemetry: GNMRTelemetry
    units: ot.UnitLayout  # static: unit names (index i of every (U,) vector), leaf shapes
    signals: SignalNames  # static: the signal of each row of the (S, U) arrays


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
    delta_gate: jax.Array
    collapse_threshold: jax.Array | None
    max_recover: jax.Array
    lock_steps: jax.Array
    max_lock_steps: jax.Array  # at least lock_steps
    preempt_factor: jax.Array | None
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
    delta_gate: ArrayLike
    max_recover: ArrayLike
    lock_steps: ArrayLike
    warmup_steps: ArrayLike
    actions: frozenset[str]
    units: ot.UnitsSpec
    signal: tuple[str, ...]
    collapse_threshold: ArrayLike | None
    max_lock_steps: ArrayLike | None
    preempt_factor: ArrayLike | None
    decay: ArrayLike
    short_decay: ArrayLike
    mean_mode: str
    short_window: int | None
    eps: ArrayLike

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], *, allow_inner: bool) -> _Options:
        """Picks the shared options by name from a public constructor's arguments and
        validates them; raises ``ValueError`` naming a bad one."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("actions", "signal")]
        given = {name: arguments[name] for name in names}
        actions = _normalize_actions(arguments["action"], allow_inner)
        if given["lock_steps"] is None:
            given["lock_steps"] = _default_lock_steps(actions)
        signal = _normalize_signal(arguments["signal"])
        options = cls(actions=actions, signal=signal, **given)
        options._validate()
        return options

    def _validate(self) -> None:
        check_range("threshold", self.threshold, lambda x: x > 0, "> 0")
        if self.delta_threshold is not None:
            allowed = "> 0 (or None to disable Delta-GNMR)"
            check_range("delta_threshold", self.delta_threshold, lambda x: x > 0, allowed)
        check_range("delta_gate", self.delta_gate, lambda x: x >= 0, ">= 0 (0: no gate)")
        if self.collapse_threshold is not None:
            allowed = "> 1 (or None to disable the collapse rule)"
            check_range("collapse_threshold", self.collapse_threshold, lambda x: x > 1, allowed)
        check_count("max_recover", self.max_recover)
        is_lock = lambda x: x >= 1 and float(x).is_integer()
        check_range(
            "lock_steps",
            self.lock_steps,
            is_lock,
            "an integer >= 1 (a unit is published in recovery_mask for lock_steps forward passes)",
        )
        if self.max_lock_steps is not None:
            check_range("max_lock_steps", self.max_lock_steps, is_lock, "None or an integer >= 1")
            if is_concrete_number(self.lock_steps) and is_concrete_number(self.max_lock_steps):
                check_range(
                    "max_lock_steps",
                    self.max_lock_steps,
                    lambda x: x >= self.lock_steps,
                    f">= lock_steps ({self.lock_steps})",
                )
        if self.preempt_factor is not None:
            allowed = ">= 1 (or None to disable preemption)"
            check_range("preempt_factor", self.preempt_factor, lambda x: x >= 1, allowed)
        check_count("warmup_steps", self.warmup_steps)
        check_range("decay", self.decay, lambda x: 0 < x < 1, "in (0, 1)")
        check_range("short_decay", self.short_decay, lambda x: 0 <= x < 1, "in [0, 1)")
        check_range("eps", self.eps, lambda x: x > 0, "> 0")
        if self.mean_mode not in MEAN_MODES:
            raise ValueError(f"mean_mode must be one of {MEAN_MODES}, got {self.mean_mode!r}")
        window = self.short_window
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"short_window must be None or an int >= 1, got {window!r}")
        if "clip" in self.actions and "gradient" not in self.signal:
            raise ValueError(
                "action 'clip' bounds the gradient by threshold times its mean norm, which GNMR "
                "keeps only when signal includes 'gradient': use signal=('gradient', "
                f"'external') or an action without 'clip'; got signal={self.signal!r}"
            )

    def budget_limit(self, num_units: int) -> int:
        """The most units that can enter recovery at one update, as a static int: the
        budget when it is a Python number, else (traced) every unit."""
        if is_concrete_number(self.max_recover):
            return min(int(self.max_recover), num_units)
        return num_units

    def arrays(self) -> _Hyper:
        """The numeric options as arrays, for one update."""
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        i32 = lambda x: jnp.asarray(x).astype(jnp.int32)
        maybe = lambda x, cast: None if x is None else cast(x)
        lock = i32(self.lock_steps)
        if self.max_lock_steps is None:
            max_lock = _HOLD_LOCKS * lock
        else:
            max_lock = jnp.maximum(i32(self.max_lock_steps), lock)
        return _Hyper(
            threshold=f32(self.threshold),
            delta_threshold=maybe(self.delta_threshold, f32),
            delta_gate=f32(self.delta_gate),
            collapse_threshold=maybe(self.collapse_threshold, f32),
            max_recover=i32(self.max_recover),
            lock_steps=lock,
            max_lock_steps=max_lock,
            preempt_factor=maybe(self.preempt_factor, f32),
            warmup_steps=i32(self.warmup_steps),
            decay=f32(self.decay),
            short_decay=f32(self.short_decay),
            eps=f32(self.eps),
        )


def _default_lock_steps(action: str | Sequence[str]) -> int:
    """The lock that ``lock_steps=None`` means: :data:`_PRECISION_LOCK` updates when the
    actions include ``"precision"``, else 1 (see the module docstring's defaults)."""
    actions = (action,) if isinstance(action, str) else tuple(action)
    return _PRECISION_LOCK if "precision" in actions else 1


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


def _normalize_signal(signal: str | Sequence[str]) -> tuple[str, ...]:
    """The signals in canonical order (:data:`SIGNALS`)."""
    given = (signal,) if isinstance(signal, str) else tuple(signal)
    if not given or len(set(given)) != len(given) or not set(given) <= set(SIGNALS):
        raise ValueError(
            f"signal must be 'gradient', 'external' or ('gradient', 'external'), got {signal!r}"
        )
    return tuple(name for name in SIGNALS if name in given)


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
    rows = len(options.signal)
    # Every field gets its own buffer, so that the state can be donated to a jitted step.
    per_unit = lambda dtype, fill=0: jnp.full((num,), fill, dtype)
    per_signal = lambda dtype, fill=0: jnp.full((rows, num), fill, dtype)
    counter = lambda: jnp.zeros((), jnp.int32)
    window = options.short_window
    control = GNMRControl(
        count=counter(),
        mean=per_signal(jnp.float32),
        mean_count=per_signal(jnp.int32),
        short=jnp.zeros((rows, num) if window is None else (rows, num, window), jnp.float32),
        short_count=per_signal(jnp.int32),
        lock=per_unit(jnp.int32),
        lock_age=per_unit(jnp.int32),
        lock_score=per_unit(jnp.float32),
        risk_steps=per_unit(jnp.int32),
    )
    telemetry = GNMRTelemetry(
        norm=per_unit(jnp.float32),
        value=per_signal(jnp.float32),
        gnmr=per_signal(jnp.float32, 1),
        delta_gnmr=per_signal(jnp.float32, 1),
        score=per_unit(jnp.float32),
        recovering=per_unit(bool),
        triggers=counter(),
        denied=counter(),
        preempted=counter(),
        recovered_steps=counter(),
        nonfinite=counter(),
        rebaselines=counter(),
    )
    return GNMRState(control, telemetry, layout, SignalNames(options.signal))


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


# ----------------------------------------------------------------------------- measure


def _external_values(names: tuple[str, ...], extra_args: Mapping[str, Any]) -> jax.Array:
    """The ``unit_signal`` extra arg as a (U,) float32 vector in unit order; raises at
    trace time, naming the problem, unless it is a scalar for every unit and nothing
    else."""
    if "unit_signal" not in extra_args:
        raise ValueError(
            "GNMR watches an external signal (signal includes 'external'): pass "
            "unit_signal={unit_name: scalar >= 0} to update, e.g. "
            f"tx.update(grads, state, params, unit_signal=...); units are {list(names)}"
        )
    given = extra_args["unit_signal"]
    if not isinstance(given, Mapping):
        raise ValueError(f"unit_signal must be a dict from unit name to scalar, got {given!r}")
    unknown = sorted(set(given) - set(names), key=str)
    if unknown:
        raise ValueError(
            f"unit_signal names {unknown}, which are not units; units are {list(names)}"
        )
    missing = [name for name in names if name not in given]
    if missing:
        raise ValueError(f"unit_signal has no value for the units {missing}")
    values = []
    for name in names:
        value = jnp.asarray(given[name])
        if value.shape != ():
            raise ValueError(
                f"unit_signal[{name!r}] must be a scalar, got an array of shape {value.shape}"
            )
        values.append(value.astype(jnp.float32))
    return jnp.stack(values) if values else jnp.zeros((0,), jnp.float32)


def _signal_values(
    signal: tuple[str, ...], names: tuple[str, ...], norm: jax.Array, extra_args
) -> tuple[jax.Array, jax.Array]:
    """Each watched signal's values, (S, U) float32, and whether each is valid (finite and
    non-negative)."""
    rows = [norm if name == "gradient" else _external_values(names, extra_args) for name in signal]
    values = jnp.stack(rows)
    return values, jnp.isfinite(values) & (values >= 0)


# ----------------------------------------------------------------------------- assess


class _Risk(NamedTuple):
    """How each unit's signals compare with their history. ``S`` signals, ``U`` units."""

    gnmr: jax.Array  # (S, U) float32: value / (m_u + eps); 1 without history, inf if invalid
    delta_gnmr: jax.Array  # (S, U) float32: value / (s_u + eps), likewise
    valid: jax.Array  # (S, U) bool: the value is finite and non-negative
    invalid: jax.Array  # (U,) bool: a non-finite gradient or an invalid signal value
    over: jax.Array  # (S, U) bool: the signal is over one of its bars (after warm-up)
    score: jax.Array  # (U,) float32: ranking score, > 1 over a bar, inf when not finite
    at_risk: jax.Array  # (U,) bool
    raised: jax.Array  # (U,) bool: not finite, or a signal over its long-run bar (what
    #   holds a lock: Delta-GNMR marks an onset, and its short signal is frozen then)


def _short_mean(control: GNMRControl) -> jax.Array:
    if control.short.ndim == 2:
        return control.short
    window = control.short.shape[-1]
    filled = jnp.minimum(control.short_count, window).astype(jnp.float32)
    return jnp.sum(control.short, axis=-1) / jnp.maximum(filled, 1.0)


def _ratio(value: jax.Array, reference: jax.Array, has_history: jax.Array, valid, eps):
    """value / (reference + eps); 1 without history, inf for an invalid value."""
    ratio = jnp.where(has_history, value / (reference + eps), 1.0)
    return jnp.where(valid, ratio, jnp.inf)


def _signal_scores(
    values: jax.Array, valid: jax.Array, control: GNMRControl, hyper: _Hyper
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """GNMR, Delta-GNMR, the level score (against the long-run mean only) and the
    ranking score of every signal, all (S, U)."""
    has_mean = control.mean_count > 0
    gnmr = _ratio(values, control.mean, has_mean, valid, hyper.eps)
    delta = _ratio(values, _short_mean(control), control.short_count > 0, valid, hyper.eps)
    level = gnmr / hyper.threshold
    if hyper.collapse_threshold is not None:
        inverse = control.mean / (jnp.where(valid, values, 0.0) + hyper.eps)
        collapse = jnp.where(has_mean & valid, inverse / hyper.collapse_threshold, 0.0)
        level = jnp.maximum(level, collapse)
    score = level
    if hyper.delta_threshold is not None:
        # A rise that leaves the value within delta_gate times its mean is not a climb.
        climbing = gnmr > hyper.delta_gate
        score = jnp.maximum(score, jnp.where(climbing, delta / hyper.delta_threshold, 0.0))
    return gnmr, delta, level, score


def _assess(
    values: jax.Array, valid: jax.Array, finite: jax.Array, control: GNMRControl, hyper: _Hyper
) -> _Risk:
    """The signals' ratios, the units' ranking score and which units are at risk."""
    gnmr, delta, level, signal_score = _signal_scores(values, valid, control, hyper)
    past_warmup = control.count >= hyper.warmup_steps
    over = past_warmup & (signal_score > 1.0)
    invalid = ~finite | jnp.any(~valid, axis=0)
    score = jnp.where(invalid, jnp.inf, jnp.max(signal_score, axis=0))
    at_risk = invalid | jnp.any(over, axis=0)
    raised = invalid | jnp.any(past_warmup & (level > 1.0), axis=0)
    return _Risk(gnmr, delta, valid, invalid, over, score, at_risk, raised)


# ----------------------------------------------------------------------------- decide


class _Decision(NamedTuple):
    """What the controller decided for one update; every field is (U,) unless noted."""

    finite: jax.Array  # bool: the unit's gradient is finite
    entered: jax.Array  # bool: entered recovery at this update
    preempted: jax.Array  # bool: was locked, gave its slot to a far stronger candidate
    denied: jax.Array  # bool: at risk, not locked, refused by the budget
    recovering: jax.Array  # bool: entered now or still locked
    lock: jax.Array  # int32: the countdown after this update
    lock_age: jax.Array  # int32: updates since entry, after this update (0 when free)
    lock_score: jax.Array  # float32: peak score of the current lock (0 when free)
    risk_steps: jax.Array  # int32: consecutive updates at risk, this one included
    rebaseline: jax.Array  # (S, U) bool: released at a new level; that signal restarts


def _top(values: jax.Array, limit: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``limit`` largest ``values`` (descending, ties by index), their indices, and
    every entry's rank among them (``limit`` for the rest), with fixed shapes."""
    top, order = jax.lax.top_k(values, limit)
    rank = (
        jnp.full(values.shape, limit, jnp.int32).at[order].set(jnp.arange(limit, dtype=jnp.int32))
    )
    return top, order, rank


def _admit(
    candidate: jax.Array,
    score: jax.Array,
    locked: jax.Array,
    peak: jax.Array,
    free_slots: jax.Array,
    preempt_factor: jax.Array | None,
    limit: int,
) -> tuple[jax.Array, jax.Array]:
    """The candidates that enter recovery and the locked units they preempt.

    The ``free_slots`` strongest candidates enter. Then the ``j``-th strongest of the
    rest takes the slot of the locked unit with the ``j``-th lowest peak if its score
    exceeds ``preempt_factor`` times that peak; the scores fall and the peaks rise with
    ``j``, so the winners are a prefix and this pairing preempts as many as any.
    ``limit`` (static) bounds the units that can enter or be preempted at once: the
    budget when it is a Python number, so that ``top_k`` looks for a few units
    instead of sorting all of them.
    """
    strongest, _, candidate_rank = _top(jnp.where(candidate, score, -jnp.inf), limit)
    if preempt_factor is None:
        return candidate & (candidate_rank < free_slots), jnp.zeros_like(locked)
    weakest, victims, victim_rank = _top(jnp.where(locked, -peak, -jnp.inf), limit)
    challengers = jnp.take(
        strongest, free_slots + jnp.arange(limit), mode="fill", fill_value=-jnp.inf
    )
    wins = locked[victims] & (challengers > preempt_factor * -weakest)
    taken = jnp.sum(jnp.cumprod(wins.astype(jnp.int32)), dtype=jnp.int32)
    entered = candidate & (candidate_rank < free_slots + taken)
    return entered, locked & (victim_rank < taken)


def _count_down(
    held: jax.Array, entered: jax.Array, risk: _Risk, control: GNMRControl, hyper: _Hyper
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The lock countdown, lock age and peak score after this update.

    A held unit whose countdown ends while it is still raised, younger than
    ``max_lock_steps``, is kept one more update.
    """
    age = control.lock_age + 1
    countdown = control.lock - 1
    extend = held & (countdown == 0) & risk.raised & (age < hyper.max_lock_steps)
    lock = jnp.where(held, jnp.where(extend, 1, countdown), 0)
    lock = jnp.where(entered, hyper.lock_steps, lock)
    still = lock > 0
    lock_age = jnp.where(still & ~entered, age, 0)
    peak = jnp.where(entered, risk.score, jnp.maximum(control.lock_score, risk.score))
    return lock, lock_age, jnp.where(still, peak, 0.0)


def _decide(
    risk: _Risk, finite: jax.Array, control: GNMRControl, hyper: _Hyper, limit: int
) -> _Decision:
    """Applies the budget (with preemption) and the lock, and decides the release."""
    locked = control.lock > 0
    candidate = risk.at_risk & ~locked
    free_slots = jnp.maximum(hyper.max_recover - jnp.sum(locked, dtype=jnp.int32), 0)
    entered, preempted = _admit(
        candidate, risk.score, locked, control.lock_score, free_slots, hyper.preempt_factor, limit
    )
    held = locked & ~preempted
    lock, lock_age, lock_score = _count_down(held, entered, risk, control, hyper)
    recovering = held | entered
    risk_steps = jnp.where(risk.at_risk, jnp.minimum(control.risk_steps + 1, _COUNT_CAP), 0)
    # A risk that outlasts the lock and _LEVEL_UPDATES is a new level, not a spike:
    # re-baseline the signals still over their bar when the unit is released, so that
    # it does not re-enter recovery for ever.
    level_steps = jnp.maximum(hyper.lock_steps + 1, _LEVEL_UPDATES)
    new_level = recovering & (lock == 0) & (risk_steps >= level_steps)
    return _Decision(
        finite=finite,
        entered=entered,
        preempted=preempted,
        denied=candidate & ~entered,
        recovering=recovering,
        lock=lock,
        lock_age=lock_age,
        lock_score=lock_score,
        risk_steps=risk_steps,
        rebaseline=new_level & risk.over & risk.valid,
    )


# ----------------------------------------------------------------------------- act


def _clip_factor(norm: jax.Array, control: GNMRControl, hyper: _Hyper) -> jax.Array:
    """(U,) float32 in (0, 1]: the rescaling that brings ``n_u`` to ``threshold * m_u``
    (row 0 of the statistics is the gradient's whenever clip is allowed)."""
    bar = hyper.threshold * control.mean[0]
    over = (control.mean_count[0] > 0) & (norm > bar)
    factor = jnp.where(over, bar / jnp.maximum(norm, 1e-30), 1.0)
    return jnp.where(jnp.isfinite(norm), factor, 1.0)


def _act_on_gradient(
    partition: ot.UnitPartition,
    updates: PyTree,
    decision: _Decision,
    clip_factor: jax.Array | None,
    actions: frozenset[str],
) -> tuple[PyTree, jax.Array]:
    """Clips and zeroes unit gradients; returns them and the mask of zeroed units."""
    if clip_factor is not None:
        updates = ot.scale_units(
            partition, updates, jnp.where(decision.recovering, clip_factor, 1.0)
        )
    dropped = ~decision.finite
    if "skip" in actions:
        dropped = dropped | decision.recovering
    return ot.zero_units(partition, updates, dropped), dropped


def _zero_nonfinite_elements(partition: ot.UnitPartition, updates: PyTree) -> PyTree:
    """The non-finite elements of the watched leaves set to zero: the guard of the
    precision action alone, which needs no unit reduction before the update."""
    leaves = jax.tree.leaves(updates)
    guarded = [
        leaf if unit is None else jnp.where(jnp.isfinite(leaf), leaf, jnp.zeros_like(leaf))
        for leaf, unit in zip(leaves, partition.leaf_units, strict=True)
    ]
    return jax.tree.unflatten(partition.treedef, guarded)


# ----------------------------------------------------------------------------- advance


def _running_mean(
    mean: jax.Array, value: jax.Array, weight: jax.Array, observe: jax.Array
) -> jax.Array:
    return jnp.where(observe, mean + weight * (value - mean), mean)


def _fold_in(
    control: GNMRControl, value: jax.Array, observe: jax.Array, hyper: _Hyper, mean_mode: str
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Folds ``value`` (S, U) into the long and short statistics where ``observe``.

    A bias-corrected EMA is a running mean whose k-th weight is
    ``(1 - decay) / (1 - decay**k)``; the cumulative mean uses ``1 / k``.
    """
    safe = jnp.where(observe, value, 0.0)
    k = (control.mean_count + 1).astype(jnp.float32)
    if mean_mode == "cumulative":
        weight = 1.0 / k
    else:
        weight = (1.0 - hyper.decay) / (1.0 - hyper.decay**k)
    mean = _running_mean(control.mean, safe, weight, observe)
    mean_count = control.mean_count + observe.astype(jnp.int32)

    if control.short.ndim == 2:
        k = (control.short_count + 1).astype(jnp.float32)
        weight = (1.0 - hyper.short_decay) / (1.0 - hyper.short_decay**k)
        short = _running_mean(control.short, safe, weight, observe)
    else:
        window = control.short.shape[-1]
        slot = jax.nn.one_hot(control.short_count % window, window, dtype=bool)
        short = jnp.where(slot & observe[..., None], safe[..., None], control.short)
    short_count = control.short_count + observe.astype(jnp.int32)
    return mean, mean_count, short, short_count


def _bounded(value: jax.Array, control: GNMRControl, hyper: _Hyper) -> jax.Array:
    """After warm-up, a value enters the statistics capped at ``threshold * m_u`` (and
    floored at ``m_u / collapse_threshold``), so an event never moves its own bar."""
    bounded = jnp.minimum(value, hyper.threshold * control.mean)
    if hyper.collapse_threshold is not None:
        bounded = jnp.maximum(bounded, control.mean / hyper.collapse_threshold)
    past_warmup = control.count >= hyper.warmup_steps
    return jnp.where(past_warmup & (control.mean_count > 0), bounded, value)


def _advance(
    control: GNMRControl,
    values: jax.Array,
    decision: _Decision,
    risk: _Risk,
    hyper: _Hyper,
    mean_mode: str,
) -> GNMRControl:
    """The control state after this update: statistics fed, lock counted down."""
    observe = risk.valid & ~decision.recovering
    bounded = _bounded(values, control, hyper)
    mean, mean_count, short, short_count = _fold_in(control, bounded, observe, hyper, mean_mode)
    # A re-baselined signal's history is its current value alone (a full short window).
    restart = decision.rebaseline
    window = 1 if short.ndim == 2 else short.shape[-1]
    per_slot = lambda x: x if short.ndim == 2 else x[..., None]
    return GNMRControl(
        count=optax.safe_increment(control.count),
        mean=jnp.where(restart, values, mean),
        mean_count=mean_count,
        short=jnp.where(per_slot(restart), per_slot(values), short),
        short_count=jnp.where(restart, jnp.maximum(short_count, window), short_count),
        lock=decision.lock,
        lock_age=decision.lock_age,
        lock_score=decision.lock_score,
        risk_steps=decision.risk_steps,
    )


def _record(
    telemetry: GNMRTelemetry,
    norm: jax.Array,
    values: jax.Array,
    risk: _Risk,
    decision: _Decision,
) -> GNMRTelemetry:
    """The telemetry after this update."""
    count_of = lambda mask: jnp.sum(mask, dtype=jnp.int32)
    return GNMRTelemetry(
        norm=norm,
        value=values,
        gnmr=risk.gnmr,
        delta_gnmr=risk.delta_gnmr,
        score=risk.score,
        recovering=decision.recovering,
        triggers=telemetry.triggers + count_of(decision.entered),
        denied=telemetry.denied + count_of(decision.denied),
        preempted=telemetry.preempted + count_of(decision.preempted),
        recovered_steps=telemetry.recovered_steps + count_of(decision.recovering),
        nonfinite=telemetry.nonfinite + count_of(risk.invalid),
        rebaselines=telemetry.rebaselines + count_of(jnp.any(decision.rebaseline, axis=0)),
    )


class _Step(NamedTuple):
    """One update of the controller: what it decided and the state after it."""

    partition: ot.UnitPartition
    decision: _Decision
    clip_factor: jax.Array | None  # (U,) float32 when "clip" is an action
    state: GNMRState


def _control_step(
    options: _Options, updates: PyTree, state: GNMRState, extra_args: Mapping[str, Any]
) -> _Step:
    """Measures the units of ``updates`` (and the external signal), decides, and
    advances the state."""
    partition = ot.make_partition(updates, options.units)
    _check_layout(state, partition)
    hyper = options.arrays()
    norm = ot.unit_norms(partition, updates)
    values, valid = _signal_values(options.signal, partition.names, norm, extra_args)
    finite = jnp.isfinite(norm)
    risk = _assess(values, valid, finite, state.control, hyper)
    decision = _decide(
        risk, finite, state.control, hyper, options.budget_limit(partition.num_units)
    )
    clip = _clip_factor(norm, state.control, hyper) if "clip" in options.actions else None
    control = _advance(state.control, values, decision, risk, hyper, options.mean_mode)
    telemetry = _record(state.telemetry, norm, values, risk, decision)
    return _Step(partition, decision, clip, state._replace(control=control, telemetry=telemetry))


# ----------------------------------------------------------------------------- transforms


def _chained(options: _Options) -> optax.GradientTransformationExtraArgs:
    """The controller as a transformation of the gradient (:func:`gnmr`)."""
    precision_only = options.actions == frozenset({"precision"})

    def init_fn(params: PyTree) -> GNMRState:
        return _init_state(params, options)

    def update_fn(updates, state, params=None, **extra_args):
        del params
        step = _control_step(options, updates, state, extra_args)
        if precision_only:
            updates = _zero_nonfinite_elements(step.partition, updates)
        else:
            updates, _ = _act_on_gradient(
                step.partition, updates, step.decision, step.clip_factor, options.actions
            )
        return updates, step.state

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
        step = _control_step(options, updates, state.gnmr, extra_args)
        partition, decision = step.partition, step.decision
        grads, frozen = _act_on_gradient(
            partition, updates, decision, step.clip_factor, options.actions
        )
        per_parameter = _inner_state.per_parameter_map(inner, partition)
        inner_state, reset_age = state.inner, state.reset_age
        if resets:
            zero = lambda s: _inner_state.zero_leaves(partition, decision.entered, s)
            inner_state = per_parameter(zero, inner_state)
            reset_age = jnp.where(decision.entered, 0, jnp.minimum(reset_age + 1, _COUNT_CAP))
        inner_update = lambda g, s, p: inner.update(g, s, p, **extra_args)
        new_updates, new_inner = _inner_state.frozen_update(
            inner_update, per_parameter, partition, frozen, grads, inner_state, params
        )
        if resets:
            ramp = reset_ramp(reset_age, reset_warmup_steps)
            new_updates = ot.scale_units(partition, new_updates, ramp)
        new_updates = ot.zero_units(partition, new_updates, frozen)
        return new_updates, GNMRWrapState(gnmr=step.state, inner=new_inner, reset_age=reset_age)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- public API


def gnmr(
    threshold: ArrayLike = 4.5,
    delta_threshold: ArrayLike | None = 3.0,
    max_recover: ArrayLike = 1,
    lock_steps: ArrayLike | None = None,
    warmup_steps: ArrayLike = 20,
    action: str | Sequence[str] = ("precision", "clip"),
    units: ot.UnitsSpec = None,
    *,
    signal: str | Sequence[str] = "gradient",
    delta_gate: ArrayLike = 3.5,
    collapse_threshold: ArrayLike | None = None,
    max_lock_steps: ArrayLike | None = None,
    preempt_factor: ArrayLike | None = 10.0,
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
    ``max_recover`` at a time (a far stronger candidate preempts a locked unit). A
    lock covers at least ``lock_steps + 1`` updates: the one that triggered and
    ``lock_steps`` more, which are also the forward passes for which the unit is
    published in :func:`recovery_mask`; it is held while the unit stays at risk, up
    to ``max_lock_steps`` forward passes. See the module docstring for the full rules,
    what is reconstructed and what is ours.

    Per update this costs ``O(P)`` for ``P`` parameter elements (one read of the
    gradient for the unit norms) and ``O(U log max_recover)`` for the budget over
    ``U`` units (``O(U log U)`` when ``max_recover`` is traced); the state holds
    ``O(U)`` numbers per signal.

    Args:
      threshold: GNMR bar ``tau`` (> 0); also the clip bar ``tau * m_u``.
      delta_threshold: Delta-GNMR bar (> 0), or ``None`` to use GNMR alone.
      max_recover: budget maxO, the most units in recovery at once (int >= 0).
      lock_steps: the minimum number of forward passes a unit stays published in
        :func:`recovery_mask` after it enters recovery (int >= 1); ``None`` (default):
        10 when ``action`` includes ``"precision"``, else 1.
      warmup_steps: updates before any trigger except non-finite ones (int >= 0).
      action: ``"precision"``, ``"clip"``, ``"skip"``, or a tuple of them.
      units: ``None`` (one unit per leaf, named by key path) or a callable
        ``params -> labels`` (see :mod:`optstab.units`); a leaf labelled ``None``
        belongs to no unit and passes through untouched.
      signal: what GNMR watches (static): ``"gradient"`` (the unit gradient norms),
        ``"external"`` (a scalar per unit passed to ``update`` as
        ``unit_signal={unit_name: value >= 0}``, such as
        :func:`optstab.lowprec.amax_signal`), or ``("gradient", "external")`` (a
        unit's score is the higher of the two). ``"clip"`` needs ``"gradient"``.
      delta_gate: Delta-GNMR counts only while ``GNMR_u > delta_gate`` (>= 0; 0: no
        gate), so a norm that merely returns to its level after small ones is no climb.
      collapse_threshold: ``None`` (default) or ``c > 1``: a unit whose value falls
        below about ``m_u / c`` is also at risk.
      max_lock_steps: the most forward passes a unit stays published per entry while
        it stays at risk (int >= ``lock_steps``); ``None``: ``4 * lock_steps``;
        ``lock_steps``: a fixed lock.
      preempt_factor: a candidate whose score exceeds this factor (>= 1) times a
        locked unit's peak score takes its slot when the budget is full; ``None``
        disables preemption.
      decay: EMA decay of the long-run mean, in (0, 1).
      short_decay: EMA decay of the short signal, in [0, 1) (0: the last norm).
      mean_mode: ``"ema"`` or ``"cumulative"`` long-run mean.
      short_window: if set, the short signal is the mean of the last
        ``short_window`` norms instead of an EMA (static int).
      eps: added to the denominators.

    Numeric arguments may be arrays, so ``optax.inject_hyperparams`` works; pass
    ``static_args=("action", "units", "mean_mode", "short_window")`` to it when
    ``units`` is a callable (it would otherwise be taken for a schedule). ``signal``
    is static (a string or tuple, which ``inject_hyperparams`` keeps as given).

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
      >>> float(jnp.linalg.norm(updates["a"]) / 0.1)  # clipped to 4.5 x mean norm
      7.794...

      An external signal, one scalar per unit (here a quantizer's input amax):

      >>> tx = optstab.gnmr(warmup_steps=2, signal="external", action="precision")
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     _, state = tx.update(grads, state, unit_signal={"a": 1.0, "b": 2.0})
      >>> _, state = tx.update(grads, state, unit_signal={"a": 40.0, "b": 2.0})
      >>> {k: bool(v) for k, v in optstab.recovery_mask(state).items()}
      {'a': True, 'b': False}

    References:
      Kong, Jia, Zhang et al., GNMR, 2026, https://arxiv.org/abs/2606.00539
    """
    return _chained(_Options.from_arguments(locals(), allow_inner=False))


def gnmr_wrap(
    inner: optax.GradientTransformation,
    threshold: ArrayLike = 4.5,
    delta_threshold: ArrayLike | None = 3.0,
    max_recover: ArrayLike = 1,
    lock_steps: ArrayLike | None = None,
    warmup_steps: ArrayLike = 20,
    action: str | Sequence[str] = ("skip",),
    units: ot.UnitsSpec = None,
    *,
    signal: str | Sequence[str] = "gradient",
    delta_gate: ArrayLike = 3.5,
    collapse_threshold: ArrayLike | None = None,
    max_lock_steps: ArrayLike | None = None,
    preempt_factor: ArrayLike | None = 10.0,
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
    * Leaves that belong to no unit (labelled ``None``) pass through, and the inner
      state of their parameters advances as usual.

    When the inner optimizer's update is element-wise in its per-parameter state (the
    Adam family, Lion, SGD with momentum, RMSProp, ...: checked on its jaxpr at trace
    time), the freeze is applied where each new state leaf is computed, so the update
    compiles like the inner optimizer alone plus a select (no copy of its state). Any
    other inner transformation takes the generic path, which computes the inner
    update and then puts the frozen units' old state back: XLA then keeps the old
    state alive beside the new one (about one extra copy of the per-parameter state).

    Args:
      inner: the optimizer to wrap (any ``optax.GradientTransformation``).
      threshold, delta_threshold, max_recover, lock_steps, warmup_steps, action,
        units, signal, delta_gate, collapse_threshold, max_lock_steps, preempt_factor,
        decay, short_decay, mean_mode, short_window, eps: as in :func:`gnmr`;
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

    A unit is in the mask for at least the ``lock_steps`` forward passes after it
    entered recovery (its lock covers ``lock_steps + 1`` updates: the one that
    triggered and the ``lock_steps`` whose gradients these forward passes compute),
    and longer while it stays at risk, up to ``max_lock_steps`` passes. Only real
    units are listed (leaves labelled ``None`` have none). Works on vmapped states
    (the booleans then have the batch shape).
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
      A dict with per-unit dicts ``gnmr``, ``delta_gnmr`` and ``mean`` (of the first
      watched signal: the gradient norm when it is watched, else the external signal),
      ``norm`` (the gradient norm, always measured), ``score`` (the ranking score),
      ``recovering`` (units acted on in the last update) and ``lock``; ``signals``,
      ``{signal: {"value", "mean", "gnmr", "delta_gnmr"}}`` of per-unit dicts for every
      watched signal; and the scalars ``num_recovering`` and the cumulative counters
      ``triggers``, ``denied``, ``preempted``, ``recovered_steps``, ``nonfinite`` and
      ``rebaselines``. On vmapped states every value has the batch shape.

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
    row = lambda values, s: values[..., s, :]
    signals = {
        name: {
            "value": _per_unit(state, row(telemetry.value, s)),
            "mean": _per_unit(state, row(control.mean, s)),
            "gnmr": _per_unit(state, row(telemetry.gnmr, s)),
            "delta_gnmr": _per_unit(state, row(telemetry.delta_gnmr, s)),
        }
        for s, name in enumerate(state.signals)
    }
    first = signals[state.signals.names[0]]
    return {
        "gnmr": first["gnmr"],
        "delta_gnmr": first["delta_gnmr"],
        "mean": first["mean"],
        "norm": _per_unit(state, telemetry.norm),
        "score": _per_unit(state, telemetry.score),
        "recovering": _per_unit(state, telemetry.recovering),
        "lock": _per_unit(state, control.lock),
        "signals": signals,
        "num_recovering": jnp.sum(telemetry.recovering, axis=-1, dtype=jnp.int32),
        "triggers": telemetry.triggers,
        "denied": telemetry.denied,
        "preempted": telemetry.preempted,
        "recovered_steps": telemetry.recovered_steps,
        "nonfinite": telemetry.nonfinite,
        "rebaselines": telemetry.rebaselines,
    }
