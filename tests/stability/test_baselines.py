"""Tests of the peer baselines in ``optstab.stability.baselines``.

For every method: its mechanism fires on a spike with the published numbers (checked
against small numpy re-derivations), does not fire on a benign stream, works under
``jax.jit``, with traced hyperparameters (``optax.inject_hyperparams``) and with bf16
parameters.
"""

from __future__ import annotations

import doctest
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optstab import tree as otree
from optstab.stability import baselines

# The betas as float32 sees them, so that numpy references round (1 - b) the same way.
B1, B2, EPS = float(np.float32(0.9)), float(np.float32(0.999)), 1e-8
# 1 - b2**t loses ~1e-5 (relative) to cancellation in float32, in optax's adam as here.
BIAS_RTOL = 5e-5


_JITTED: dict[int, tuple[optax.GradientTransformation, object]] = {}


def _jit_update(tx):
    """``jax.jit(tx.update)``, built once per transform so that tests share compilations."""
    if id(tx) not in _JITTED:
        _JITTED[id(tx)] = (tx, jax.jit(tx.update))  # keeps tx alive so its id stays unique
    return _JITTED[id(tx)][1]


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _norm(tree) -> float:
    """Global L2 norm of a pytree, in float64 numpy."""
    return math.sqrt(
        sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))
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


# ------------------------------------------------------------------------------ SPAM


def _spam_warmup_reference(s: int, n: int) -> float:
    """The reference code's factor: 1 - CosineAnnealingLR(0.99, T_max=n + 1) at step s."""
    return 1.0 - 0.99 * (1 + math.cos(math.pi * s / (n + 1))) / 2 if s < n else 1.0


def test_spam_clips_spiking_element_to_sign_sqrt_theta_v():
    theta = 5000.0
    tx = baselines.scale_by_spam(spike_threshold=theta, reset_interval=0, clip_delay_steps=3)
    benign = _f32([0.1, -0.2, 0.3, 0.4])
    spike = _f32([100.0, -0.2, -1e4, 0.4])  # elements 0 and 2 spike
    outs, states = _run(tx, [benign] * 4 + [spike])

    before, after = states[-2], states[-1]
    nu_prev = np.asarray(before.nu, np.float64)
    mu_prev = np.asarray(before.mu, np.float64)
    g = np.asarray(spike, np.float64)
    clipped = g.copy()
    clipped[[0, 2]] = np.sign(g[[0, 2]]) * np.sqrt(theta * nu_prev[[0, 2]])
    assert clipped[0] > 0 and clipped[2] < 0 and abs(clipped[0]) < 1.0

    mu = B1 * mu_prev + (1 - B1) * clipped
    nu = B2 * nu_prev + (1 - B2) * clipped**2
    np.testing.assert_allclose(after.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(after.nu, nu, rtol=1e-6)
    t = 5
    expected = (mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS)
    np.testing.assert_allclose(outs[-1], expected, rtol=BIAS_RTOL)
    assert int(after.num_clipped) == 2
    assert int(after.num_resets) == 0


def test_spam_does_not_clip_before_clip_delay():
    tx = baselines.scale_by_spam(spike_threshold=50.0, reset_interval=0, clip_delay_steps=3)
    benign, spike = _f32([0.1, 0.2]), _f32([1e4, 0.2])
    _, states = _run(tx, [benign, spike])  # step 2 < clip_delay_steps
    assert int(states[-1].num_clipped) == 0
    np.testing.assert_allclose(states[-1].mu[0], (1 - B1) * (B1 * 0.1 + 1e4), rtol=1e-6)


def test_spam_matches_adam_on_benign_stream():
    rng = np.random.default_rng(0)
    grads = [
        {"w": _f32(rng.standard_normal((4, 3))), "b": _f32(0.1 * rng.standard_normal(3))}
        for _ in range(30)
    ]
    spam_outs, spam_states = _run(baselines.scale_by_spam(), grads)
    adam_outs, _ = _run(optax.scale_by_adam(b1=B1, b2=B2, eps=EPS), grads)
    assert int(spam_states[-1].num_clipped) == 0
    assert int(spam_states[-1].num_resets) == 0
    for s, a in zip(spam_outs, adam_outs, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=BIAS_RTOL), s, a)


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
    # Step 5 starts from empty moments (no trace of steps 1-3), bias-corrected with t = 5.
    np.testing.assert_allclose(states[5].mu, (1 - B1) * np.asarray(g), rtol=1e-6)
    np.testing.assert_allclose(states[5].nu, (1 - B2) * np.asarray(g) ** 2, rtol=1e-6)
    assert int(states[8].num_resets) == 2
    assert int(states[8].count) == 8


def test_spam_warmup_after_reset_follows_cosine_ramp():
    interval, n = 6, 3
    rng = np.random.default_rng(1)
    grads = [_f32(rng.standard_normal(5)) for _ in range(14)]
    warm_outs, _ = _run(
        baselines.scale_by_spam(reset_interval=interval, reset_warmup_steps=n), grads
    )
    flat_outs, _ = _run(
        baselines.scale_by_spam(reset_interval=interval, reset_warmup_steps=0), grads
    )

    for t, (w, f) in enumerate(zip(warm_outs, flat_outs, strict=True), start=1):
        s = t % interval
        expected = _spam_warmup_reference(s, n) if t >= interval else 1.0
        np.testing.assert_allclose(w, expected * np.asarray(f), rtol=1e-6, err_msg=f"step {t}")
    # Spot values: the reset step starts at 1% and the ramp rises monotonically.
    assert _spam_warmup_reference(0, n) == pytest.approx(0.01)
    ramp = [_spam_warmup_reference(s, n) for s in range(n + 1)]
    assert ramp == sorted(ramp) and ramp[-1] == 1.0


def test_spam_full_optimizer_applies_decoupled_weight_decay():
    lr, wd = 0.01, 0.1
    params = {"w": _f32([1.0, -2.0, 3.0])}
    grads = {"w": _f32([0.2, 0.1, -0.3])}
    (direction,), _ = _run(baselines.scale_by_spam(), [grads], params)
    (updates,), _ = _run(baselines.spam(lr, weight_decay=wd), [grads], params)
    expected = -lr * (np.asarray(direction["w"]) + wd * np.asarray(params["w"]))
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


def test_spam_learning_rate_schedule():
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    tx = baselines.spam(schedule)
    g = _f32([1.0])
    outs, _ = _run(tx, [g, g])
    np.testing.assert_allclose(outs[0], [-1.0], rtol=1e-6)
    np.testing.assert_allclose(outs[1], [-0.9], rtol=BIAS_RTOL)


# ----------------------------------------------------------------------------- ZClip


def _zclip_reference(norms, alpha, z_threshold, warmup, eps):
    """The ZClip reference loop on a stream of norms: output norms and final mean/var."""
    buffer, mean, var, outs = [], None, None, []
    for g in norms:
        if mean is None:
            buffer.append(g)
            outs.append(g)
            if len(buffer) == warmup:
                mean, var = np.mean(buffer), np.var(buffer)
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + eps)
        x = mean + z_threshold**2 / z * std if z > z_threshold else g
        outs.append(x)
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return np.array(outs), mean, var


def _grads_with_norms(norms):
    """2-leaf gradients along a fixed direction with the given global norms."""
    direction = {"a": _f32([0.6, 0.0]), "b": _f32([[0.0, -0.8]])}
    return [jax.tree.map(lambda d, n=n: d * np.float32(n), direction) for n in norms]


def test_zclip_rescales_spike_to_reciprocal_z_target():
    norms = [1.0, 1.2, 0.9, 1.1, 1.0, 1.05, 0.95, 50.0, 1.0, 1.1]
    alpha, zt, warmup, eps = 0.9, 2.5, 5, 1e-6
    tx = baselines.zclip(alpha=alpha, z_threshold=zt, warmup_steps=warmup, eps=eps)
    grads = _grads_with_norms(norms)
    outs, states = _run(tx, grads)

    ref_norms, ref_mean, ref_var = _zclip_reference(norms, alpha, zt, warmup, eps)
    assert ref_norms[7] < 2.0  # the spike was pulled in close to the mean
    out_norms = np.array([_norm(o) for o in outs])
    np.testing.assert_allclose(out_norms, ref_norms, rtol=1e-5)
    # The spike keeps its direction; every other step is bit-identical.
    scale = ref_norms[7] / norms[7]
    jax.tree.map(
        lambda o, g: np.testing.assert_allclose(o, scale * g, rtol=1e-5), outs[7], grads[7]
    )
    for i in set(range(len(norms))) - {7}:
        _assert_trees_equal(outs[i], grads[i])
    assert float(states[-1].mean) == pytest.approx(ref_mean, rel=1e-5)
    assert float(states[-1].var) == pytest.approx(ref_var, rel=1e-4)
    assert int(states[-1].num_clipped) == 1


def test_zclip_warmup_only_collects_statistics():
    norms = [1.0, 2.0, 100.0, 3.0, 4.0]  # a spike inside the warm-up is left alone
    tx = baselines.zclip(warmup_steps=5)
    grads = _grads_with_norms(norms)
    outs, states = _run(tx, grads)
    for o, g in zip(outs, grads, strict=True):
        _assert_trees_equal(o, g)
    assert int(states[-1].count) == 5
    assert float(states[-1].mean) == pytest.approx(np.mean(norms), rel=1e-6)
    assert float(states[-1].var) == pytest.approx(np.var(norms), rel=1e-5)
    assert int(states[-1].num_clipped) == 0


def test_zclip_benign_stream_is_untouched():
    rng = np.random.default_rng(0)
    norms = list(1.0 + 0.05 * rng.standard_normal(40))
    tx = baselines.zclip(warmup_steps=10)
    grads = _grads_with_norms(norms)
    outs, states = _run(tx, grads)
    assert int(states[-1].num_clipped) == 0
    for o, g in zip(outs, grads, strict=True):
        _assert_trees_equal(o, g)
    _, ref_mean, ref_var = _zclip_reference(norms, 0.97, 2.5, 10, 1e-6)
    assert float(states[-1].mean) == pytest.approx(ref_mean, rel=1e-5)
    assert float(states[-1].var) == pytest.approx(ref_var, rel=1e-3)


def test_zclip_nonfinite_gradient_passes_and_is_not_recorded():
    tx = baselines.zclip(warmup_steps=2)
    grads = _grads_with_norms([1.0, 2.0, 1.5])
    bad = jax.tree.map(lambda g: g * np.float32(np.nan), grads[0])
    outs, states = _run(tx, grads + [bad])
    assert np.isnan(np.asarray(outs[-1]["a"])).any()
    for field in ("count", "mean", "var", "num_clipped"):
        assert getattr(states[-1], field) == getattr(states[-2], field)


# ----------------------------------------------------------------------------- AdaGC


def _leaf_grads(a_scale=1.0, b_scale=1.0, c_scale=1.0):
    return {
        "a": _f32([3.0, 4.0]) * np.float32(a_scale),  # norm 5
        "b": _f32([[1.0, 2.0], [2.0, 4.0]]) * np.float32(b_scale),  # norm 5
        "c": _f32([0.5]) * np.float32(c_scale),  # norm 0.5
    }


def _gamma(state, grads, name):
    return float(state.gamma[otree.make_partition(grads).index(name)])


def test_adagc_warmup_clips_global_norm_and_takes_min_of_clipped_norms():
    tx = baselines.adagc(warmup_steps=3, warmup_clip=2.0, eps=0.0)
    grads = [_leaf_grads(), _leaf_grads(a_scale=0.1), _leaf_grads(c_scale=0.01)]
    outs, states = _run(tx, grads)
    for o, g in zip(outs, grads, strict=True):  # every warm-up step is clipped to norm 2
        gn = _norm(g)
        assert _norm(o) == pytest.approx(2.0, rel=1e-6)
        jax.tree.map(
            lambda x, y, gn=gn: np.testing.assert_allclose(x, y * 2.0 / gn, rtol=1e-6), o, g
        )
    clipped_norms = {name: [_norm(o[name]) for o in outs] for name in ("a", "b", "c")}
    for name, values in clipped_norms.items():
        assert _gamma(states[-1], grads[0], name) == pytest.approx(min(values), rel=1e-6)
    assert int(states[-1].num_warmup_clipped) == 3
    assert int(states[-1].num_clipped) == 0


def test_adagc_rescales_only_the_spiking_tensor():
    lam, beta, eps = 1.05, 0.98, 1e-6
    tx = baselines.adagc(relative_threshold=lam, decay=beta, warmup_steps=2, warmup_clip=100.0)
    grads = [_leaf_grads(), _leaf_grads(), _leaf_grads(), _leaf_grads(a_scale=40.0)]
    outs, states = _run(tx, grads)
    before, after = states[-2], states[-1]
    gamma_a, gamma_b = _gamma(before, grads[0], "a"), _gamma(before, grads[0], "b")
    assert gamma_a == pytest.approx(5.0, rel=1e-6)

    spike_norm = 200.0
    clipped_norm = lam * gamma_a * spike_norm / (spike_norm + eps)
    np.testing.assert_allclose(outs[-1]["a"], grads[-1]["a"] * clipped_norm / spike_norm, rtol=1e-6)
    assert _norm(outs[-1]["a"]) == pytest.approx(lam * gamma_a, rel=1e-6)
    _assert_trees_equal(outs[-1]["b"], grads[-1]["b"])
    _assert_trees_equal(outs[-1]["c"], grads[-1]["c"])
    assert _gamma(after, grads[0], "a") == pytest.approx(
        beta * gamma_a + (1 - beta) * clipped_norm, rel=1e-6
    )
    assert _gamma(after, grads[0], "b") == pytest.approx(
        beta * gamma_b + (1 - beta) * 5.0, rel=1e-6
    )
    assert int(after.num_clipped) == 1
    assert int(after.num_warmup_clipped) == 0


def test_adagc_benign_stream_is_untouched_after_warmup():
    rng = np.random.default_rng(1)
    factors = 1.0 + 0.01 * rng.standard_normal((30, 3))
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
    assert _gamma(states[-1], quiet, "c") == pytest.approx(0.5)


# ------------------------------------------------------------------------- skip_step


def _benign_grads(n, scale=1.0):
    base = {"w": _f32([[0.3, -0.4], [0.5, 0.1]]), "b": _f32([0.2, -0.1])}
    return [jax.tree.map(lambda x, i=i: x * scale * (1 + 0.05 * (i % 3)), base) for i in range(n)]


@functools.cache
def _skip_tx():
    return baselines.skip_step(optax.adam(0.1), window=8, num_sigma=6.0, min_history=4)


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
    assert int(after.num_skipped) == 1
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
    # The window holds the last accepted grad norms in order.
    norms = [_norm(g) for g in grads]
    np.testing.assert_allclose(after.history[:7], norms, rtol=1e-6)


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
    for norm, skipped in ((bound * 0.999, 0), (bound * 1.001, 1)):
        g = jax.tree.map(lambda d, n=norm: d * np.float32(n), direction)
        _, state = update(g, states[-1], grads[0])
        assert int(state.num_skipped) == skipped


def test_skip_step_monitors_loss_when_given():
    tx = _skip_tx()
    grads = _benign_grads(6)
    params = grads[0]
    update = _jit_update(tx)
    state = tx.init(params)
    losses = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95]
    for g, loss in zip(grads, losses, strict=True):
        _, state = update(g, state, params, loss=np.float32(loss))
    np.testing.assert_allclose(state.history[:6], losses, rtol=1e-6)

    inner_before = state.inner_state
    out, state = update(grads[0], state, params, loss=np.float32(50.0))  # benign grads
    assert int(state.num_skipped) == 1
    _assert_trees_equal(state.inner_state, inner_before)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(out))

    out, state = update(grads[0], state, params, loss=np.float32(2.0))
    assert int(state.num_skipped) == 1 and int(state.num_values) == 7


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
        ("alpha", "z_threshold", "warmup_steps"),
    ),
    "adagc": (
        lambda: optax.inject_hyperparams(baselines.adagc)(warmup_steps=2),
        ("relative_threshold", "decay", "warmup_steps", "warmup_clip"),
    ),
    "skip_step": (
        lambda: optax.inject_hyperparams(baselines.skip_step, static_args="window")(
            optax.adam(1e-2), window=4, min_history=2
        ),
        ("num_sigma", "min_history"),
    ),
}


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_inject_hyperparams_matches_plain(name):
    make_injected, traced = INJECTED[name]
    grads = _spiky_stream()
    plain_outs, plain_states = _run(_chained(name), grads)
    injected_outs, injected_states = _run(make_injected(), grads)
    assert set(traced) <= set(injected_states[-1].hyperparams)
    for p, i in zip(plain_outs, injected_outs, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), p, i)
    _assert_trees_equal(injected_states[-1].inner_state, plain_states[-1])


def test_injected_hyperparameter_can_be_changed_at_run_time():
    tx = optax.inject_hyperparams(baselines.zclip)(warmup_steps=2)
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
    _, plain_states = _run(tx, grads)  # same numbers up to XLA's fusion choices
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), final, plain_states[-1])
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
