"""Tests of the peer baselines in ``optstab.stability.baselines``.

Each method is checked against its authors' released code: the defaults are the
reference's, and a float64 transcription of the reference's step (written from the
reference file cited in the module docstring, not from our implementation) gives the
numbers our float32 transforms must reproduce. Then: the mechanism fires on a spike and
not on a benign stream, works under ``jax.jit``, with traced hyperparameters
(``optax.inject_hyperparams``), with bf16 and complex parameters.

Float32 error model used by the tolerances below: one rounding is at most
``EPS32 = 2**-24 = 6e-8`` relative; a float32 computation of ``k`` operations is within
``k * EPS32`` of the float64 one when nothing cancels.
"""

from __future__ import annotations

import doctest
import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optstab import tree as otree
from optstab.stability import baselines

EPS32 = 2.0**-24  # unit roundoff of float32

_JITTED: dict[int, tuple[optax.GradientTransformation, object]] = {}


def _jit_update(tx):
    """``jax.jit(tx.update)``, built once per transform so that tests share compilations."""
    if id(tx) not in _JITTED:
        _JITTED[id(tx)] = (tx, jax.jit(tx.update))  # keeps tx alive so its id stays unique
    return _JITTED[id(tx)][1]


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _norm(tree) -> float:
    """Global L2 norm of a pytree, in float64 numpy (of ``|z|`` for complex leaves)."""
    return math.sqrt(
        sum(np.sum(np.abs(np.asarray(x, np.complex128)) ** 2) for x in jax.tree.leaves(tree))
    )


def _run(tx, grads_seq, params=None, **extra_args):
    """Runs the jitted ``tx.update`` over a list of gradients; returns outputs and states."""
    params = grads_seq[0] if params is None else params
    update = _jit_update(tx)
    state = tx.init(params)
    outs, states = [], [state]
    for grads in grads_seq:
        out, state = update(grads, state, params, **extra_args)
        outs.append(out)
        states.append(state)
    return outs, states


def _assert_trees_equal(a, b):
    """Bit-identical pytrees: same structure, dtypes and values."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def _defaults(factory) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(factory).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# ------------------------------------------------------------------------------ SPAM


def _spam_reference(
    grads,
    params,
    *,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    weight_decay=0.0,
    warmup_steps=150,
    threshold=5000.0,
    delta_t=500,
    grad_accu_steps=20,
):
    """``AdamW.step`` of the SPAM reference code (galore_torch/SPAM.py) in float64 numpy.

    One parameter tensor, no ``density`` masks; the learning rate may be a list (one per
    step, as a scheduler sets ``group["lr"]``). Returns the parameters after each step
    and the number of clipped elements.
    """
    p = np.array(params, np.float64)
    exp_avg, exp_avg_sq = np.zeros_like(p), np.zeros_like(p)
    total_step, current_step, step, clipped = 0, warmup_steps + 1, 0, 0
    trajectory = []
    for i, g in enumerate(grads):
        g = np.array(g, np.float64)
        lr_t = lr[i] if isinstance(lr, list) else lr
        # CosineDecay(0.99, warmup_steps).get_dr: CosineAnnealingLR with T_max = N + 1
        # in closed form, 0 from current_step >= N on.
        if current_step >= warmup_steps:
            death_rate = 0.0
        else:
            death_rate = 0.99 * (1 + math.cos(math.pi * current_step / (warmup_steps + 1))) / 2
        scale_factor = 1 - death_rate
        if (total_step + 1) % delta_t == 0:
            exp_avg, exp_avg_sq = np.zeros_like(p), np.zeros_like(p)
        step += 1
        current = total_step + 1
        if threshold != 0 and current >= grad_accu_steps:
            mask = g**2 > threshold * exp_avg_sq
            if delta_t == 0 or current % delta_t >= grad_accu_steps:
                g = np.where(mask, np.sign(g) * np.sqrt(exp_avg_sq * threshold), g)
                clipped += int(mask.sum())
        exp_avg = b1 * exp_avg + (1.0 - b1) * g
        exp_avg_sq = b2 * exp_avg_sq + (1.0 - b2) * g * g
        denom = np.sqrt(exp_avg_sq) + eps
        step_size = lr_t * math.sqrt(1.0 - b2**step) / (1.0 - b1**step)
        p = p - step_size * scale_factor * exp_avg / denom
        if weight_decay > 0:
            p = p - lr_t * weight_decay * p
        total_step += 1
        current_step += 1
        if (total_step + 1) % delta_t == 0:
            current_step = 0
        trajectory.append(p.copy())
    return trajectory, clipped


def _spam_stream(num_steps, spikes, size=6, seed=0):
    """Gradients with |g| in [0.5, 1.5] and random signs; ``spikes`` maps a step (from 1)
    to the first of the elements ``first::2`` multiplied by 1e3 at that step.

    After ``k`` steps from a reset the second moment of an element is at least
    ``0.001 * k * 0.25``; with ``k >= 5`` (the clip delay used below) a benign element
    needs ``|g| > sqrt(5000 * 0.00125) = 2.5`` to be clipped, so only the spikes
    (``|g| >= 500``) are: no clip decision sits near its boundary.
    """
    rng = np.random.default_rng(seed)
    grads = rng.uniform(0.5, 1.5, (num_steps, size)) * rng.choice([-1.0, 1.0], (num_steps, size))
    for step, first in spikes.items():
        grads[step - 1, first::2] *= 1e3
    return [_f32(g) for g in grads]


def test_spam_defaults_are_the_reference_codes():
    # SPAM.py: betas (0.9, 0.999), eps 1e-6, threshold 5000, DeltaT 500, warmup_steps 150,
    # grad_accu_steps 20, weight_decay 0.
    want = {
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-6,
        "spike_threshold": 5000.0,
        "reset_interval": 500,
        "reset_warmup_steps": 150,
        "clip_delay_steps": 20,
    }
    assert _defaults(baselines.scale_by_spam) == want
    assert _defaults(baselines.spam) == {**want, "weight_decay": 0.0}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_spam_follows_the_reference_code_step_by_step(weight_decay):
    # 40 steps with resets at 12, 24, 36, a 4-step ramp after each, clipping from 5 steps
    # after each reset, and spikes on the even elements at 9 and 20 (clipped) and on the
    # odd ones at 13 (too soon after the reset at 12: it flows into their moments, as in
    # the reference).
    kw = {"delta_t": 12, "warmup_steps": 4, "grad_accu_steps": 5}
    lr, steps = 0.05, 40
    grads = _spam_stream(steps, spikes={9: 0, 13: 1, 20: 0})
    params0 = _f32(np.linspace(-1.0, 1.0, 6))
    want, want_clipped = _spam_reference(grads, params0, lr=lr, weight_decay=weight_decay, **kw)

    tx = baselines.spam(
        lr, weight_decay=weight_decay, reset_interval=12, reset_warmup_steps=4, clip_delay_steps=5
    )
    update, state, params = _jit_update(tx), tx.init(params0), jnp.asarray(params0)
    for t, g in enumerate(grads):
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        # Tolerance: the gradients are a fixed stream, so float32 errors do not feed back.
        # Each step's direction is ~20 float32 operations (20 * EPS32 = 1.2e-6 relative)
        # of size <= 3 (sqrt(1 - b2^t) / (1 - b1^t) * |m| / sqrt(v) stays below 3 here),
        # moved by lr = 0.05, plus one rounding of |p| <= 2: per step
        # 0.05 * 3 * 1.2e-6 + 2 * 6e-8 = 3e-7, over 40 steps 1.2e-5.
        np.testing.assert_allclose(params, want[t], rtol=0, atol=1.2e-5, err_msg=f"step {t + 1}")
    assert int(state[0].num_clipped) == want_clipped == 6  # 3 spiking elements, twice
    assert int(state[0].num_resets) == 3


def test_spam_one_minus_b2_is_not_rounded_from_float32():
    # The reference computes 1 - b2 = 0.001 from the Python float; 1 - float32(0.999)
    # would be 0.00099998713, 1.3e-5 off. After one step from zero, v = 0.001 * g**2
    # up to two float32 roundings (of 0.001 and of the product): 2 * EPS32.
    _, states = _run(baselines.scale_by_spam(), [_f32([2.0, -3.0])])
    np.testing.assert_allclose(states[-1].nu, [0.004, 0.009], rtol=2 * EPS32)
    np.testing.assert_allclose(states[-1].mu, [0.2, -0.3], rtol=2 * EPS32)


def test_spam_step_uses_eps_before_the_bias_correction():
    # First step, g = 1: m = 0.1, v = 0.001, and the reference's step is
    # sqrt(1 - 0.999) / (1 - 0.9) * 0.1 / (sqrt(0.001) + 1e-6) = sqrt(0.001) / (sqrt(0.001)
    # + 1e-6) = 0.99996838 (optax's placement would give 0.99999900). ~10 float32
    # operations: rtol 10 * EPS32.
    (out,), _ = _run(baselines.scale_by_spam(), [_f32([1.0])])
    want = math.sqrt(0.001) / (math.sqrt(0.001) + 1e-6)
    np.testing.assert_allclose(out, [want], rtol=10 * EPS32)
    assert abs(float(out[0]) - 0.999999) > 100 * EPS32


def test_spam_warmup_after_reset_is_the_half_cosine_ramp():
    # The reference's factor after a reset is 1 - CosineAnnealingLR(0.99, T_max = N + 1)
    # at s steps since the reset, i.e. 1 - 0.99 * (1 + cos(pi * s / (N + 1))) / 2 for
    # s < N, else 1; before the first reset it is 1 (current_step starts at N + 1).
    # With N = 3 by hand: s = 0: 1 - 0.99 = 0.01; s = 1: 1 - 0.495 * (1 + sqrt(2) / 2)
    # = 0.15498214; s = 2: 1 - 0.495 = 0.505; s = 3: 1.
    ramp = {0: 0.01, 1: 0.15498214, 2: 0.505, 3: 1.0, 4: 1.0, 5: 1.0}
    interval, n = 6, 3
    grads = _spam_stream(14, spikes={})
    kw = {"reset_interval": interval, "clip_delay_steps": 2}
    warm_outs, _ = _run(baselines.scale_by_spam(reset_warmup_steps=n, **kw), grads)
    flat_outs, _ = _run(baselines.scale_by_spam(reset_warmup_steps=0, **kw), grads)
    for t, (w, f) in enumerate(zip(warm_outs, flat_outs, strict=True), start=1):
        expected = ramp[t % interval] if t >= interval else 1.0
        # The factor 1 - 0.99 * 0.5 * (1 + cos(.)) takes ~4 float32 roundings of numbers
        # <= 1 (4 * EPS32 = 2.4e-7 absolute); the two runs' directions then differ by the
        # rounding of one more product (2 * EPS32 of a ratio <= 1); the 8-digit literal
        # is within 5e-9: atol 4e-7.
        ratio = np.asarray(w, np.float64) / np.asarray(f, np.float64)
        np.testing.assert_allclose(ratio, expected, rtol=0, atol=4e-7, err_msg=f"step {t}")


def test_spam_reset_zeroes_moments():
    tx = baselines.scale_by_spam(reset_interval=4, reset_warmup_steps=0)
    g = _f32([0.5, -1.0, 2.0])
    zero = _f32([0.0, 0.0, 0.0])
    outs, states = _run(tx, [g, g, g, zero, g, g, g, g])

    assert np.all(np.asarray(states[3].nu) > 0)  # history before the reset step
    after_reset = states[4]  # step 4 resets, then sees a zero gradient
    np.testing.assert_array_equal(after_reset.mu, np.zeros(3))
    np.testing.assert_array_equal(after_reset.nu, np.zeros(3))
    np.testing.assert_array_equal(outs[3], np.zeros(3))
    assert int(after_reset.num_resets) == 1
    # Step 5 starts from empty moments (no trace of steps 1-3): one float32 product.
    np.testing.assert_allclose(states[5].mu, 0.1 * np.asarray(g), rtol=2 * EPS32)
    np.testing.assert_allclose(states[5].nu, 0.001 * np.asarray(g) ** 2, rtol=2 * EPS32)
    assert int(states[8].num_resets) == 2
    assert int(states[8].count) == 8


def test_spam_does_not_clip_before_clip_delay():
    tx = baselines.scale_by_spam(spike_threshold=50.0, reset_interval=0, clip_delay_steps=3)
    benign, spike = _f32([0.1, 0.2]), _f32([1e4, 0.2])
    _, states = _run(tx, [benign, spike])  # step 2 < clip_delay_steps
    assert int(states[-1].num_clipped) == 0
    # m = 0.9 * 0.1 * 0.1 + 0.1 * 1e4: three float32 roundings.
    np.testing.assert_allclose(states[-1].mu[0], 0.1 * (0.9 * 0.1 + 1e4), rtol=3 * EPS32)


def test_spam_complex_gradients_keep_their_phase():
    # Benign complex stream: with eps = 0 the step is Adam's on |g| (m / sqrt(v) with
    # v the EMA of |g|^2), which optax.scale_by_adam implements for complex parameters.
    rng = np.random.default_rng(2)
    grads = [
        jnp.asarray(
            rng.uniform(0.5, 1.5, 4) * np.exp(1j * rng.uniform(0, 2 * np.pi, 4)), jnp.complex64
        )
        for _ in range(8)
    ]
    spam_outs, _ = _run(baselines.scale_by_spam(eps=0.0), grads)
    adam_outs, _ = _run(optax.scale_by_adam(eps=0.0), grads)
    for s, a in zip(spam_outs, adam_outs, strict=True):
        assert s.dtype == jnp.complex64
        # optax computes its bias correction 1 - b2**t in float32 from float32(b2): 1.3e-5
        # relative from rounding b2, plus half an ulp of 1 (3e-8) against
        # 1 - b2**t >= 0.001, 3e-5; under a square root: 2.2e-5; rtol 3e-5.
        np.testing.assert_allclose(s, a, rtol=3e-5)

    # A spike z after k = 6 steps of a constant c: v = (1 - 0.999**6) |c|^2 and
    # m = (1 - 0.9**6) c in closed form; the clip replaces z by
    # z / |z| * sqrt(theta * v), so m moves to 0.9 m + 0.1 * that. (The constant steps
    # are never clipped: |c|^2 <= 5000 * (1 - 0.999**j) |c|^2 for every j >= 1.)
    c, z, theta, k = 0.6 + 0.8j, 300.0 * np.exp(2.0j), 5000.0, 6
    tx = baselines.scale_by_spam(spike_threshold=theta, reset_interval=0, clip_delay_steps=2)
    _, states = _run(tx, [jnp.asarray([c], jnp.complex64)] * k + [jnp.asarray([z], jnp.complex64)])
    v_k, m_k = (1 - 0.999**k) * abs(c) ** 2, (1 - 0.9**k) * c
    clipped = z / abs(z) * math.sqrt(theta * v_k)
    assert int(states[-1].num_clipped) == 1
    # ~k EMA steps of 3 roundings each on complex numbers (x4 for a complex product).
    np.testing.assert_allclose(
        complex(states[-1].mu[0]), 0.9 * m_k + 0.1 * clipped, rtol=4 * 3 * (k + 1) * EPS32
    )
    np.testing.assert_allclose(
        float(states[-1].nu[0]), 0.999 * v_k + 0.001 * theta * v_k, rtol=3 * (k + 1) * EPS32
    )


def test_spam_learning_rate_schedule():
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    tx = baselines.spam(schedule, eps=0.0)
    g = _f32([1.0])
    outs, _ = _run(tx, [g, g])
    # With eps = 0 a constant gradient's Adam direction is exactly 1 at every step (m and
    # sqrt(v) carry the same bias factors), so the steps are -lr_t: -1.0 and -0.9, up to
    # ~10 float32 roundings.
    np.testing.assert_allclose(outs[0], [-1.0], rtol=10 * EPS32)
    np.testing.assert_allclose(outs[1], [-0.9], rtol=10 * EPS32)


# ----------------------------------------------------------------------------- ZClip


def _zclip_reference(norms, alpha, z_threshold, warmup, eps, max_norm):
    """``ZClip.step`` of the reference code (zclip/zclip.py) on a stream of norms.

    Python floats (float64), as the reference's statistics are. Returns the norms after
    clipping, the final mean and variance, and the number of steps where ``max_norm``
    was the binding bound.
    """
    buffer, mean, var, outs, capped = [], None, None, [], 0
    for g in norms:
        if mean is None:  # warm-up: collect, and clip_grad_norm_(max_grad_norm)
            buffer.append(g)
            if len(buffer) >= warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            coef = 1.0 if max_norm is None else min(1.0, max_norm / (g + 1e-6))
            capped += max_norm is not None and max_norm < g
            outs.append(g * coef)
            continue
        std = var**0.5
        z = (g - mean) / (std + eps)
        clip_val = mean + (z_threshold * std) / (z / z_threshold) if z > z_threshold else None
        adaptive = clip_val if clip_val is not None else g
        effective = adaptive if max_norm is None else min(adaptive, max_norm)
        coef = effective / (g + 1e-6) if g > effective else 1.0
        capped += max_norm is not None and max_norm < adaptive
        outs.append(g * coef)
        x = clip_val if clip_val is not None else g  # the EMAs never see max_grad_norm
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return np.array(outs), mean, var, capped


def _grads_with_norms(norms):
    """2-leaf gradients along a fixed direction with the given global norms."""
    direction = {"a": _f32([0.6, 0.0]), "b": _f32([[0.0, -0.8]])}
    return [jax.tree.map(lambda d, n=n: d * np.float32(n), direction) for n in norms]


def test_zclip_defaults_are_the_reference_codes():
    # zclip.py: alpha 0.97, z_thresh 2.5, max_grad_norm 1.0, eps 1e-6, warmup_steps 25.
    assert _defaults(baselines.zclip) == {
        "alpha": 0.97,
        "z_threshold": 2.5,
        "warmup_steps": 25,
        "eps": 1e-6,
        "max_norm": 1.0,
    }


# Tolerances against the float64 reference. A norm of these 2-element gradients is
# within 3 * EPS32 of the float64 one. The EMAs add ~3 roundings per step, weighted by
# alpha^k: 3 * EPS32 / (1 - alpha) relative (1.8e-6 for alpha = 0.9, 6e-6 for 0.97); a
# clip target mean + (z_thr^2 / z) * std inherits it. The variance divides the deviation
# errors (EPS32 * |x|) by deviations >= 0.05 |x|: 20x that.
def _zclip_rtols(alpha):
    ema = 3 * EPS32 / (1 - alpha)
    return {"norm": 2 * ema + 3 * EPS32, "mean": ema, "var": 20 * ema}


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_zclip_follows_the_reference_code(max_norm):
    # Warm-up norms with mean 1 and std 0.32 (1.4 and 1.3 are capped at max_norm); 1.5 is
    # not a z-spike but is capped; 50 is a spike; then benign steps.
    norms = [0.6, 1.4, 1.0, 0.7, 1.3, 1.5, 0.9, 50.0, 1.0, 1.1, 0.8]
    alpha, zt, warmup = 0.9, 2.5, 5
    tx = baselines.zclip(alpha=alpha, z_threshold=zt, warmup_steps=warmup, max_norm=max_norm)
    grads = _grads_with_norms(norms)
    outs, states = _run(tx, grads)

    ref_norms, ref_mean, ref_var, ref_capped = _zclip_reference(
        norms, alpha, zt, warmup, 1e-6, max_norm
    )
    assert ref_norms[7] < 2.0  # the spike was pulled in close to the mean
    rtol = _zclip_rtols(alpha)
    np.testing.assert_allclose([_norm(o) for o in outs], ref_norms, rtol=rtol["norm"])
    # Every step keeps its direction; an unclipped one is bit-identical.
    for o, g, n, r in zip(outs, grads, norms, ref_norms, strict=True):
        if r == n:
            _assert_trees_equal(o, g)
        jax.tree.map(
            lambda x, y, s=r / n: np.testing.assert_allclose(x, s * y, rtol=rtol["norm"]), o, g
        )
    assert float(states[-1].mean) == pytest.approx(ref_mean, rel=rtol["mean"])
    assert float(states[-1].var) == pytest.approx(ref_var, rel=rtol["var"])
    assert int(states[-1].num_clipped) == 1
    # Capped: 1.4 and 1.3 in the warm-up, 1.5 and 1.1 after it, and the spike whose
    # target is above the cap.
    assert int(states[-1].num_capped) == ref_capped == (0 if max_norm is None else 5)


def test_zclip_warmup_only_collects_statistics():
    norms = [1.0, 2.0, 100.0, 3.0, 4.0]  # a spike inside the warm-up is left alone
    tx = baselines.zclip(warmup_steps=5, max_norm=None)
    grads = _grads_with_norms(norms)
    outs, states = _run(tx, grads)
    for o, g in zip(outs, grads, strict=True):
        _assert_trees_equal(o, g)
    assert int(states[-1].count) == 5
    # The running mean and variance: a few roundings per value (5 values).
    assert float(states[-1].mean) == pytest.approx(np.mean(norms), rel=5 * 4 * EPS32)
    assert float(states[-1].var) == pytest.approx(np.var(norms), rel=5 * 8 * EPS32)
    assert int(states[-1].num_clipped) == 0


def test_zclip_benign_stream_is_untouched():
    rng = np.random.default_rng(0)
    norms = list(0.5 + 0.025 * rng.standard_normal(40))  # below the default cap of 1
    tx = baselines.zclip(warmup_steps=10)
    grads = _grads_with_norms(norms)
    outs, states = _run(tx, grads)
    assert int(states[-1].num_clipped) == 0 and int(states[-1].num_capped) == 0
    for o, g in zip(outs, grads, strict=True):
        _assert_trees_equal(o, g)
    _, ref_mean, ref_var, _ = _zclip_reference(norms, 0.97, 2.5, 10, 1e-6, 1.0)
    rtol = _zclip_rtols(0.97)
    assert float(states[-1].mean) == pytest.approx(ref_mean, rel=rtol["mean"])
    assert float(states[-1].var) == pytest.approx(ref_var, rel=rtol["var"])


def test_zclip_nonfinite_gradient_passes_and_is_not_recorded():
    tx = baselines.zclip(warmup_steps=2)
    grads = _grads_with_norms([1.0, 2.0, 1.5])
    bad = jax.tree.map(lambda g: g * np.float32(np.nan), grads[0])
    outs, states = _run(tx, grads + [bad])
    assert np.isnan(np.asarray(outs[-1]["a"])).any()
    for field in ("count", "mean", "var", "num_clipped", "num_capped"):
        assert getattr(states[-1], field) == getattr(states[-2], field)


def test_zclip_complex_gradients_count_with_their_modulus():
    # |0.6 + 0.8i| = 1: a complex stream with these moduli has the norms of the real one,
    # so the same statistics and clip factors, and each output keeps its phase.
    norms = [1.0, 1.2, 0.9, 1.1, 1.0, 30.0, 1.0]
    real = [{"z": _f32([n])} for n in norms]
    cplx = [{"z": jnp.asarray([n * (0.6 + 0.8j)], jnp.complex64)} for n in norms]
    tx = baselines.zclip(warmup_steps=5, max_norm=None)
    real_outs, real_states = _run(tx, real)
    cplx_outs, cplx_states = _run(tx, cplx)
    assert int(cplx_states[-1].num_clipped) == int(real_states[-1].num_clipped) == 1
    for r, c in zip(real_outs, cplx_outs, strict=True):
        # |0.6 + 0.8i| in float32 is 1 within 2 * EPS32; ~10 roundings along the stream.
        np.testing.assert_allclose(
            np.asarray(c["z"]), np.asarray(r["z"]) * (0.6 + 0.8j), rtol=10 * EPS32
        )
    assert float(cplx_states[-1].mean) == pytest.approx(float(real_states[-1].mean), rel=10 * EPS32)


# ----------------------------------------------------------------------------- AdaGC


def _adagc_reference(
    grads_seq, *, clip_ratio=1.04, beta=0.99, eps=1e-6, start_clip_steps=100, max_norm=1.0
):
    """``AdaGC.clip_by_norm`` of the reference patch (megatron-gpt2.patch), float64.

    ``grads_seq`` is a list of dicts of arrays (one tensor per key). Returns the clipped
    gradients per step, the final per-tensor EMA (``state["norm_value"]``), the number of
    warm-up steps whose global clip fired and the number of tensor clips after it.
    """
    state, steps, outs, warmup_fired, clipped = {}, 0, [], 0, 0
    for grads in grads_seq:
        grads = {k: np.array(v, np.float64) for k, v in grads.items()}
        steps += 1
        if steps <= start_clip_steps:
            total_norm = math.sqrt(sum(np.sum(g**2) for g in grads.values()))
            clip_coeff = max_norm / (total_norm + eps)
            if clip_coeff < 1.0:
                grads = {k: g * clip_coeff for k, g in grads.items()}
                warmup_fired += 1
            for k, g in grads.items():
                norm_value = math.sqrt(np.sum(g**2))
                state.setdefault(k, norm_value)
                state[k] = min(state[k], norm_value)
        else:
            for k, g in grads.items():
                norm_value = math.sqrt(np.sum(g**2))
                state.setdefault(k, norm_value)
                avg = state[k]
                if norm_value > clip_ratio * avg:
                    grads[k] = g * (clip_ratio * avg) / (norm_value + eps)
                    norm_value = clip_ratio * avg
                    clipped += 1
                state[k] = avg * beta + norm_value * (1.0 - beta)
        outs.append(grads)
    return outs, state, warmup_fired, clipped


def _leaf_grads(a_scale=1.0, b_scale=1.0, c_scale=1.0):
    return {
        "a": _f32([3.0, 4.0]) * np.float32(a_scale),  # norm 5
        "b": _f32([[1.0, 2.0], [2.0, 4.0]]) * np.float32(b_scale),  # norm 5
        "c": _f32([0.5]) * np.float32(c_scale),  # norm 0.5
    }


def _gamma(state, grads, name):
    return float(state.gamma[otree.make_partition(grads).index(name)])


def test_adagc_defaults_are_the_reference_codes():
    # megatron-gpt2.patch: --clip-ratio 1.04, --clip-beta 0.99, eps 1e-6,
    # start_clip_steps 100, and the run script's --clip-grad 1.0 for the warm-up clip.
    assert _defaults(baselines.adagc) == {
        "relative_threshold": 1.04,
        "decay": 0.99,
        "warmup_steps": 100,
        "warmup_clip": 1.0,
        "eps": 1e-6,
    }


def test_adagc_follows_the_reference_code():
    # Warm-up of 3 steps whose global clip at 8 fires on step 2 (norm 8.5): it lowers the
    # minimum of "c" to 0.47, so "c" (norm 0.5) stays ~2% above its bound afterwards and
    # is clipped at every later step. Then a 40x spike on "a" and a 1.03x rise on "b"
    # (1% below its bound). Every norm is >= 1% away from its bound, far beyond float32
    # error, so clip decisions are the reference's.
    factors = [
        (1, 1, 1),
        (1.2, 1.2, 1),
        (1, 1, 1),
        (1, 1, 1),
        (40, 1, 1),
        (1, 1.03, 1.2),
        (1, 1, 1),
        (0.9, 1, 1),
    ]
    grads = [_leaf_grads(*f) for f in factors]
    kw = {"start_clip_steps": 3, "max_norm": 8.0}
    want_outs, want_state, want_fired, want_clipped = _adagc_reference(grads, **kw)
    tx = baselines.adagc(warmup_steps=3, warmup_clip=8.0)
    outs, states = _run(tx, grads)
    # Each step adds ~3 float32 roundings to a norm, a clip factor or gamma (their float64
    # values are O(1), nothing cancels): 8 steps * 3 * EPS32 per quantity, twice for an
    # output that is a gradient times a factor.
    rtol = 2 * 8 * 3 * EPS32
    for t, (o, w) in enumerate(zip(outs, want_outs, strict=True)):
        for k in w:
            np.testing.assert_allclose(o[k], w[k], rtol=rtol, err_msg=f"step {t + 1}, {k}")
    for k, v in want_state.items():
        assert _gamma(states[-1], grads[0], k) == pytest.approx(v, rel=rtol)
    assert int(states[-1].num_warmup_clipped) == want_fired == 1
    assert int(states[-1].num_clipped) == want_clipped == 6  # "c" 5 times, "a" once


def test_adagc_warmup_clips_global_norm_and_takes_min_of_clipped_norms():
    tx = baselines.adagc(warmup_steps=3, warmup_clip=2.0, eps=0.0)
    grads = [_leaf_grads(), _leaf_grads(a_scale=0.1), _leaf_grads(c_scale=0.01)]
    outs, states = _run(tx, grads)
    for o, g in zip(outs, grads, strict=True):  # every warm-up step is clipped to norm 2
        gn = _norm(g)
        # A norm (6 terms) and a factor: ~8 float32 roundings.
        assert _norm(o) == pytest.approx(2.0, rel=8 * EPS32)
        jax.tree.map(
            lambda x, y, gn=gn: np.testing.assert_allclose(x, y * 2.0 / gn, rtol=8 * EPS32), o, g
        )
    clipped_norms = {name: [_norm(o[name]) for o in outs] for name in ("a", "b", "c")}
    for name, values in clipped_norms.items():
        assert _gamma(states[-1], grads[0], name) == pytest.approx(min(values), rel=8 * EPS32)
    assert int(states[-1].num_warmup_clipped) == 3
    assert int(states[-1].num_clipped) == 0


def test_adagc_rescales_only_the_spiking_tensor():
    lam, beta, eps = 1.04, 0.99, 1e-6
    tx = baselines.adagc(warmup_steps=2, warmup_clip=100.0)
    grads = [_leaf_grads(), _leaf_grads(), _leaf_grads(), _leaf_grads(a_scale=40.0)]
    outs, states = _run(tx, grads)
    before, after = states[-2], states[-1]
    gamma_a, gamma_b = _gamma(before, grads[0], "a"), _gamma(before, grads[0], "b")
    # gamma = 5 after the warm-up minimum and one EMA step of 5 (a 2-term norm: 3 EPS32).
    assert gamma_a == pytest.approx(5.0, rel=3 * EPS32)

    spike_norm = 200.0
    factor = lam * gamma_a / (spike_norm + eps)
    # Norm, bound, factor and product: ~6 roundings.
    np.testing.assert_allclose(outs[-1]["a"], grads[-1]["a"] * factor, rtol=6 * EPS32)
    _assert_trees_equal(outs[-1]["b"], grads[-1]["b"])
    _assert_trees_equal(outs[-1]["c"], grads[-1]["c"])
    # The reference's EMA records the bound lam * gamma itself, not the clipped norm.
    assert _gamma(after, grads[0], "a") == pytest.approx(
        beta * gamma_a + (1 - beta) * lam * gamma_a, rel=6 * EPS32
    )
    assert _gamma(after, grads[0], "b") == pytest.approx(
        beta * gamma_b + (1 - beta) * 5.0, rel=6 * EPS32
    )
    assert int(after.num_clipped) == 1
    assert int(after.num_warmup_clipped) == 0


def test_adagc_benign_stream_is_untouched_after_warmup():
    rng = np.random.default_rng(1)
    factors = 1.0 + 0.005 * rng.standard_normal((30, 3))  # 8 sigma below the 1.04 bound
    grads = [_leaf_grads(*f) for f in factors]
    tx = baselines.adagc(warmup_steps=5, warmup_clip=100.0)
    outs, states = _run(tx, grads)
    assert int(states[-1].num_clipped) == 0
    for o, g in zip(outs, grads, strict=True):
        _assert_trees_equal(o, g)


def test_adagc_zero_gradient_tensor_is_not_frozen():
    tx = baselines.adagc(warmup_steps=2, warmup_clip=100.0)
    quiet = _leaf_grads(c_scale=0.0)  # "c" has no gradient during warm-up
    outs, states = _run(tx, [quiet, quiet, _leaf_grads()])
    _assert_trees_equal(outs[-1]["c"], _leaf_grads()["c"])
    assert _gamma(states[-1], quiet, "c") == pytest.approx(0.5, rel=2 * EPS32)


# ------------------------------------------------------------------------- skip_step


def _benign_grads(n, scale=1.0):
    base = {"w": _f32([[0.3, -0.4], [0.5, 0.1]]), "b": _f32([0.2, -0.1])}
    return [jax.tree.map(lambda x, i=i: x * scale * (1 + 0.05 * (i % 3)), base) for i in range(n)]


@functools.cache
def _skip_tx(shift_patience=16):
    return baselines.skip_step(
        optax.adam(0.1), window=8, num_sigma=6.0, min_history=4, shift_patience=shift_patience
    )


def test_skip_step_defaults_are_the_references():
    # OLMo-core, Levanter and MaxText: a window of 128 values, 6 sigma, and at least
    # max(2, window // 2) = 64 values before a step may be skipped.
    assert _defaults(baselines.skip_step) == {
        "window": 128,
        "num_sigma": 6.0,
        "min_history": None,
        "shift_patience": 16,
    }
    state = baselines.skip_step(optax.sgd(1.0)).init(jnp.zeros(2))
    assert state.history.shape == (2, 128)
    with pytest.raises(ValueError, match="min_history"):
        baselines.skip_step(optax.sgd(1.0), window=128, min_history=129)


def test_skip_step_skips_spike_and_freezes_inner_state():
    tx = _skip_tx()
    grads = _benign_grads(6)
    spike = jax.tree.map(lambda g: g * 1000.0, grads[0])
    outs, states = _run(tx, grads + [spike])
    before, after = states[-2], states[-1]

    for leaf in jax.tree.leaves(outs[-1]):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    _assert_trees_equal(after.inner_state, before.inner_state)
    _assert_trees_equal(after.history, before.history)
    assert int(after.num_values) == 6 and int(after.next_index) == 6
    assert int(after.num_skipped) == 1 and int(after.skip_streak) == 1
    assert int(optax.tree.get(after.inner_state, "count")) == 6


def test_skip_step_normal_step_advances_inner_state():
    tx = _skip_tx()
    grads = _benign_grads(7)
    outs, states = _run(tx, grads)
    before, after = states[-2], states[-1]
    assert int(optax.tree.get(after.inner_state, "count")) == 7
    mu_before = optax.tree.get(before.inner_state, "mu")
    mu_after = optax.tree.get(after.inner_state, "mu")
    assert not np.array_equal(mu_before["w"], mu_after["w"])
    assert int(after.num_skipped) == 0
    # The step is exactly what adam alone gives.
    adam_outs, _ = _run(optax.adam(0.1), grads)
    _assert_trees_equal(outs[-1], adam_outs[-1])
    # The window holds the accepted grad norms in order (6-term norms: 4 EPS32).
    norms = [_norm(g) for g in grads]
    np.testing.assert_allclose(after.history[0, :7], norms, rtol=4 * EPS32)


def test_skip_step_needs_min_history_and_uses_accepted_values_only():
    tx = _skip_tx()
    grads = _benign_grads(3)
    spike = jax.tree.map(lambda g: g * 1000.0, grads[0])
    # With 3 < min_history values the spike is accepted (and enters the window) ...
    _, states = _run(tx, grads + [spike])
    assert int(states[-1].num_skipped) == 0 and int(states[-1].num_values) == 4
    # ... with 4 values it is skipped, twice in a row, since the window did not move.
    _, states = _run(tx, _benign_grads(4) + [spike, spike])
    assert int(states[-1].num_skipped) == 2 and int(states[-1].num_values) == 4


def test_skip_step_threshold_is_mean_plus_num_sigma_std():
    tx = _skip_tx()
    grads = _benign_grads(8)
    _, states = _run(tx, grads)
    norms = np.array([_norm(g) for g in grads])
    bound = norms.mean() + 6.0 * norms.std(ddof=1)
    direction = jax.tree.map(lambda g: g / norms[0], grads[0])
    update = jax.jit(tx.update)
    # 0.1% either side of the bound: far beyond the float32 error of the window's mean
    # and standard deviation (~10 * EPS32 relative).
    for norm, skipped in ((bound * 0.999, 0), (bound * 1.001, 1)):
        g = jax.tree.map(lambda d, n=norm: d * np.float32(n), direction)
        _, state = update(g, states[-1], grads[0])
        assert int(state.num_skipped) == skipped


def test_skip_step_monitors_the_loss_and_the_gradient_norm():
    tx = _skip_tx()
    grads = _benign_grads(6)
    params = grads[0]
    update = _jit_update(tx)
    state = tx.init(params)
    losses = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95]
    for g, loss in zip(grads, losses, strict=True):
        _, state = update(g, state, params, loss=np.float32(loss))
    np.testing.assert_allclose(state.history[1, :6], losses, rtol=EPS32)

    inner_before = state.inner_state
    out, spiked = update(grads[0], state, params, loss=np.float32(50.0))  # benign grads
    assert int(spiked.num_skipped) == 1
    _assert_trees_equal(spiked.inner_state, inner_before)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(out))
    # A gradient spike with a benign loss is skipped too (as in Levanter and MaxText).
    big = jax.tree.map(lambda g: g * 1000.0, grads[0])
    _, spiked = update(big, state, params, loss=np.float32(2.0))
    assert int(spiked.num_skipped) == 1

    _, state = update(grads[0], state, params, loss=np.float32(2.0))
    assert int(state.num_skipped) == 0 and int(state.num_values) == 7


def test_skip_step_skips_nonfinite_steps_without_history():
    tx = _skip_tx()
    grads = _benign_grads(1)
    bad = {"w": grads[0]["w"].copy(), "b": grads[0]["b"]}
    bad["w"][0, 0] = np.inf
    outs, states = _run(tx, [bad])
    assert int(states[-1].num_skipped) == 1 and int(states[-1].num_values) == 0
    _assert_trees_equal(states[-1].inner_state, states[0].inner_state)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(outs[0]))
    # A finite gradient with a NaN loss is skipped too.
    _, state = _jit_update(tx)(grads[0], states[0], grads[0], loss=np.float32(np.nan))
    assert int(state.num_skipped) == 1


_LEVEL = [1.0, 1.1, 0.9, 1.0, 1.1, 0.9, 1.0, 1.1]  # eight accepted norms fill the window


def test_skip_step_learns_a_lasting_shift_after_shift_patience_skips():
    # A deterministic objective whose gradient norm jumps for good from ~1 to 10 (a
    # stall: with an accepted-values window every later step is an outlier).
    grads = _grads_with_norms(_LEVEL + [10.0] * 30)
    # By hand, window = 8, k = 6: the first window (mean 1.0125, sample std 0.0835)
    # puts the bound at 1.51, so 10 is skipped. With shift_patience P, the first P
    # skips leave the window alone; the (P+1)-th is recorded, replacing the oldest 1.0:
    window = np.array([10.0] + _LEVEL[1:])
    bound = window.mean() + 6.0 * window.std(ddof=1)  # 2.14 + 6 * 3.18 = 21.2
    assert 10.0 < bound
    # ... so from then on 10 is accepted: P + 1 skipped steps in all.
    for patience, skipped in ((None, 30), (0, 1), (2, 3), (5, 6)):
        _, states = _run(_skip_tx(patience), grads)
        assert int(states[-1].num_skipped) == skipped, patience
    # The last step was accepted and advanced adam (count = 38 - skipped).
    assert int(optax.tree.get(states[-1].inner_state, "count")) == 38 - 6


def test_skip_step_spikes_shorter_than_shift_patience_never_enter_the_window():
    # Bursts of 1 and 3 spikes (<= P = 3) among benign steps: every spike is skipped and
    # the window holds the benign norms only.
    spikes = {9: 1, 12: 3}  # start step (0-based) -> burst length
    norms = list(_LEVEL)
    for start, length in spikes.items():
        norms += [1.0] * (start - len(norms)) + [1000.0] * length
    norms += [1.0, 1.05]
    _, states = _run(_skip_tx(3), _grads_with_norms(norms))
    assert int(states[-1].num_skipped) == sum(spikes.values())
    benign = [n for n in norms if n < 100.0]
    # Ring buffer of the last 8 benign norms (2-element norms: 3 EPS32).
    recorded = np.roll(np.asarray(states[-1].history[0]), -int(states[-1].next_index))
    np.testing.assert_allclose(recorded, benign[-8:], rtol=3 * EPS32)


def _loss_recorder():
    """An extra-args transform that needs ``loss`` and keeps the last one it saw."""

    def init_fn(params):
        del params
        return jnp.zeros([], jnp.float32)

    def update_fn(updates, state, params=None, *, loss, **extra_args):
        del params, extra_args, state
        return updates, jnp.asarray(loss, jnp.float32)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def test_skip_step_passes_extra_args_to_inner():
    tx = baselines.skip_step(_loss_recorder(), window=4, min_history=2)
    g = _f32([1.0, 1.0])
    state = tx.init(g)
    _, state = jax.jit(tx.update)(g, state, g, loss=3.5, unrelated=1)
    assert float(state.inner_state) == 3.5


# ------------------------------------------------------------------------ all methods


_CHAINED_FACTORIES = {
    "scale_by_spam": lambda: baselines.scale_by_spam(reset_interval=3, clip_delay_steps=2),
    "spam": lambda: baselines.spam(1e-2, weight_decay=0.1, reset_interval=3, clip_delay_steps=2),
    "zclip": lambda: baselines.zclip(warmup_steps=2),
    "adagc": lambda: baselines.adagc(warmup_steps=2),
    "skip_step": lambda: baselines.skip_step(optax.adam(1e-2), window=4, min_history=2),
}


@functools.cache
def _chained(name):
    return _CHAINED_FACTORIES[name]()


def _spiky_stream(dtype=jnp.float32):
    grads = _benign_grads(6)
    grads[4] = jax.tree.map(lambda g: g * 1e3, grads[4])
    return [jax.tree.map(lambda g: g.astype(dtype), g) for g in grads]


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (baselines.scale_by_spam, {"b1": 1.0}, "b1"),
        (baselines.scale_by_spam, {"spike_threshold": 0.0}, "spike_threshold"),
        (baselines.scale_by_spam, {"reset_interval": -1}, "reset_interval"),
        (baselines.scale_by_spam, {"reset_warmup_steps": -5}, "reset_warmup_steps"),
        (baselines.scale_by_spam, {"clip_delay_steps": 1}, "clip_delay_steps"),
        (baselines.spam, {"learning_rate": 1e-3, "weight_decay": -0.1}, "weight_decay"),
        (baselines.spam, {"learning_rate": -1.0}, "learning_rate"),
        (baselines.zclip, {"z_threshold": -1}, "z_threshold"),
        (baselines.zclip, {"alpha": 1.0}, "alpha"),
        (baselines.zclip, {"warmup_steps": 0}, "warmup_steps"),
        (baselines.zclip, {"eps": -1e-6}, "eps"),
        (baselines.zclip, {"max_norm": 0.0}, "max_norm"),
        (baselines.adagc, {"relative_threshold": 0.0}, "relative_threshold"),
        (baselines.adagc, {"decay": 1.5}, "decay"),
        (baselines.adagc, {"warmup_steps": -1}, "warmup_steps"),
        (baselines.adagc, {"warmup_clip": 0.0}, "warmup_clip"),
        (baselines.skip_step, {"inner": optax.sgd(1.0), "window": 1}, "window"),
        (baselines.skip_step, {"inner": optax.sgd(1.0), "window": 8.0}, "window"),
        (baselines.skip_step, {"inner": optax.sgd(1.0), "num_sigma": -1.0}, "num_sigma"),
        (
            baselines.skip_step,
            {"inner": optax.sgd(1.0), "window": 8, "min_history": 9},
            "min_history",
        ),
        (baselines.skip_step, {"inner": optax.sgd(1.0), "min_history": 1}, "min_history"),
        (baselines.skip_step, {"inner": optax.sgd(1.0), "shift_patience": -1}, "shift_patience"),
    ],
)
def test_bad_config_raises_value_error_naming_the_argument(factory, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        factory(**kwargs)


def test_traced_hyperparameters_are_not_validated():
    # An out-of-range *array* is not checked at construction (it may be traced).
    baselines.zclip(z_threshold=jnp.asarray(-1.0))
    baselines.adagc(decay=jnp.asarray(2.0))


INJECTED = {
    "scale_by_spam": (
        lambda: optax.inject_hyperparams(baselines.scale_by_spam)(
            reset_interval=3, clip_delay_steps=2
        ),
        ("spike_threshold", "reset_interval", "clip_delay_steps"),
    ),
    "spam": (
        lambda: optax.inject_hyperparams(baselines.spam)(
            1e-2, weight_decay=0.1, reset_interval=3, clip_delay_steps=2
        ),
        ("learning_rate", "weight_decay", "reset_warmup_steps"),
    ),
    "zclip": (
        lambda: optax.inject_hyperparams(baselines.zclip)(warmup_steps=2),
        ("alpha", "z_threshold", "warmup_steps", "max_norm"),
    ),
    "adagc": (
        lambda: optax.inject_hyperparams(baselines.adagc)(warmup_steps=2),
        ("relative_threshold", "decay", "warmup_steps", "warmup_clip"),
    ),
    "skip_step": (
        lambda: optax.inject_hyperparams(baselines.skip_step, static_args="window")(
            optax.adam(1e-2), window=4, min_history=2
        ),
        ("num_sigma", "min_history", "shift_patience"),
    ),
}


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_inject_hyperparams_matches_plain(name):
    make_injected, traced = INJECTED[name]
    grads = _spiky_stream()
    plain_outs, plain_states = _run(_chained(name), grads)
    injected_outs, injected_states = _run(make_injected(), grads)
    assert set(traced) <= set(injected_states[-1].hyperparams)
    # Injected hyperparameters are float32 arrays: 1 - b is then rounded from float32(b)
    # (for b2 = 0.999, 1.3e-5 relative; for alpha = 0.97 or decay 0.99, 1e-6) where the
    # plain transform rounds the exact 1 - b. In SPAM it enters v and the bias correction,
    # each under a square root: 1.3e-5 in all; rtol 2e-5.
    for p, i in zip(plain_outs, injected_outs, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=0), p, i)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=0),
        injected_states[-1].inner_state,
        plain_states[-1],
    )


def test_injected_hyperparameter_can_be_changed_at_run_time():
    tx = optax.inject_hyperparams(baselines.zclip)(warmup_steps=2, max_norm=None)
    grads = _grads_with_norms([1.0, 1.2, 5.0])
    update = jax.jit(tx.update)
    state = tx.init(grads[0])
    for g in grads[:2]:
        _, state = update(g, state)
    _, clipped = update(grads[2], state)
    state.hyperparams["z_threshold"] = jnp.asarray(1e3)
    _, unclipped = update(grads[2], state)
    assert int(clipped.inner_state.num_clipped) == 1
    assert int(unclipped.inner_state.num_clipped) == 0


@pytest.mark.parametrize("name", sorted(_CHAINED_FACTORIES))
def test_bf16_params_keep_dtype_and_float32_statistics(name):
    tx = _chained(name)
    grads = _spiky_stream(jnp.bfloat16)
    outs, states = _run(tx, grads)
    for out in outs:
        assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}
        assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(out))
    float_leaves = [x for x in jax.tree.leaves(states[-1]) if jnp.issubdtype(x.dtype, jnp.floating)]
    if name == "skip_step":  # the inner adam keeps its own (param-dtype) moments
        float_leaves = [states[-1].history]
    assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)


@pytest.mark.parametrize("name", sorted(_CHAINED_FACTORIES))
def test_state_dtypes_are_stable_under_scan(name):
    tx = _chained(name)
    grads = _spiky_stream()
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *grads)
    params = grads[0]

    def step(state, g):
        out, state = tx.update(g, state, params, some_unknown_kwarg=1)
        return state, out

    final, outs = jax.jit(lambda s: jax.lax.scan(step, s, stacked))(tx.init(params))
    _, plain_states = _run(tx, grads)

    # The scanned and the step-by-step programs are compiled apart: XLA may reassociate
    # the <= 6-term norm sums and fuse differently (one rounding more or less per op).
    # Over 6 steps of EMAs and one clip that is < 50 roundings: 50 * EPS32 = 3e-6
    # relative. A variance of norms (ZClip's var, 4e-4 here against norms of 0.77) is a
    # difference of terms of size norm^2, so each of those roundings moves it by up to
    # EPS32 * norm^2 in absolute terms: atol 50 * EPS32 * norm^2 (1.8e-6) for it, with
    # the typical (median) gradient norm of the stream.
    norm = float(np.median([optax.tree.norm(g) for g in grads]))

    def close(path, x, y):
        field = getattr(path[-1], "name", None)
        atol = 50 * EPS32 * norm**2 if field == "var" else 0.0
        np.testing.assert_allclose(x, y, rtol=3e-6, atol=atol)

    jax.tree_util.tree_map_with_path(close, final, plain_states[-1])
    assert jax.tree.map(lambda x: x.dtype, final) == jax.tree.map(
        lambda x: x.dtype, tx.init(params)
    )
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(outs)[0])))


def test_counters_fire_on_the_spiky_stream():
    grads = _spiky_stream()
    counters = {
        "scale_by_spam": ("num_clipped", 1),
        "zclip": ("num_clipped", 1),
        "adagc": ("num_clipped", 2),
        "skip_step": ("num_skipped", 1),
    }
    for name, (field, at_least) in counters.items():
        _, states = _run(_chained(name), grads)
        assert int(getattr(states[-1], field)) >= at_least, name


def test_docstring_examples_run():
    result = doctest.testmod(baselines, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10
    assert result.failed == 0
