"""Published gradient-spike mitigations, as Optax transforms, to compare optstab against.

Four peer baselines, each reimplemented from its paper (and, where the paper leaves a
detail open, from its authors' reference code):

* :func:`spam` / :func:`scale_by_spam` -- **SPAM**, Spike-Aware Adam with Momentum Reset
  (Huang et al., ICLR 2025, https://arxiv.org/abs/2501.06842). Per element: a gradient
  with ``g**2 > theta * v`` is clipped to ``sign(g) * sqrt(theta * v)``; Adam's moments
  are zeroed every ``reset_interval`` steps and the step size is ramped back up along a
  cosine over ``reset_warmup_steps`` steps after each reset.
* :func:`zclip` -- **ZClip** (Kumar et al., 2025, https://arxiv.org/abs/2504.02507).
  Global: the z-score of the gradient norm against an EMA mean and variance; a spike is
  rescaled to the "reciprocal" norm ``mu + (z_threshold**2 / z) * sigma``.
* :func:`adagc` -- **AdaGC** (Wang et al., 2025, https://arxiv.org/abs/2502.11034).
  Per tensor: a gradient whose norm exceeds ``relative_threshold`` times the EMA of that
  tensor's own clipped norms is rescaled down to that bound.
* :func:`skip_step` -- **skip-step** as in OLMo-core's ``SkipStepOptimizer``, Levanter's
  ``SkipStepConfig`` and MaxText: a step whose gradient norm (or loss) is more than
  ``num_sigma`` standard deviations above the mean of a rolling window is skipped; the
  wrapped optimizer's state is left exactly as it was.

What is published and what is ours
----------------------------------
Published (paper or authors' code), kept as is: every rule and default above; SPAM's
bias correction with the global step count (it is not restarted by a reset) and its
warm-up factor ``1 - 0.99 * (1 + cos(pi * s / (N + 1))) / 2``, ``s`` steps after a reset
(there is no such warm-up before the first reset); SPAM clipping only once
``clip_delay_steps`` (20, the reference's ``grad_accu_steps``) steps have passed since the
start or the last reset; ZClip's warm-up, which only collects norms and then starts the
EMAs at their mean and population variance, and its EMA updates with the post-clip norm
(the variance update uses the already updated mean); AdaGC's warm-up, a global-norm clip
at ``warmup_clip`` (the paper's lambda_abs = 1.0 for T_start = 100 steps) during which
each tensor's EMA is the *minimum* of its clipped norms.

Ours:

* Non-finite gradients. ZClip and AdaGC cannot repair a NaN or infinite norm: such a
  gradient (ZClip) or tensor (AdaGC) passes through unchanged and is left out of the
  running statistics, which would otherwise stay NaN for good. A downstream guard
  (:func:`skip_step`, ``optax.apply_if_finite``) still sees it. SPAM is left as
  published: an infinite element fails no test and is clipped like any spike once
  clipping is on, a NaN element fails the ``g**2 > theta * v`` test and flows into the
  moments until the next reset zeroes them. :func:`skip_step` always skips a step whose
  gradient norm or loss is not finite, even before its window has enough history.
* AdaGC: ``gamma = 0`` means "no norm recorded yet" and such a tensor is not clipped; a
  zero or non-finite norm is not recorded. The paper's ``min`` would otherwise pin the
  EMA of a tensor whose gradient is zero early in training (an unused embedding row) to
  zero and clip that tensor to zero for good. ``eps`` is added to the norm in both clip
  factors (the pytorch_optimizer port adds it in the warm-up clip only).
* SPAM: ``eps`` is added to the bias-corrected root of the second moment (optax's Adam
  convention); the reference code adds it before the bias correction.
* ZClip: no fixed ``max_grad_norm`` clip during warm-up (the reference code's optional
  extra), and the spike is rescaled by exactly ``target / norm``.
* skip-step: the window holds the last ``window`` values of *accepted* steps only, so a
  spike does not widen the band that judges the next step (OLMo-core and Levanter also
  record the values of skipped steps). The test is one-sided, ``value > mean + num_sigma *
  std`` with the sample (n - 1) standard deviation, and the default ``min_history`` is
  ``max(2, window // 2)`` as in Levanter. A lasting jump in the monitored value of more
  than ``num_sigma`` standard deviations therefore skips every later step; watch
  ``num_skipped``.

Every state is a ``NamedTuple`` whose statistics are float32 whatever the parameter
dtype, and which counts how often its mechanism fired (``num_clipped``, ``num_resets``,
``num_skipped``). Every transform is pure and jit-compatible, and every numeric
hyperparameter except ``skip_step``'s ``window`` (a buffer shape) may be a traced array,
so ``optax.inject_hyperparams`` works.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optstab import tree as otree
from optstab._checks import check_range as _check
from optstab.stability.warmup import reset_ramp

ArrayLike = jax.typing.ArrayLike
ScalarOrSchedule = float | jax.Array | optax.Schedule


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _scale_tree(tree: optax.Updates, factor: jax.Array) -> optax.Updates:
    """Multiplies every leaf by a float32 scalar in float32; each leaf keeps its dtype."""
    return jax.tree.map(lambda u: (u.astype(jnp.float32) * factor).astype(u.dtype), tree)


def _int32_sum(tree: Any) -> jax.Array:
    """Number of true elements in a pytree of boolean arrays, as an int32 scalar."""
    return sum((jnp.sum(x, dtype=jnp.int32) for x in jax.tree.leaves(tree)), jnp.int32(0))


# ----------------------------------------------------------------------------------------
# SPAM
# ----------------------------------------------------------------------------------------


class ScaleBySpamState(NamedTuple):
    """State of :func:`scale_by_spam`."""

    count: jax.Array  # int32 scalar: steps taken; never reset (bias correction, reset clock)
    mu: optax.Updates  # float32 pytree shaped like params: first moment, zeroed at resets
    nu: optax.Updates  # float32 pytree shaped like params: second moment, zeroed at resets
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
    """Elements whose squared gradient exceeds ``threshold`` times the second moment."""
    return jax.tree.map(lambda g, v: jnp.square(g.astype(jnp.float32)) > threshold * v, grads, nu)


def _spam_clip(grads: optax.Updates, nu: optax.Updates, spikes: Any, threshold: jax.Array):
    """Replaces each spiking element by ``sign(g) * sqrt(threshold * v)``, in float32."""

    def clip(g, v, spike):
        g = g.astype(jnp.float32)
        return jnp.where(spike, jnp.sign(g) * jnp.sqrt(threshold * v), g)

    return jax.tree.map(clip, grads, nu, spikes)


def scale_by_spam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
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
        \quad \text{if } g_i^2 > \theta v_i \text{ and } s \ge \text{clip\_delay\_steps} \\
      m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
      u &= \phi(s) \, \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}

    where :math:`v` in the clip test is the second moment of the previous step, the bias
    correction uses the global :math:`t`, and after the first reset
    :math:`\phi(s) = 1 - 0.99 (1 + \cos(\pi s / (N + 1))) / 2` for :math:`s < N`
    (:math:`N` = ``reset_warmup_steps``) and 1 otherwise. No learning rate is applied;
    see :func:`spam` for the full optimizer.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the root of the second moment, >= 0.
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
      :class:`ScaleBySpamState`; updates keep the gradient dtype.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> from optstab.stability import baselines
      >>> tx = baselines.scale_by_spam()
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([0.5, -2.0]), state)
      >>> updates  # the first Adam step is sign(g), up to eps
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
        def zeros():
            return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

        return ScaleBySpamState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros(),
            nu=zeros(),
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
        spikes = _spam_spikes(updates, nu, threshold)
        clipping_on = since_reset >= jnp.asarray(clip_delay_steps)
        spikes = jax.tree.map(lambda s: s & clipping_on, spikes)
        grads = _spam_clip(updates, nu, spikes, threshold)

        beta1, beta2 = _f32(b1), _f32(b2)
        mu = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, mu, grads)
        nu = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * jnp.square(g), nu, grads)
        t = step.astype(jnp.float32)
        correction1, correction2 = 1 - beta1**t, 1 - beta2**t
        factor = _spam_warmup_factor(step, reset_interval, reset_warmup_steps)

        def direction(m, v, u):
            adam = (m / correction1) / (jnp.sqrt(v / correction2) + _f32(eps))
            return (factor * adam).astype(u.dtype)

        new_updates = jax.tree.map(direction, mu, nu, updates)
        return new_updates, ScaleBySpamState(
            count=step,
            mu=mu,
            nu=nu,
            num_clipped=state.num_clipped + _int32_sum(spikes),
            num_resets=state.num_resets + reset.astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 0.0,
    spike_threshold: ArrayLike = 5000.0,
    reset_interval: ArrayLike = 500,
    reset_warmup_steps: ArrayLike = 150,
    clip_delay_steps: ArrayLike = 20,
) -> optax.GradientTransformationExtraArgs:
    r"""The SPAM optimizer: :func:`scale_by_spam`, decoupled weight decay, learning rate.

    .. math::

      \Delta p = -\eta_t \left( u_t + \lambda p \right)

    with :math:`u_t` the output of :func:`scale_by_spam` (its post-reset warm-up factor
    included) and :math:`\lambda` = ``weight_decay``; as in the reference code, the
    warm-up factor does not scale the weight decay.

    Args:
      learning_rate: :math:`\eta_t`, a float or an ``optax`` schedule.
      b1, b2, eps, spike_threshold, reset_interval, reset_warmup_steps, clip_delay_steps:
        see :func:`scale_by_spam`.
      weight_decay: :math:`\lambda`, decoupled (AdamW-style) weight decay, >= 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``optax.chain(scale_by_spam(...),
      optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(...))``.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> from optstab.stability import baselines
      >>> params = jnp.array([1.0, -1.0])
      >>> tx = baselines.spam(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([0.3, -0.2]), state, params)
      >>> optax.apply_updates(params, updates)
      Array([ 0.9, -0.9], dtype=float32)

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
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


# ----------------------------------------------------------------------------------------
# ZClip
# ----------------------------------------------------------------------------------------


class ZClipState(NamedTuple):
    """State of :func:`zclip`."""

    count: jax.Array  # int32 scalar: finite gradient norms seen (warm-up ends at warmup_steps)
    mean: jax.Array  # float32 scalar: warm-up running mean, then EMA mean of post-clip norms
    var: jax.Array  # float32 scalar: warm-up population variance, then EMA variance
    num_clipped: jax.Array  # int32 scalar: *steps* whose gradient was rescaled


def _running_moments(mean, var, n, x):
    """Mean and population variance of ``n`` values from those of the first ``n - 1``."""
    delta = x - mean
    new_mean = mean + delta / n
    return new_mean, var + (delta * (x - new_mean) - var) / n


def _ema_moments(mean, var, alpha, x):
    """ZClip's EMA update; the variance uses the deviation from the *updated* mean."""
    new_mean = alpha * mean + (1 - alpha) * x
    return new_mean, alpha * var + (1 - alpha) * jnp.square(x - new_mean)


def _reciprocal_z_target(norm, mean, var, z_threshold, eps):
    """Whether ``norm`` is a spike, and the norm ZClip rescales a spike to."""
    std = jnp.sqrt(var)
    z = (norm - mean) / (std + eps)
    return z > z_threshold, mean + jnp.square(z_threshold) / z * std


def zclip(
    alpha: ArrayLike = 0.97,
    z_threshold: ArrayLike = 2.5,
    warmup_steps: ArrayLike = 25,
    eps: ArrayLike = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""ZClip: rescales a gradient whose global norm is a z-score outlier of its history.

    With :math:`\|g\|` the global gradient norm and :math:`\mu, \sigma^2` the EMA mean and
    variance of past (post-clip) norms:

    .. math::

      z = \frac{\|g\| - \mu}{\sigma + \epsilon}, \qquad
      g \leftarrow \frac{\mu + (z_{\rm thr}^2 / z)\, \sigma}{\|g\|} \, g
      \quad \text{if } z > z_{\rm thr}

    then, with :math:`x` the norm after clipping,
    :math:`\mu \leftarrow \alpha \mu + (1 - \alpha) x` and
    :math:`\sigma^2 \leftarrow \alpha \sigma^2 + (1 - \alpha) (x - \mu)^2` (new
    :math:`\mu`). The larger the outlier, the closer to :math:`\mu` it is pulled. For the
    first ``warmup_steps`` steps nothing is clipped; :math:`\mu, \sigma^2` start as the
    mean and population variance of those steps' norms. Place it before the optimizer in
    ``optax.chain``. A non-finite norm passes through unchanged and is not recorded.

    Args:
      alpha: EMA decay of the norm statistics, in [0, 1).
      z_threshold: :math:`z_{\rm thr}`, > 0.
      warmup_steps: steps that only collect norms, >= 1.
      eps: added to :math:`\sigma` in the z-score, >= 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`ZClipState`.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> from optstab.stability import baselines
      >>> tx = baselines.zclip(warmup_steps=3)
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

    def init_fn(params):
        del params
        # A fresh buffer per field, so that the state can be donated to a jitted step.
        f32, i32 = (lambda: jnp.zeros([], jnp.float32)), (lambda: jnp.zeros([], jnp.int32))
        return ZClipState(count=i32(), mean=f32(), var=f32(), num_clipped=i32())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = otree.global_norm(updates)
        finite = jnp.isfinite(norm)
        warming_up = state.count < jnp.asarray(warmup_steps)

        spike, target = _reciprocal_z_target(
            norm, state.mean, state.var, _f32(z_threshold), _f32(eps)
        )
        spike = spike & finite & ~warming_up
        clipped_norm = jnp.where(spike, target, norm)

        count = optax.safe_increment(state.count)
        warm_mean, warm_var = _running_moments(state.mean, state.var, count, norm)
        ema_mean, ema_var = _ema_moments(state.mean, state.var, _f32(alpha), clipped_norm)
        mean = jnp.where(warming_up, warm_mean, ema_mean)
        var = jnp.where(warming_up, warm_var, ema_var)

        new_updates = _scale_tree(updates, jnp.where(spike, target / norm, 1.0))
        return new_updates, ZClipState(
            count=jnp.where(finite, count, state.count),
            mean=jnp.where(finite, mean, state.mean),
            var=jnp.where(finite, var, state.var),
            num_clipped=state.num_clipped + spike.astype(jnp.int32),
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

    Returns the per-tensor scale, the new gamma and which tensors were clipped.
    """
    finite = jnp.isfinite(norms)
    bound = relative_threshold * gamma / (norms + eps)
    scale = jnp.where((gamma > 0) & finite, jnp.minimum(1.0, bound), 1.0)
    clipped = norms * scale
    ema = jnp.where(gamma > 0, decay * gamma + (1 - decay) * clipped, clipped)
    return scale, jnp.where(finite, ema, gamma), scale < 1


def adagc(
    relative_threshold: ArrayLike = 1.05,
    decay: ArrayLike = 0.98,
    warmup_steps: ArrayLike = 100,
    warmup_clip: ArrayLike = 1.0,
    eps: ArrayLike = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGC: clips each tensor against the EMA of its own clipped gradient norms.

    For each tensor (pytree leaf) :math:`i`, after warm-up:

    .. math::

      h_i = \min\left(1, \frac{\lambda \gamma_i}{\|g_i\| + \epsilon}\right), \qquad
      g_i \leftarrow h_i g_i, \qquad
      \gamma_i \leftarrow \beta \gamma_i + (1 - \beta) \|h_i g_i\|

    During the first ``warmup_steps`` steps the gradient is instead clipped to global
    norm ``warmup_clip`` (:math:`h = \min(1, c / (\|g\| + \epsilon))` for all tensors) and
    :math:`\gamma_i` is the smallest clipped norm tensor :math:`i` has had. This is the
    paper's warm-up (lambda_abs = 1.0, T_start = 100 steps), so the defaults are the
    paper's. Ours: :math:`\gamma_i = 0` means no norm recorded yet (tensor :math:`i` is not
    clipped until one is), zero norms are not recorded during warm-up, and a tensor whose
    norm is not finite passes through unchanged and keeps its :math:`\gamma_i`.

    Args:
      relative_threshold: :math:`\lambda`, > 0 (the paper uses 1.05).
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
      >>> round(float(optax.tree.norm(updates["a"])), 4)  # clipped to 1.05 * 5
      5.25
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
            norms, state.gamma, _f32(relative_threshold), _f32(decay), _f32(eps)
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
    history: jax.Array  # float32 (window,): ring buffer of monitored values of accepted steps
    next_index: jax.Array  # int32 scalar: slot of history the next accepted value goes to
    num_values: jax.Array  # int32 scalar: filled slots of history, at most window
    num_skipped: jax.Array  # int32 scalar: *steps* skipped so far


def _window_mean_std(history: jax.Array, num_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and sample (n - 1) standard deviation of the first ``num_values`` slots."""
    valid = jnp.arange(history.shape[0]) < num_values
    n = jnp.maximum(num_values, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, history, 0.0)) / n
    squares = jnp.sum(jnp.where(valid, jnp.square(history - mean), 0.0))
    return mean, jnp.sqrt(squares / jnp.maximum(n - 1.0, 1.0))


def skip_step(
    inner: optax.GradientTransformation,
    window: int = 128,
    num_sigma: ArrayLike = 6.0,
    min_history: ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips a step whose gradient norm (or loss) is an outlier of the recent history.

    The monitored value :math:`x_t` is the loss when ``update`` is called with the extra
    argument ``loss=`` and the global gradient norm otherwise (pass ``loss`` always or
    never: both kinds go into the same window). With :math:`\bar x, s` the mean and sample
    standard deviation of the last ``window`` accepted values, step :math:`t` is skipped
    when

    .. math::

      n \ge \text{min\_history} \text{ and } x_t > \bar x + k s, \quad \text{or } x_t
      \text{ or } \|g_t\| \text{ is not finite}

    with :math:`n` the number of values in the window and :math:`k` = ``num_sigma``. A
    skipped step outputs zero updates, does not enter the window, and leaves the inner
    state bit-for-bit as it was (no moment or count advance); otherwise the inner
    transform runs as usual and :math:`x_t` is recorded. Extra arguments, ``loss``
    included, are passed on to ``inner``.

    Args:
      inner: the transform (usually a full optimizer) to protect.
      window: number of accepted values kept, a Python ``int`` >= 2 (it is a buffer
        shape; with ``optax.inject_hyperparams`` pass ``static_args="window"``).
      num_sigma: :math:`k`, >= 0.
      min_history: values needed in the window before a step may be skipped for being
        an outlier, in [2, window]; default ``max(2, window // 2)`` (64 for the default
        window, as in OLMo-core and Levanter). Non-finite steps are always skipped.

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
      ``SkipStepConfig`` (https://github.com/stanford-crfm/levanter); OLMo Team, *2 OLMo 2
      Furious*, 2024, https://arxiv.org/abs/2501.00656.
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
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipStepState(
            inner_state=inner.init(params),
            history=jnp.zeros((window,), jnp.float32),
            next_index=jnp.zeros([], jnp.int32),
            num_values=jnp.zeros([], jnp.int32),
            num_skipped=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        grad_norm = otree.global_norm(updates)
        loss = extra_args.get("loss")
        value = grad_norm if loss is None else _f32(loss)

        mean, std = _window_mean_std(state.history, state.num_values)
        enough_history = state.num_values >= jnp.asarray(min_history)
        outlier = enough_history & (value > mean + _f32(num_sigma) * std)
        skip = outlier | ~jnp.isfinite(value) | ~jnp.isfinite(grad_norm)

        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        new_updates = optax.tree.where(skip, optax.tree.zeros_like(new_updates), new_updates)
        accepted = ~skip
        return new_updates, SkipStepState(
            inner_state=optax.tree.where(skip, state.inner_state, new_inner),
            history=jnp.where(
                accepted, state.history.at[state.next_index].set(value), state.history
            ),
            next_index=jnp.where(accepted, (state.next_index + 1) % window, state.next_index),
            num_values=jnp.where(
                accepted, jnp.minimum(state.num_values + 1, window), state.num_values
            ),
            num_skipped=state.num_skipped + skip.astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
