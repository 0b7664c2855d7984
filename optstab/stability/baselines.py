"""Published gradient-spike mitigations, as Optax transforms, to compare optstab against.

Four peer baselines, each reimplemented from its paper and compared line by line with the
authors' released code (the URLs below pin the commit; ``#Lnn`` are its line numbers):

* :func:`spam` / :func:`scale_by_spam` -- **SPAM**, Spike-Aware Adam with Momentum Reset
  (Huang et al., ICLR 2025, https://arxiv.org/abs/2501.06842). Per element: a gradient
  with ``|g|**2 > theta * v`` is clipped to ``sign(g) * sqrt(theta * v)``; Adam's moments
  are zeroed every ``reset_interval`` steps and the step size is ramped back up along a
  cosine over ``reset_warmup_steps`` steps after each reset.
* :func:`zclip` -- **ZClip** (Kumar et al., 2025, https://arxiv.org/abs/2504.02507).
  Global: the z-score of the gradient norm against an EMA mean and variance; a spike is
  rescaled to the "reciprocal" norm ``mu + (z_threshold**2 / z) * sigma``, and every
  step's norm is capped at ``max_norm``.
* :func:`adagc` -- **AdaGC** (Wang et al., 2025, https://arxiv.org/abs/2502.11034).
  Per tensor: a gradient whose norm exceeds ``relative_threshold`` times the EMA of that
  tensor's own clipped norms is rescaled down to that bound.
* :func:`skip_step` -- **skip-step** as in OLMo-core, Levanter and MaxText: a step whose
  gradient norm (or loss) is more than ``num_sigma`` standard deviations above the mean
  of a rolling window is skipped; the wrapped optimizer's state is left exactly as it
  was.

Reference code compared
-----------------------
* SPAM: https://github.com/TianjinYellow/SPAM-Optimizer/blob/e8185fbe695fdc449953b4a1f96121df5bf0d268/galore_torch/SPAM.py
  defaults #L94-L102 (``eps=1e-6``, threshold 5000, ``DeltaT=500``, warm-up 150,
  ``grad_accu_steps=20``), reset #L227, clip #L236-L246, moments #L249-L250, ``eps``
  before the bias correction #L252-L259, step #L272, weight decay after the step
  #L280-L282, post-reset ramp #L25-L58, #L135, #L194, #L294.
* ZClip: https://github.com/bluorion-com/ZClip/blob/584ce4f5a4aabab59e7df1dbaffc26a44df39dc1/zclip/zclip.py
  defaults #L17 (``max_grad_norm=1.0``), warm-up and EMAs #L71-L80, z-score #L82-L85,
  reciprocal target #L117-L137, clip coefficient #L149 and cap #L157-L168, step
  #L180-L211 (the warm-up also clips at ``max_grad_norm``, #L199-L200).
* AdaGC: https://github.com/lishuai-97/AdaGC/blob/32c249fa365e08169779d63d416bfa76c2be31fc/megatron-gpt2.patch
  (a Megatron patch) defaults #L50179-L50182 and #L50388-L50389 (clip ratio 1.04, beta
  0.99, eps 1e-6, 100 warm-up steps), warm-up global clip and per-tensor minimum
  #L50495-L50528, relative clip and EMA #L50549-L50561, run script #L50682-L50692
  (``--clip-grad 1.0 --clip-ratio 1.04 --clip-beta 0.99``).
* skip-step: OLMo-core https://github.com/allenai/OLMo-core/blob/fa6c5014c9f6e9ee789da2d9c20d5126fee8df0d/src/olmo_core/optim/skip_step_optimizer.py
  #L33-L108, Levanter https://github.com/stanford-crfm/levanter/blob/9263f81e8b453241332c2c0b2d2001bfb2d2241c/src/levanter/optim/skipstep.py
  #L80-L81 and #L125-L166, MaxText https://github.com/AI-Hypercomputer/maxtext/blob/e591f30cbbf217ed67ef71263ec0538239f9c3b8/src/maxtext/optimizers/optimizers.py
  #L52-L166.

What is published and what is ours
----------------------------------
Published (paper or authors' code), kept as is: every rule above and these defaults.
SPAM: ``eps = 1e-6`` added to ``sqrt(v)`` *before* the bias correction (the step is
``sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)``); ``1 - b`` and ``1 - b**t``
computed from the Python betas, not from their float32 roundings (``1 - float32(0.999)``
is 0.00099998713, 1.3e-5 off); bias correction with the global step count (not
restarted by a reset) and the warm-up factor ``1 - 0.99 * (1 + cos(pi * s / (N + 1))) /
2``, ``s`` steps after a reset (none before the first reset); clipping only once
``clip_delay_steps`` (20, the reference's ``grad_accu_steps``) steps have passed since
the start or the last reset; weight decay applied to the parameters *after* the Adam
step, ``p <- (p - lr * u) * (1 - lr * wd)``. ZClip: the warm-up only collects norms and
then starts the EMAs at their mean and population variance; the EMAs record the
post-z-clip norm (the variance update uses the already updated mean); every gradient,
warm-up included, is also capped at global norm ``max_norm = 1.0``, which the EMAs do not
see; the clip factor is ``bound / (norm + eps)``. AdaGC: clip ratio 1.04 and EMA decay
0.99 (the released code and its run script; the paper's text gives 1.05 and 0.98); a
tensor is clipped when its norm exceeds ``1.04 * gamma``, by the factor ``1.04 * gamma /
(norm + eps)``, and the EMA then records ``1.04 * gamma``; the warm-up, a global-norm clip
at ``warmup_clip = 1.0`` for 100 steps during which each tensor's EMA is the *minimum* of
its clipped norms. skip-step: window 128, 6 sigma, one-sided test on the loss and the
gradient norm (a step is skipped if either is an outlier), sample (n - 1) standard
deviation, ``min_history = max(2, window // 2)``.

Ours:

* Non-finite gradients. ZClip and AdaGC cannot repair a NaN or infinite norm: such a
  gradient (ZClip) or tensor (AdaGC) passes through unchanged and is left out of the
  running statistics, which would otherwise stay NaN for good. A downstream guard
  (:func:`skip_step`, ``optax.apply_if_finite``) still sees it. SPAM is left as
  published: an infinite element fails no test and is clipped like any spike once
  clipping is on, a NaN element fails the ``|g|**2 > theta * v`` test and flows into the
  moments until the next reset zeroes them. :func:`skip_step` always skips a step whose
  gradient norm or loss is not finite, even before its window has enough history.
* AdaGC: ``gamma = 0`` means "no norm recorded yet" and such a tensor is not clipped; a
  zero or non-finite norm is not recorded. The reference's ``min`` would otherwise pin
  the EMA of a tensor whose gradient is zero early in training (an unused embedding row)
  to zero and clip that tensor to zero for good.
* skip-step: the window holds the values of *accepted* steps, so a spike does not widen
  the band that judges the next step (OLMo-core, Levanter and MaxText record every step,
  so one 1000x spike among values ~1 lets any spike up to ~500x through for the next
  ``window`` steps). To learn a lasting shift instead of skipping for good, the window
  also records skipped (finite) values once ``shift_patience`` (16) steps in a row have
  been skipped; ``shift_patience=0`` records every step, as the references do. No floor on the
  standard deviation (Levanter's is 1e-6; OLMo-core and MaxText have none) and the
  sample standard deviation of OLMo-core and MaxText (Levanter's is the population one).
* Statistics are float32 (complex64 for SPAM's first moment of complex parameters)
  whatever the parameter dtype; the references keep them in the parameter dtype
  (ZClip's in Python floats).
* Complex parameters: every norm and every second moment is taken of ``|z|``, SPAM's
  first moment is complex and its clip keeps the phase (``sign(z) = z / |z|``), as
  ``optax.adam`` does for complex parameters.

Every state is a ``NamedTuple`` that counts how often its mechanism fired
(``num_clipped``, ``num_resets``, ``num_skipped``, ...). Every transform is pure and
jit-compatible, its per-parameter state keeps the parameters' sharding, and every
numeric hyperparameter except ``skip_step``'s ``window`` (a buffer shape) may be a
traced array, so ``optax.inject_hyperparams`` works.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optstab import tree as otree
from optstab._checks import check_range as _check
from optstab._checks import is_concrete_number
from optstab.stability.warmup import reset_ramp

ArrayLike = jax.typing.ArrayLike
ScalarOrSchedule = float | jax.Array | optax.Schedule


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _one_minus(b: ArrayLike) -> jax.Array:
    """``1 - b`` in float32, computed before rounding when ``b`` is a Python number.

    ``1 - float32(0.999)`` is 0.00099998713; ``float32(1 - 0.999)`` is 0.001 to 3e-8, as
    in the reference code (Python floats). A traced ``b`` is already float32.
    """
    return _f32(1 - b) if is_concrete_number(b) else 1 - _f32(b)


def _stat_dtype(x: Any) -> jnp.dtype:
    """float32, or complex64 for a complex leaf: statistics keep the imaginary part."""
    return jnp.dtype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)


def _upcast(x: jax.Array) -> jax.Array:
    return x.astype(_stat_dtype(x))


def _abs_sq(x: jax.Array) -> jax.Array:
    """``|x|**2`` elementwise in float32 (of the modulus for complex ``x``)."""
    x = _upcast(x)
    return jnp.square(x.real) + jnp.square(x.imag) if jnp.iscomplexobj(x) else jnp.square(x)


def _global_norm(tree: Any) -> jax.Array:
    """L2 norm of a whole pytree in float32, of ``|z|`` for complex leaves (0 if no leaves)."""
    return jnp.sqrt(sum((jnp.sum(_abs_sq(x)) for x in jax.tree.leaves(tree)), jnp.float32(0)))


def _scale_tree(tree: optax.Updates, factor: jax.Array) -> optax.Updates:
    """Multiplies every leaf by a float32 scalar in float32; each leaf keeps its dtype."""
    return jax.tree.map(lambda u: (_upcast(u) * factor).astype(u.dtype), tree)


def _int32_sum(tree: Any) -> jax.Array:
    """Number of true elements in a pytree of boolean arrays, as an int32 scalar."""
    return sum((jnp.sum(x, dtype=jnp.int32) for x in jax.tree.leaves(tree)), jnp.int32(0))


# ----------------------------------------------------------------------------------------
# SPAM
# ----------------------------------------------------------------------------------------


class ScaleBySpamState(NamedTuple):
    """State of :func:`scale_by_spam`."""

    count: jax.Array  # int32 scalar: steps taken; never reset (bias correction, reset clock)
    mu: optax.Updates  # like params, float32 (complex64 if complex): first moment
    nu: optax.Updates  # like params, float32: second moment of |g|; both zeroed at resets
    num_clipped: jax.Array  # int32 scalar: gradient *elements* clipped, summed over steps
    num_resets: jax.Array  # int32 scalar: moment resets so far


def _steps_since_reset(step: jax.Array, reset_interval: ArrayLike) -> jax.Array:
    """``step mod reset_interval``; just ``step`` when resets are off (interval 0)."""
    interval = jnp.asarray(reset_interval, jnp.int32)
    return jnp.where(interval > 0, step % jnp.maximum(interval, 1), step)


def _spam_warmup_factor(
    step: jax.Array, reset_interval: ArrayLike, reset_warmup_steps: ArrayLike
) -> jax.Array:
    """Step-size factor: a half-cosine ramp from 0.01 to 1 over the steps after a reset."""
    interval = jnp.asarray(reset_interval, jnp.int32)
    since = _steps_since_reset(step, interval)
    after_a_reset = (interval > 0) & (step >= interval)
    return jnp.where(after_a_reset, reset_ramp(since, reset_warmup_steps), 1.0)


def _spam_spikes(grads: optax.Updates, nu: optax.Updates, threshold: jax.Array) -> Any:
    """Elements whose ``|g|**2`` exceeds ``threshold`` times the second moment."""
    return jax.tree.map(lambda g, v: _abs_sq(g) > threshold * v, grads, nu)


def _spam_clip(grads: optax.Updates, nu: optax.Updates, spikes: Any, threshold: jax.Array):
    """Replaces each spiking element by ``sign(g) * sqrt(threshold * v)`` (float32, or
    complex64 keeping the phase: ``sign(z) = z / |z|``)."""

    def clip(g, v, spike):
        g = _upcast(g)
        return jnp.where(spike, jnp.sign(g) * jnp.sqrt(threshold * v), g)

    return jax.tree.map(clip, grads, nu, spikes)


def _one_minus_power(one_minus_b: jax.Array, t: jax.Array) -> jax.Array:
    """``1 - b**t`` from ``1 - b``, to a few float32 ulps even for ``b`` close to 1."""
    return -jnp.expm1(t * jnp.log1p(-one_minus_b))


def scale_by_spam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    spike_threshold: ArrayLike = 5000.0,
    reset_interval: ArrayLike = 500,
    reset_warmup_steps: ArrayLike = 150,
    clip_delay_steps: ArrayLike = 20,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam's direction with SPAM's spike clipping, momentum reset and post-reset warm-up.

    At step :math:`t` (counting from 1), with :math:`\Delta` the reset interval,
    :math:`\theta` the spike threshold and :math:`s = t \bmod \Delta` the steps since the
    last reset:

    .. math::

      m, v &\leftarrow 0 \quad \text{if } s = 0 \\
      g_i &\leftarrow \operatorname{sign}(g_i) \sqrt{\theta v_i}
        \quad \text{if } |g_i|^2 > \theta v_i \text{ and } s \ge \text{clip\_delay\_steps} \\
      m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) |g|^2 \\
      u &= \phi(s) \, \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \,
        \frac{m}{\sqrt{v} + \epsilon}

    where :math:`v` in the clip test is the second moment of the previous step, the bias
    correction uses the global :math:`t` and :math:`\epsilon` is added before it (as in
    the reference code, so :math:`u = \phi\, \hat m / (\sqrt{\hat v} + \epsilon /
    \sqrt{1 - \beta_2^t})`), and after the first reset
    :math:`\phi(s) = 1 - 0.99 (1 + \cos(\pi s / (N + 1))) / 2` for :math:`s < N`
    (:math:`N` = ``reset_warmup_steps``) and 1 otherwise. For complex gradients
    :math:`m` is complex and :math:`\operatorname{sign}(g) = g / |g|`. No learning rate
    is applied; see :func:`spam` for the full optimizer.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to :math:`\sqrt{v}` before the bias correction, >= 0 (the reference's
        1e-6).
      spike_threshold: :math:`\theta`, > 0; the paper's default is 5000.
      reset_interval: :math:`\Delta`, steps between moment resets, >= 0; 0 disables
        resets (and so the warm-up).
      reset_warmup_steps: :math:`N`, length of the cosine ramp after each reset, >= 0.
      clip_delay_steps: clipping is off for this many steps after the start and after
        each reset, while the second moment is still too small to judge a spike; >= 2
        (with less the first step would be clipped against :math:`v = 0`). The
        reference code's ``grad_accu_steps``, default 20.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`ScaleBySpamState`; updates keep the gradient dtype, the moments keep the
      parameters' sharding.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> from optstab.stability import baselines
      >>> tx = baselines.scale_by_spam(eps=0.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([0.5, -2.0]), state)
      >>> updates  # the first Adam step is sign(g) when eps = 0
      Array([ 1., -1.], dtype=float32)
      >>> int(state.num_clipped), int(state.num_resets)
      (0, 0)

    References:
      Huang et al., *SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
      Training*, ICLR 2025. https://arxiv.org/abs/2501.06842
    """
    _check("b1", b1, lambda x: 0 <= x < 1, "in [0, 1)")
    _check("b2", b2, lambda x: 0 <= x < 1, "in [0, 1)")
    _check("eps", eps, lambda x: x >= 0, ">= 0")
    _check("spike_threshold", spike_threshold, lambda x: x > 0, "> 0")
    _check("reset_interval", reset_interval, lambda x: x >= 0, ">= 0 (0 disables resets)")
    _check("reset_warmup_steps", reset_warmup_steps, lambda x: x >= 0, ">= 0")
    _check("clip_delay_steps", clip_delay_steps, lambda x: x >= 2, ">= 2")

    def init_fn(params):
        # zeros_like keeps each leaf's sharding, so the state's type does not change at the
        # first update (which lax.scan and explicit-sharding meshes require).
        return ScaleBySpamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: jnp.zeros_like(p, _stat_dtype(p)), params),
            nu=jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params),
            num_clipped=jnp.zeros([], jnp.int32),
            num_resets=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        step = optax.safe_increment(state.count)
        since_reset = _steps_since_reset(step, reset_interval)
        reset = (jnp.asarray(reset_interval) > 0) & (since_reset == 0)
        mu = optax.tree.where(reset, optax.tree.zeros_like(state.mu), state.mu)
        nu = optax.tree.where(reset, optax.tree.zeros_like(state.nu), state.nu)

        threshold = _f32(spike_threshold)
        clipping_on = since_reset >= jnp.asarray(clip_delay_steps)
        spikes = jax.tree.map(lambda s: s & clipping_on, _spam_spikes(updates, nu, threshold))
        grads = _spam_clip(updates, nu, spikes, threshold)

        (beta1, beta2), (rest1, rest2) = (_f32(b1), _f32(b2)), (_one_minus(b1), _one_minus(b2))
        mu = jax.tree.map(lambda m, g: beta1 * m + rest1 * g, mu, grads)
        nu = jax.tree.map(lambda v, g: beta2 * v + rest2 * _abs_sq(g), nu, grads)
        t = step.astype(jnp.float32)
        step_size = jnp.sqrt(_one_minus_power(rest2, t)) / _one_minus_power(rest1, t)
        factor = _spam_warmup_factor(step, reset_interval, reset_warmup_steps) * step_size

        def direction(m, v, u):
            return (factor * m / (jnp.sqrt(v) + _f32(eps))).astype(u.dtype)

        return jax.tree.map(direction, mu, nu, updates), ScaleBySpamState(
            count=step,
            mu=mu,
            nu=nu,
            num_clipped=state.num_clipped + _int32_sum(spikes),
            num_resets=state.num_resets + reset.astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SpamStepState(NamedTuple):
    """State of the learning-rate and weight-decay step of :func:`spam`."""

    count: jax.Array  # int32 scalar: steps taken, the argument of a learning-rate schedule


def _step_then_decay(
    learning_rate: ScalarOrSchedule, weight_decay: ArrayLike
) -> optax.GradientTransformationExtraArgs:
    """``-lr * u``, then the stepped parameters decay: ``p <- (p - lr * u) * (1 - lr * wd)``."""
    no_decay = is_concrete_number(weight_decay) and weight_decay == 0

    def init_fn(params):
        del params
        return SpamStepState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None and not no_decay:
            raise ValueError("spam with weight_decay needs params: call update(g, state, params)")
        lr = _f32(learning_rate(state.count) if callable(learning_rate) else learning_rate)
        decay = lr * _f32(weight_decay)

        def step(u, p):
            stepped = -lr * _upcast(u)
            if not no_decay:
                stepped = stepped - decay * (_upcast(p) + stepped)
            return stepped.astype(u.dtype)

        params = updates if params is None else params
        new_updates = jax.tree.map(step, updates, params)
        return new_updates, SpamStepState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    weight_decay: ArrayLike = 0.0,
    spike_threshold: ArrayLike = 5000.0,
    reset_interval: ArrayLike = 500,
    reset_warmup_steps: ArrayLike = 150,
    clip_delay_steps: ArrayLike = 20,
) -> optax.GradientTransformationExtraArgs:
    r"""The SPAM optimizer: :func:`scale_by_spam`, a learning-rate step, then weight decay.

    As in the reference code, the parameters first take the step and then decay:

    .. math::

      p \leftarrow (p - \eta_t u_t)(1 - \eta_t \lambda), \qquad\text{i.e.}\qquad
      \Delta p = -\eta_t (1 - \eta_t \lambda)\, u_t - \eta_t \lambda\, p

    with :math:`u_t` the output of :func:`scale_by_spam` (its post-reset warm-up factor
    included; the factor does not scale the decay) and :math:`\lambda` =
    ``weight_decay``. This differs from AdamW's :math:`-\eta_t (u_t + \lambda p)` by
    :math:`\eta_t^2 \lambda u_t`.

    Args:
      learning_rate: :math:`\eta_t`, a float or an ``optax`` schedule.
      b1, b2, eps, spike_threshold, reset_interval, reset_warmup_steps, clip_delay_steps:
        see :func:`scale_by_spam`.
      weight_decay: :math:`\lambda`, decoupled weight decay, >= 0; with a non-zero (or
        traced) value ``update`` needs ``params``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``, the chain of :func:`scale_by_spam`
      and the step above.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> from optstab.stability import baselines
      >>> params = jnp.array([1.0, -1.0])
      >>> tx = baselines.spam(learning_rate=0.1, eps=0.0, weight_decay=0.5)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([0.3, -0.2]), state, params)
      >>> optax.apply_updates(params, updates)  # (p - 0.1 * sign(g)) * (1 - 0.1 * 0.5)
      Array([ 0.855, -0.855], dtype=float32)

    References:
      Huang et al., *SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
      Training*, ICLR 2025. https://arxiv.org/abs/2501.06842
    """
    _check("learning_rate", learning_rate, lambda x: x >= 0, ">= 0")
    _check("weight_decay", weight_decay, lambda x: x >= 0, ">= 0")
    return optax.chain(
        scale_by_spam(
            b1=b1,
            b2=b2,
            eps=eps,
            spike_threshold=spike_threshold,
            reset_interval=reset_interval,
            reset_warmup_steps=reset_warmup_steps,
            clip_delay_steps=clip_delay_steps,
        ),
        _step_then_decay(learning_rate, weight_decay),
    )


# ----------------------------------------------------------------------------------------
# ZClip
# ----------------------------------------------------------------------------------------


class ZClipState(NamedTuple):
    """State of :func:`zclip`."""

    count: jax.Array  # int32 scalar: finite gradient norms seen (warm-up ends at warmup_steps)
    mean: jax.Array  # float32 scalar: warm-up running mean, then EMA mean of post-clip norms
    var: jax.Array  # float32 scalar: warm-up population variance, then EMA variance
    num_clipped: jax.Array  # int32 scalar: *steps* rescaled by the z-score rule
    num_capped: jax.Array  # int32 scalar: *steps* whose norm the max_norm cap lowered


def _running_moments(mean, var, n, x):
    """Mean and population variance of ``n`` values from those of the first ``n - 1``."""
    delta = x - mean
    new_mean = mean + delta / n
    return new_mean, var + (delta * (x - new_mean) - var) / n


def _ema_moments(mean, var, alpha, x):
    """ZClip's EMA update; the variance uses the deviation from the *updated* mean."""
    keep, rest = _f32(alpha), _one_minus(alpha)
    new_mean = keep * mean + rest * x
    return new_mean, keep * var + rest * jnp.square(x - new_mean)


def _reciprocal_z_target(norm, mean, var, z_threshold, eps):
    """Whether ``norm`` is a spike, and the norm ZClip rescales a spike to."""
    std = jnp.sqrt(var)
    z = (norm - mean) / (std + eps)
    return z > z_threshold, mean + jnp.square(z_threshold) / z * std


def _zclip_factor(norm, adaptive, warming_up, max_norm, eps):
    """The reference's rescaling factor of the gradient.

    During warm-up ``torch.nn.utils.clip_grad_norm_(max_norm)``: ``min(1, max_norm / (norm
    + eps))``. After it, the bound ``min(adaptive, max_norm)`` applies when the norm
    exceeds it, with the factor ``bound / (norm + eps)``.
    """
    if max_norm is None:
        return jnp.where(~warming_up & (norm > adaptive), adaptive / (norm + eps), 1.0)
    cap = _f32(max_norm)
    bound = jnp.minimum(adaptive, cap)
    after_warmup = jnp.where(norm > bound, bound / (norm + eps), 1.0)
    return jnp.where(warming_up, jnp.minimum(1.0, cap / (norm + eps)), after_warmup)


def zclip(
    alpha: ArrayLike = 0.97,
    z_threshold: ArrayLike = 2.5,
    warmup_steps: ArrayLike = 25,
    eps: ArrayLike = 1e-6,
    max_norm: ArrayLike | None = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""ZClip: rescales a gradient whose global norm is a z-score outlier of its history.

    With :math:`\|g\|` the global gradient norm and :math:`\mu, \sigma^2` the EMA mean and
    variance of past (post-clip) norms:

    .. math::

      z = \frac{\|g\| - \mu}{\sigma + \epsilon}, \qquad
      b = \begin{cases} \mu + (z_{\rm thr}^2 / z)\, \sigma & z > z_{\rm thr} \\
        \|g\| & \text{otherwise} \end{cases}, \qquad
      g \leftarrow \frac{\min(b, c)}{\|g\| + \epsilon}\, g
      \quad \text{if } \|g\| > \min(b, c)

    with :math:`c` = ``max_norm``; then :math:`\mu \leftarrow \alpha \mu + (1 - \alpha) b`
    and :math:`\sigma^2 \leftarrow \alpha \sigma^2 + (1 - \alpha) (b - \mu)^2` (new
    :math:`\mu`): the EMAs see the z-clipped norm, not the cap. The larger the outlier,
    the closer to :math:`\mu` it is pulled. For the first ``warmup_steps`` steps there is
    no z-score; the gradient is only capped (factor :math:`\min(1, c / (\|g\| +
    \epsilon))`) and :math:`\mu, \sigma^2` start as the mean and population variance of
    those steps' norms. Place it before the optimizer in ``optax.chain``. A non-finite
    norm passes through unchanged and is not recorded. Complex leaves count with
    :math:`|z|`.

    Args:
      alpha: EMA decay of the norm statistics, in [0, 1).
      z_threshold: :math:`z_{\rm thr}`, > 0.
      warmup_steps: steps that only collect norms, >= 1.
      eps: added to :math:`\sigma` in the z-score and to the norm in the clip factor,
        >= 0 (the reference's 1e-6 in both).
      max_norm: :math:`c`, a cap on the global norm at every step (warm-up included),
        > 0, or ``None`` for no cap. The reference's ``max_grad_norm``, default 1.0; its
        scale is the gradient's, so set it for your model (or ``None``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`ZClipState`.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> from optstab.stability import baselines
      >>> tx = baselines.zclip(warmup_steps=3, eps=0.0, max_norm=None)
      >>> state = tx.init(jnp.zeros(2))
      >>> for norm in (1.0, 2.0, 3.0):  # warm-up: mean 2, variance 2/3
      ...     _, state = tx.update(jnp.array([norm, 0.0]), state)
      >>> updates, state = tx.update(jnp.array([30.0, 40.0]), state)  # norm 50
      >>> round(float(optax.tree.norm(updates)), 4)  # 2 + 2.5**2 / z * sqrt(2/3)
      2.0868
      >>> int(state.num_clipped)
      1

    References:
      Kumar et al., *ZClip: Adaptive Spike Mitigation for LLM Pre-Training*, 2025.
      https://arxiv.org/abs/2504.02507
    """
    _check("alpha", alpha, lambda x: 0 <= x < 1, "in [0, 1)")
    _check("z_threshold", z_threshold, lambda x: x > 0, "> 0")
    _check("warmup_steps", warmup_steps, lambda x: x >= 1, ">= 1")
    _check("eps", eps, lambda x: x >= 0, ">= 0")
    _check("max_norm", max_norm, lambda x: x > 0, "> 0 or None")

    def init_fn(params):
        del params
        # A fresh buffer per field, so that the state can be donated to a jitted step.
        f32, i32 = (lambda: jnp.zeros([], jnp.float32)), (lambda: jnp.zeros([], jnp.int32))
        return ZClipState(count=i32(), mean=f32(), var=f32(), num_clipped=i32(), num_capped=i32())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = _global_norm(updates)
        finite = jnp.isfinite(norm)
        warming_up = state.count < jnp.asarray(warmup_steps)

        spike, target = _reciprocal_z_target(
            norm, state.mean, state.var, _f32(z_threshold), _f32(eps)
        )
        spike = spike & finite & ~warming_up
        adaptive = jnp.where(spike, target, norm)
        factor = _zclip_factor(norm, adaptive, warming_up, max_norm, _f32(eps))
        factor = jnp.where(finite, factor, 1.0)
        capped = finite & (_f32(jnp.inf if max_norm is None else max_norm) < adaptive)

        count = optax.safe_increment(state.count)
        warm_mean, warm_var = _running_moments(state.mean, state.var, count, norm)
        ema_mean, ema_var = _ema_moments(state.mean, state.var, alpha, adaptive)
        mean = jnp.where(warming_up, warm_mean, ema_mean)
        var = jnp.where(warming_up, warm_var, ema_var)

        return _scale_tree(updates, factor), ZClipState(
            count=jnp.where(finite, count, state.count),
            mean=jnp.where(finite, mean, state.mean),
            var=jnp.where(finite, var, state.var),
            num_clipped=state.num_clipped + spike.astype(jnp.int32),
            num_capped=state.num_capped + capped.astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# AdaGC
# ----------------------------------------------------------------------------------------


class AdaGCState(NamedTuple):
    """State of :func:`adagc`; per-tensor vectors follow ``optstab.tree.make_partition``."""

    count: jax.Array  # int32 scalar: steps taken (warm-up while count < warmup_steps)
    gamma: jax.Array  # float32 (num_leaves,): EMA of each tensor's clipped norm; 0 = unset
    num_clipped: jax.Array  # int32 scalar: *tensor* clips after warm-up, summed over steps
    num_warmup_clipped: jax.Array  # int32 scalar: warm-up *steps* where the global clip fired


def _warmup_global_clip(norms, gamma, warmup_clip, eps):
    """AdaGC warm-up: one global-norm clip; each tensor's gamma is its smallest clipped norm.

    Returns the per-tensor scale, the new gamma and whether the clip fired.
    """
    global_norm = jnp.sqrt(jnp.sum(jnp.square(norms)))
    finite = jnp.isfinite(global_norm)
    scale = jnp.where(finite, jnp.minimum(1.0, warmup_clip / (global_norm + eps)), 1.0)
    clipped = norms * scale
    record = finite & (clipped > 0)
    smallest = jnp.where(gamma > 0, jnp.minimum(gamma, clipped), clipped)
    new_gamma = jnp.where(record, smallest, gamma)
    return jnp.broadcast_to(scale, norms.shape), new_gamma, scale < 1


def _relative_clip(norms, gamma, relative_threshold, decay, eps):
    """AdaGC proper: clip each tensor to ``relative_threshold * gamma``, then update gamma.

    As in the reference, a tensor is clipped when its norm exceeds the bound, by the factor
    ``bound / (norm + eps)``, and the EMA records the bound itself. Returns the per-tensor
    scale, the new gamma and which tensors were clipped.
    """
    finite = jnp.isfinite(norms)
    bound = relative_threshold * gamma
    clip = (gamma > 0) & finite & (norms > bound)
    scale = jnp.where(clip, bound / (norms + eps), 1.0)
    recorded = jnp.where(clip, bound, norms)
    ema = _f32(decay) * gamma + _one_minus(decay) * recorded
    ema = jnp.where(gamma > 0, ema, recorded)
    return scale, jnp.where(finite, ema, gamma), clip


def adagc(
    relative_threshold: ArrayLike = 1.04,
    decay: ArrayLike = 0.99,
    warmup_steps: ArrayLike = 100,
    warmup_clip: ArrayLike = 1.0,
    eps: ArrayLike = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGC: clips each tensor against the EMA of its own clipped gradient norms.

    For each tensor (pytree leaf) :math:`i`, after warm-up, with
    :math:`b_i = \lambda \gamma_i`:

    .. math::

      g_i \leftarrow \frac{b_i}{\|g_i\| + \epsilon}\, g_i \quad \text{if } \|g_i\| > b_i,
      \qquad
      \gamma_i \leftarrow \beta \gamma_i + (1 - \beta) \min(\|g_i\|, b_i)

    During the first ``warmup_steps`` steps the gradient is instead clipped to global
    norm ``warmup_clip`` (:math:`h = \min(1, c / (\|g\| + \epsilon))` for all tensors) and
    :math:`\gamma_i` is the smallest clipped norm tensor :math:`i` has had. The defaults
    are those of the authors' released code and run script (:math:`\lambda = 1.04`,
    :math:`\beta = 0.99`, :math:`c = 1`, 100 warm-up steps; the paper's text gives
    :math:`\lambda = 1.05`, :math:`\beta = 0.98`). Ours: :math:`\gamma_i = 0` means no
    norm recorded yet (tensor :math:`i` is not clipped until one is), zero norms are not
    recorded during warm-up, and a tensor whose norm is not finite passes through
    unchanged and keeps its :math:`\gamma_i`. Norms of complex leaves are of :math:`|z|`.

    Args:
      relative_threshold: :math:`\lambda`, > 0.
      decay: :math:`\beta`, EMA decay of the clipped norms, in [0, 1).
      warmup_steps: steps of global-norm clipping that seed :math:`\gamma`, >= 0.
      warmup_clip: :math:`c`, the warm-up global-norm bound, > 0.
      eps: added to the norm in both clip factors, >= 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`AdaGCState`;
      place it before the optimizer in ``optax.chain``.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> from optstab.stability import baselines
      >>> tx = baselines.adagc(warmup_steps=1, warmup_clip=10.0, eps=0.0)
      >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
      >>> state = tx.init(grads)
      >>> _, state = tx.update(grads, state)  # warm-up: gamma = (5, 1)
      >>> spike = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([1.0])}
      >>> updates, state = tx.update(spike, state)
      >>> round(float(optax.tree.norm(updates["a"])), 4)  # clipped to 1.04 * 5
      5.2
      >>> updates["b"]  # untouched
      Array([1.], dtype=float32)

    References:
      Wang et al., *AdaGC: Improving Training Stability for Large Language Model
      Pretraining*, 2025. https://arxiv.org/abs/2502.11034
    """
    _check("relative_threshold", relative_threshold, lambda x: x > 0, "> 0")
    _check("decay", decay, lambda x: 0 <= x < 1, "in [0, 1)")
    _check("warmup_steps", warmup_steps, lambda x: x >= 0, ">= 0")
    _check("warmup_clip", warmup_clip, lambda x: x > 0, "> 0")
    _check("eps", eps, lambda x: x >= 0, ">= 0")

    def init_fn(params):
        partition = otree.make_partition(params)
        return AdaGCState(
            count=jnp.zeros([], jnp.int32),
            gamma=jnp.zeros((partition.num_units,), jnp.float32),
            num_clipped=jnp.zeros([], jnp.int32),
            num_warmup_clipped=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        partition = otree.make_partition(updates)
        norms = otree.unit_norms(partition, updates)
        warm_scale, warm_gamma, warm_fired = _warmup_global_clip(
            norms, state.gamma, _f32(warmup_clip), _f32(eps)
        )
        rel_scale, rel_gamma, rel_clipped = _relative_clip(
            norms, state.gamma, _f32(relative_threshold), decay, _f32(eps)
        )
        warming_up = state.count < jnp.asarray(warmup_steps)
        scale = jnp.where(warming_up, warm_scale, rel_scale)
        num_rel_clipped = jnp.sum(rel_clipped, dtype=jnp.int32)
        return otree.scale_units(partition, updates, scale), AdaGCState(
            count=optax.safe_increment(state.count),
            gamma=jnp.where(warming_up, warm_gamma, rel_gamma),
            num_clipped=state.num_clipped + jnp.where(warming_up, 0, num_rel_clipped),
            num_warmup_clipped=state.num_warmup_clipped
            + (warming_up & warm_fired).astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# Skip-step
# ----------------------------------------------------------------------------------------


class SkipStepState(NamedTuple):
    """State of :func:`skip_step`."""

    inner_state: optax.OptState  # the wrapped transform's state; untouched on skipped steps
    history: jax.Array  # float32 (2, window): ring buffers of the gradient norm and the loss
    next_index: jax.Array  # int32 scalar: slot of history the next recorded values go to
    num_values: jax.Array  # int32 scalar: filled slots of history, at most window
    num_skipped: jax.Array  # int32 scalar: *steps* skipped so far
    skip_streak: jax.Array  # int32 scalar: finite outlier steps skipped in a row until now


def _window_mean_std(history: jax.Array, num_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row, mean and sample (n - 1) standard deviation of the first ``num_values`` slots."""
    valid = jnp.arange(history.shape[-1]) < num_values
    n = jnp.maximum(num_values, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, history, 0.0), axis=-1) / n
    squares = jnp.sum(jnp.where(valid, jnp.square(history - mean[:, None]), 0.0), axis=-1)
    return mean, jnp.sqrt(squares / jnp.maximum(n - 1.0, 1.0))


def skip_step(
    inner: optax.GradientTransformation,
    window: int = 128,
    num_sigma: ArrayLike = 6.0,
    min_history: ArrayLike | None = None,
    shift_patience: ArrayLike | None = 16,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips a step whose gradient norm or loss is an outlier of the recent history.

    The gradient norm is always monitored; the loss too when ``update`` is called with
    the extra argument ``loss=`` (pass it always or never: its window fills only then).
    With :math:`\bar x, s` the mean and sample standard deviation of a monitored value
    over the last ``window`` recorded steps, step :math:`t` is skipped when

    .. math::

      n \ge \text{min\_history} \text{ and } x_t > \bar x + k s
      \text{ for the loss or the norm}, \quad \text{or } x_t \text{ is not finite}

    with :math:`n` the number of recorded steps and :math:`k` = ``num_sigma``. A skipped
    step outputs zero updates and leaves the inner state bit-for-bit as it was (no
    moment or count advance); otherwise the inner transform runs as usual. Extra
    arguments, ``loss`` included, are passed on to ``inner``. The gradient norm of complex
    leaves is that of :math:`|z|`.

    What the window records: the values of accepted steps, so that a spike does not
    widen the band that judges the next steps. A lasting shift of the monitored values
    (a new loss level, a deterministic objective whose gradient norm drifts up) would
    then be skipped for good, so once ``shift_patience`` finite outlier steps have been
    skipped in a row, the window also records the skipped steps' values until a step is
    accepted: after :math:`P` + a few skipped steps it has learned the new level. Spikes
    shorter than :math:`P` steps never enter it. ``shift_patience=0`` records every
    finite step, as OLMo-core, Levanter and MaxText do; ``None`` records accepted steps
    only (a lasting shift then stalls training; watch ``num_skipped``).

    Args:
      inner: the transform (usually a full optimizer) to protect.
      window: number of recorded steps kept, a Python ``int`` >= 2 (it is a buffer
        shape; with ``optax.inject_hyperparams`` pass ``static_args="window"``).
      num_sigma: :math:`k`, >= 0.
      min_history: values needed in the window before a step may be skipped for being
        an outlier, in [2, window]; default ``max(2, window // 2)`` (64 for the default
        window, as in OLMo-core, Levanter and MaxText). Non-finite steps are always
        skipped.
      shift_patience: :math:`P`, >= 0, or ``None``; see above. Default 16: longer than a
        burst of spikes, short against a run.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`SkipStepState`.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> from optstab.stability import baselines
      >>> tx = baselines.skip_step(optax.sgd(0.1), window=4, min_history=2)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for loss in (1.0, 1.1, 0.9):
      ...     _, state = tx.update(jnp.ones(2), state, params, loss=loss)
      >>> updates, state = tx.update(jnp.ones(2), state, params, loss=9.0)
      >>> updates, int(state.num_skipped)
      (Array([0., 0.], dtype=float32), 1)

    References:
      OLMo-core ``SkipStepOptimizer`` (https://github.com/allenai/OLMo-core), Levanter
      ``SkipStepConfig`` (https://github.com/stanford-crfm/levanter), MaxText
      ``skip_step_on_spikes`` (https://github.com/AI-Hypercomputer/maxtext); OLMo Team,
      *2 OLMo 2 Furious*, 2024, https://arxiv.org/abs/2501.00656.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(
            f"window must be a Python int >= 2 (it is a buffer shape; pass "
            f"static_args='window' to optax.inject_hyperparams), got {window!r}"
        )
    if min_history is None:
        min_history = max(2, window // 2)
    _check("min_history", min_history, lambda x: 2 <= x <= window, f"in [2, window={window}]")
    _check("num_sigma", num_sigma, lambda x: x >= 0, ">= 0")
    _check("shift_patience", shift_patience, lambda x: x >= 0, ">= 0 or None")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        i32 = lambda: jnp.zeros([], jnp.int32)  # noqa: E731  (a fresh buffer per field)
        return SkipStepState(
            inner_state=inner.init(params),
            history=jnp.zeros((2, window), jnp.float32),
            next_index=i32(),
            num_values=i32(),
            num_skipped=i32(),
            skip_streak=i32(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        grad_norm = _global_norm(updates)
        loss = extra_args.get("loss")
        values = jnp.stack([grad_norm, grad_norm if loss is None else _f32(loss)])
        monitored = jnp.array([True, loss is not None])

        mean, std = _window_mean_std(state.history, state.num_values)
        enough_history = state.num_values >= jnp.asarray(min_history)
        above = monitored & (values > mean + _f32(num_sigma) * std)
        finite = jnp.all(jnp.isfinite(values))
        outlier = finite & enough_history & jnp.any(above)
        skip = outlier | ~finite
        learning = (
            False if shift_patience is None else state.skip_streak >= jnp.asarray(shift_patience)
        )
        record = finite & (~skip | learning)

        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        new_updates = optax.tree.where(skip, optax.tree.zeros_like(new_updates), new_updates)
        new_history = state.history.at[:, state.next_index].set(values)
        return new_updates, SkipStepState(
            inner_state=optax.tree.where(skip, state.inner_state, new_inner),
            history=jnp.where(record, new_history, state.history),
            next_index=jnp.where(record, (state.next_index + 1) % window, state.next_index),
            num_values=jnp.where(
                record, jnp.minimum(state.num_values + 1, window), state.num_values
            ),
            num_skipped=state.num_skipped + skip.astype(jnp.int32),
            skip_streak=jnp.where(
                outlier,
                optax.safe_increment(state.skip_streak),
                jnp.where(skip, state.skip_streak, 0),
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
