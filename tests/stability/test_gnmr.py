"""Behaviour of the GNMR controller: triggers, budget, lock, actions, telemetry."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optstab
from optstab.stability.gnmr import GNMRControl, GNMRState, GNMRTelemetry

PARAMS = {"a": jnp.ones(4), "b": jnp.ones(3), "c": jnp.ones((2, 2))}
NAMES = ("a", "b", "c")
# float32 machine epsilon: one correctly rounded operation errs by at most EPS32 / 2
# relative, so a chain of n such operations stays within about n * EPS32 / 2.
# Exact float32 equalities below rest on: sums of squares of small integers are exact,
# sqrt is correctly rounded, and a bias-corrected EMA of equal values x is exactly x
# (its first weight (1 - d) / (1 - d**1) is exactly 1 for a faithful pow, which is
# exact whenever the result is representable; later steps add w * (x - x) = 0).
EPS32 = 2.0**-23
G = 0  # the gradient's row in the (signals, units) statistics
# The bars the hand computations below assume (the defaults before issue 15's
# calibration), named so that the tests do not move with the library's defaults.
BARS = dict(threshold=3.0, delta_threshold=2.0, delta_gate=1.0)


def grads_with(scale_a=1.0, scale_b=1.0, scale_c=1.0):
    return {"a": scale_a * jnp.ones(4), "b": scale_b * jnp.ones(3), "c": scale_c * jnp.ones((2, 2))}


def run(tx, grad_list, params=PARAMS):
    """Runs ``tx`` over ``grad_list`` under jit; returns the updates and states per step."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, states = [], []
    for grads in grad_list:
        upd, state = step(grads, state, params)
        updates.append(upd)
        states.append(state)
    return updates, states


def mask_of(state):
    return {k: bool(v) for k, v in optstab.recovery_mask(state).items()}


def test_spike_enters_recovery_holds_for_lock_and_is_released():
    lock = 4
    tx = optstab.gnmr(warmup_steps=5, lock_steps=lock, action="precision")
    grads = [grads_with()] * 8 + [grads_with(scale_a=50.0)] + [grads_with()] * (lock + 2)
    _, states = run(tx, grads)
    spike = 8
    assert not any(mask_of(s)["a"] for s in states[:spike])
    # Published for exactly ``lock`` forward passes after the spike, then released.
    published = [mask_of(s)["a"] for s in states[spike:]]
    assert published == [True] * lock + [False] * (len(published) - lock)
    # Acted on at the spike and for the lock interval after it.
    acted = [bool(s.telemetry.recovering[0]) for s in states[spike:]]
    assert acted == [True] * (lock + 1) + [False] * (len(acted) - lock - 1)
    assert not any(mask_of(s)["b"] or mask_of(s)["c"] for s in states)
    final = states[-1]
    assert int(final.telemetry.triggers) == 1 and int(final.telemetry.recovered_steps) == lock + 1
    assert int(final.telemetry.denied) == 0 and int(final.telemetry.nonfinite) == 0


def test_no_trigger_during_warmup_except_nonfinite():
    tx = optstab.gnmr(warmup_steps=10, action="clip")
    grads = [grads_with()] * 3 + [grads_with(scale_b=100.0), grads_with(scale_c=jnp.nan)]
    updates, states = run(tx, grads)
    assert not bool(states[3].telemetry.recovering[1])
    np.testing.assert_array_equal(updates[3]["b"], 100.0 * np.ones(3))  # unclipped in warm-up
    assert bool(states[4].telemetry.recovering[2]) and int(states[4].telemetry.nonfinite) == 1
    assert np.all(np.asarray(updates[4]["c"]) == 0.0)


def test_clip_bounds_only_the_spiking_unit():
    tx = optstab.gnmr(warmup_steps=3, action="clip", threshold=3.0)
    grads = [grads_with()] * 5 + [grads_with(scale_a=40.0, scale_b=2.0)]
    updates, states = run(tx, grads)
    # ||ones(4)|| = 2 exactly, and an EMA of equal values stays exactly at that value.
    assert float(states[4].control.mean[G, 0]) == 2.0
    # Clip factor 6 / 80 and the product 40 * factor: 2 roundings (norm in float64).
    clipped_norm = np.linalg.norm(np.asarray(updates[5]["a"], np.float64))
    np.testing.assert_allclose(clipped_norm, 6.0, rtol=EPS32)
    np.testing.assert_array_equal(updates[5]["b"], 2.0 * np.ones(3))  # b is below its bar
    np.testing.assert_array_equal(updates[5]["c"], np.ones((2, 2)))


def test_delta_gnmr_catches_a_fast_climb_below_the_gnmr_bar():
    grads = [grads_with()] * 30 + [grads_with(scale_b=2.5)]
    _, states = run(optstab.gnmr(warmup_steps=5, action="clip", **BARS), grads)
    # GNMR = Delta-GNMR = ||2.5 ones(3)|| / ||ones(3)|| = 2.5 (both means hold exactly
    # sqrt(3) in float32): two sqrt and a division, 3 roundings, rtol 2 * EPS32.
    np.testing.assert_allclose(states[-1].telemetry.gnmr[G, 1], 2.5, rtol=2 * EPS32)  # below 3
    np.testing.assert_allclose(
        states[-1].telemetry.delta_gnmr[G, 1], 2.5, rtol=2 * EPS32
    )  # above 2
    assert bool(states[-1].telemetry.recovering[1])
    no_delta = {**BARS, "delta_threshold": None}
    _, states = run(optstab.gnmr(warmup_steps=5, action="clip", **no_delta), grads)
    assert not bool(states[-1].telemetry.recovering[1])


def test_delta_gate_sets_how_far_above_its_mean_a_climb_must_be():
    # b steps from 1 to 1.8 times its constant norm: GNMR = Delta-GNMR = 1.8 (means
    # exact as above; two sqrt and a division: rtol 2 * EPS32, far from every bar).
    grads = jax.tree.map(lambda *g: jnp.stack(g), *[grads_with()] * 30, grads_with(scale_b=1.8))
    bars = dict(warmup_steps=5, threshold=3.0, delta_threshold=1.5, action="clip")

    @jax.jit
    def last_telemetry(gate):  # the gate traced: one compilation for every value
        tx = optstab.gnmr(delta_gate=gate, **bars)
        step = lambda state, g: (tx.update(g, state)[1], None)
        return jax.lax.scan(step, tx.init(PARAMS), grads)[0].telemetry

    for gate, at_risk in ((1.0, True), (1.5, True), (2.0, False), (0.0, True)):
        last = last_telemetry(jnp.float32(gate))
        assert bool(last.recovering[1]) is at_risk, gate
        # Score: Delta-GNMR / 1.5 = 1.2 when the gate is open, else GNMR / 3 = 0.6.
        np.testing.assert_allclose(last.score[1], 1.2 if at_risk else 0.6, rtol=3 * EPS32)
    with pytest.raises(ValueError, match="delta_gate"):
        optstab.gnmr(delta_gate=-0.5)
    with pytest.raises(ValueError, match="delta_gate"):
        optstab.gnmr_wrap(optax.sgd(0.1), delta_gate=-0.5)


def test_statistics_freeze_while_recovering():
    tx = optstab.gnmr(warmup_steps=3, lock_steps=3, action="precision")
    # A 3-update spike, within the lock: frozen from entry to release, no re-baseline.
    grads = [grads_with()] * 4 + [grads_with(scale_a=20.0)] * 3 + [grads_with()] * 2
    _, states = run(tx, grads)
    before = float(states[3].control.mean[G, 0])
    for s in states[4:8]:
        assert float(s.control.mean[G, 0]) == before and int(s.control.mean_count[G, 0]) == 4
    assert int(states[8].control.mean_count[G, 0]) == 5  # released: observes again
    assert int(states[8].telemetry.rebaselines) == 0


def test_budget_denies_and_ranks_by_score():
    tx = optstab.gnmr(warmup_steps=3, max_recover=1, lock_steps=2, action="clip")
    grads = [grads_with()] * 4 + [grads_with(scale_a=10.0, scale_b=30.0, scale_c=5.0)]
    _, states = run(tx, grads)
    assert [bool(x) for x in states[-1].telemetry.recovering] == [False, True, False]
    assert int(states[-1].telemetry.denied) == 2 and int(states[-1].telemetry.triggers) == 1


def test_nonfinite_never_reaches_params_or_statistics_even_when_denied():
    tx = optax.chain(optstab.gnmr(max_recover=0, warmup_steps=0), optax.sgd(0.1))
    grads = [grads_with(), grads_with(scale_a=jnp.inf, scale_b=jnp.nan), grads_with()]
    updates, states = run(tx, grads)
    for key in ("a", "b"):
        assert np.all(np.asarray(updates[1][key]) == 0.0)
    found = optstab.find_gnmr_state(states[-1])
    assert np.all(np.isfinite(np.asarray(found.control.mean)))
    assert int(found.telemetry.nonfinite) == 2 and int(found.telemetry.denied) == 2


def test_skip_in_wrapper_freezes_the_units_inner_state_exactly():
    tx = optstab.gnmr_wrap(optax.adam(0.1), warmup_steps=3, lock_steps=2, action="skip")
    grads = [grads_with(scale_b=0.5)] * 4 + [grads_with(scale_a=30.0, scale_b=0.7)]
    updates, states = run(tx, grads)
    before, after = states[-2].inner[0], states[-1].inner[0]
    np.testing.assert_array_equal(after.mu["a"], before.mu["a"])
    np.testing.assert_array_equal(after.nu["a"], before.nu["a"])
    assert np.all(np.asarray(updates[-1]["a"]) == 0.0)
    # The other units advance exactly as under Adam alone (Adam is elementwise and
    # the shared count advanced): the same elementwise float32 formula in another
    # program. XLA does not reassociate it without fast-math but may contract a * b + c
    # into one FMA (a rounding fewer, about 2 per step over 5 steps): rtol 10 * EPS32.
    adam = optax.adam(0.1)
    alone, adam_update = adam.init(PARAMS["b"]), jax.jit(adam.update)
    for g in grads:
        expected, alone = adam_update(g["b"], alone)
    np.testing.assert_allclose(after.mu["b"], alone[0].mu, rtol=10 * EPS32)
    np.testing.assert_allclose(updates[-1]["b"], expected, rtol=10 * EPS32)


def test_reset_zeroes_the_units_moments_when_it_enters_recovery():
    tx = optstab.gnmr_wrap(optax.adam(0.1), warmup_steps=3, action=("clip", "reset"), **BARS)
    grads = [grads_with()] * 4 + [grads_with(scale_c=30.0)]
    _, states = run(tx, grads)
    inner = states[-1].inner[0]
    # Reset to zero, then one clipped gradient folded in: mu = (1 - b1) * g_clipped.
    clipped = 3.0 * 2.0 / np.linalg.norm(30.0 * np.ones((2, 2)))
    # Clip (norm, factor, product: 3 roundings) and Adam's (1 - b1) * g: 5 roundings.
    np.testing.assert_allclose(
        inner.mu["c"], 0.1 * 30.0 * clipped * np.ones((2, 2)), rtol=3 * EPS32
    )
    # Untouched: five EMA steps of 3 roundings (7.5 EPS32), and 0.9's float32 rounding
    # (0.19 EPS32) amplified 3.3x in 1 - 0.9**5 (1.4 EPS32): rtol 10 * EPS32.
    np.testing.assert_allclose(inner.mu["a"], (1 - 0.9**5) * np.ones(4), rtol=10 * EPS32)


def test_chain_form_rejects_reset_and_bad_config_names_the_argument():
    with pytest.raises(ValueError, match="gnmr_wrap"):
        optstab.gnmr(action=("reset",))
    bad = [
        (dict(threshold=0.0), "threshold"),
        (dict(delta_threshold=-1.0), "delta_threshold"),
        (dict(max_recover=-1), "max_recover"),
        (dict(max_recover=1.5), "max_recover"),
        (dict(lock_steps=-2), "lock_steps"),
        (dict(lock_steps=0), "lock_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(action=("precision", "explode")), "action"),
        (dict(action=()), "action"),
        (dict(decay=1.0), "decay"),
        (dict(short_decay=1.0), "short_decay"),
        (dict(mean_mode="median"), "mean_mode"),
        (dict(short_window=0), "short_window"),
        (dict(eps=0.0), "eps"),
        (dict(units="all"), "units"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            tx = optstab.gnmr(**kwargs)
            tx.init(PARAMS)  # units are only seen at init


def test_cumulative_mean_and_window_short_signal():
    norms = [1.0, 2.0, 3.0, 4.0, 5.0]
    grads = [grads_with(scale_a=x) for x in norms]
    tx = optstab.gnmr(mean_mode="cumulative", short_window=2, warmup_steps=100)
    _, states = run(tx, grads)
    # Norms 2, 4, ..., 10 (exact); five running-mean steps of 3 roundings each.
    np.testing.assert_allclose(states[-1].control.mean[G, 0], 2.0 * np.mean(norms), rtol=8 * EPS32)
    # Delta-GNMR of the last step divides by the mean of the two norms before it:
    # a sum, a division by the count and the ratio, 3 roundings.
    np.testing.assert_allclose(states[-1].telemetry.delta_gnmr[G, 0], 5.0 / 3.5, rtol=2 * EPS32)


def test_ema_mean_is_bias_corrected():
    grads = [grads_with(scale_a=x) for x in (1.0, 3.0)]
    _, states = run(optstab.gnmr(decay=0.9, warmup_steps=100), grads)
    expected = 2.0 * (0.9 * 0.1 * 1.0 + 0.1 * 3.0) / (1 - 0.9**2)
    # The first weight is exactly 1 (see EPS32). The second, (1 - d) / (1 - d**2):
    # pow within 1 ulp (EPS32 / 2 absolute), amplified 4.3x by 1 - 0.81, and 2 more
    # roundings: 3.2 EPS32 on a weight that moves the mean by half; 3 roundings for the
    # update: rtol 4 * EPS32.
    np.testing.assert_allclose(states[-1].control.mean[G, 0], expected, rtol=4 * EPS32)


def test_traced_hyperparameters_under_inject_hyperparams():
    make = optax.inject_hyperparams(optstab.gnmr, static_args=("action", "units"))
    grads = [grads_with()] * 4 + [grads_with(scale_a=5.0)]
    _, low = run(make(threshold=3.0, delta_threshold=10.0, warmup_steps=2), grads)
    _, high = run(make(threshold=8.0, delta_threshold=10.0, warmup_steps=2), grads)
    assert bool(optstab.find_gnmr_state(low[-1]).telemetry.recovering[0])
    assert not bool(optstab.find_gnmr_state(high[-1]).telemetry.recovering[0])
    assert low[-1].hyperparams["threshold"].dtype == jnp.float32


def test_telemetry_found_through_nested_states():
    inner = optax.chain(optstab.gnmr(warmup_steps=1), optax.adam(1e-2))
    wrapped = [
        inner,
        optstab.gnmr_wrap(optax.adam(1e-2), warmup_steps=1),
        optax.inject_hyperparams(optstab.gnmr)(warmup_steps=1),
        optax.MultiSteps(inner, every_k_schedule=1),
    ]
    grads = [grads_with()] * 3 + [grads_with(scale_c=100.0)]
    for tx in wrapped:
        _, states = run(tx, grads)
        metrics = optstab.gnmr_metrics(states[-1])
        assert set(metrics["gnmr"]) == set(NAMES)
        assert mask_of(states[-1]) == {"a": False, "b": False, "c": True}
        assert int(metrics["triggers"]) == 1 and int(metrics["num_recovering"]) == 1
    with pytest.raises(ValueError, match="exactly one GNMR state"):
        optstab.recovery_mask(optax.adam(1e-3).init(PARAMS))


def test_statistics_float32_and_updates_keep_bf16():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    grads = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads_with(scale_a=s)) for s in (1, 9)]
    updates, states = run(optstab.gnmr(warmup_steps=1, action="clip"), grads, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates[-1]))
    assert (
        states[-1].control.mean.dtype == jnp.float32
        and states[-1].telemetry.norm.dtype == jnp.float32
    )
    assert bool(states[-1].telemetry.recovering[0])


def test_vmapped_states_give_batched_masks():
    tx = optstab.gnmr(warmup_steps=1, action="clip")
    scales = jnp.array([1.0, 50.0])

    def two_steps(scale):
        state = tx.init(PARAMS)
        _, state = tx.update(grads_with(), state)
        _, state = tx.update(grads_with(scale_a=scale), state)
        return state

    states = jax.jit(jax.vmap(two_steps))(scales)
    np.testing.assert_array_equal(optstab.recovery_mask(states)["a"], [False, True])


def test_stacked_units_split_a_leaf_along_axis_0():
    params = {"layers": {"w": jnp.ones((3, 2, 2)), "b": jnp.ones((3, 2))}, "head": jnp.ones(2)}
    units = optstab.units.stacked(r"^layers/", optstab.units.by_depth(1))
    tx = optstab.gnmr(warmup_steps=2, action="clip", units=units, **BARS)
    spike = jax.tree.map(jnp.ones_like, params)
    spike["layers"]["w"] = spike["layers"]["w"].at[1].multiply(100.0)
    grads = [jax.tree.map(jnp.ones_like, params)] * 3 + [spike]
    updates, states = run(tx, grads, params)
    assert mask_of(states[-1]) == {
        "head": False,
        "layers/0": False,
        "layers/1": True,
        "layers/2": False,
    }
    # Only layer 1's slices are clipped: its kernel and bias slice together.
    np.testing.assert_array_equal(updates[-1]["layers"]["w"][0], np.ones((2, 2)))
    np.testing.assert_array_equal(updates[-1]["layers"]["b"][2], np.ones(2))
    # Hand computation: layer 1's mean norm is ||(ones(2, 2), ones(2))|| = sqrt(6); the
    # spike's is sqrt(4 * 100**2 + 2) = sqrt(40002), clipped to 3 sqrt(6) ~ 7.348 as a
    # whole. Integer sums are exact in float32; two sqrt, the bar, the factor and the
    # product: 5 roundings, rtol 3 * EPS32.
    factor = 3.0 * np.sqrt(6.0) / np.sqrt(40002.0)
    w1, b1 = updates[-1]["layers"]["w"][1], updates[-1]["layers"]["b"][1]
    np.testing.assert_allclose(w1, 100.0 * factor * np.ones((2, 2)), rtol=3 * EPS32)
    np.testing.assert_allclose(b1, factor * np.ones(2), rtol=3 * EPS32)
    clipped_norm = np.sqrt(np.sum(np.square(np.float64(w1))) + np.sum(np.square(np.float64(b1))))
    np.testing.assert_allclose(clipped_norm, 3.0 * np.sqrt(6.0), rtol=3 * EPS32)


def test_nnx_unit_names_follow_the_model_attributes():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.l2 = nnx.Linear(4, 2, rngs=rngs)

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(optstab.gnmr(), optax.sgd(0.1)), wrt=nnx.Param)
    names = set(optstab.recovery_mask(optimizer.opt_state))
    assert names == {"l1/kernel", "l1/bias", "l2/kernel", "l2/bias"}


@settings(max_examples=max(25, settings.default.max_examples))  # thorough profile: 100
@given(
    max_recover=st.integers(0, 3),
    lock=st.integers(1, 4),
    factor=st.sampled_from([1.0, 2.0, 10.0]),
    static_budget=st.booleans(),
    storm=st.lists(
        st.lists(
            st.sampled_from([1.0, 1.0, 1.0, 4.0, 30.0, 1000.0, np.nan]), min_size=6, max_size=6
        ),
        min_size=6,
        max_size=20,
    ),
)
def test_budget_is_never_exceeded_and_preemption_takes_only_far_stronger_scores(
    max_recover, lock, factor, static_budget, storm
):
    params = {f"u{i}": jnp.ones(3) for i in range(6)}
    # A Python budget bounds top_k to it; a traced one sorts every unit.
    step = _storm_step(static_budget)
    state = optstab.gnmr(warmup_steps=2).init(params)
    for _ in range(3):
        state = step(jax.tree.map(jnp.ones_like, params), state, max_recover, lock, factor)
    factor32 = np.float32(factor)  # the controller compares factor * peak in float32
    peak = np.zeros(6, np.float32)  # each locked unit's highest score since it entered
    for scales in storm:
        grads = {f"u{i}": s * jnp.ones(3) for i, s in enumerate(scales)}
        locked_before = np.asarray(state.control.lock) > 0
        state = step(grads, state, max_recover, lock, factor)
        recovering = np.asarray(state.telemetry.recovering)
        score = np.asarray(state.telemetry.score)
        # The score is the documented one: a division and a max, 1 rounding apart at
        # most (a division by a constant may be compiled as a reciprocal product).
        np.testing.assert_allclose(score, _documented_score(state, **BARS), rtol=2 * EPS32)
        entered = recovering & ~locked_before
        preempted = locked_before & ~recovering
        survivors = locked_before & recovering
        at_risk = (score > 1.0) | ~np.isfinite(np.asarray(state.telemetry.norm))
        denied = at_risk & ~locked_before & ~entered
        assert recovering.sum() <= max_recover
        assert (np.asarray(state.control.lock) > 0).sum() <= max_recover
        assert not np.any(entered & ~at_risk)
        if entered.any() and denied.any():  # the highest candidates win
            assert score[entered].min() >= score[denied].max()
        if preempted.any():  # each preempted slot went to a score > factor * its peak
            assert entered.sum() >= preempted.sum()
            assert score[entered].min() > factor32 * peak[preempted].max()
        if denied.any() and survivors.any():  # and no preemption was missed
            assert score[denied].max() <= factor32 * peak[survivors].min()
        if denied.any():  # a denial means the budget was full
            assert recovering.sum() == max_recover
        peak = np.where(entered, score, np.where(survivors, np.maximum(peak, score), 0))
        peak = np.where(np.asarray(state.control.lock) > 0, peak, 0).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(state.control.lock_score), peak)
        assert int(state.telemetry.preempted) >= preempted.sum()


def _documented_score(state, threshold, delta_threshold, delta_gate):
    """The module docstring's ranking score, in float32 like the controller:
    ``max(GNMR / threshold, Delta-GNMR / delta_threshold)``, the second term only
    while ``GNMR > delta_gate``; inf for a non-finite norm."""
    gnmr = np.asarray(state.telemetry.gnmr[G], np.float32)
    delta = np.asarray(state.telemetry.delta_gnmr[G], np.float32)
    climbing = gnmr > np.float32(delta_gate)
    delta_term = np.where(climbing, delta / np.float32(delta_threshold), np.float32(0.0))
    score = np.maximum(gnmr / np.float32(threshold), delta_term)
    return np.where(np.isfinite(np.asarray(state.telemetry.norm)), score, np.inf)


_STORM_STEP = {}


def _storm_step(static_budget):
    """The compiled step shared by all hypothesis examples (traced lock and preemption
    factor; the budget static or traced)."""
    if static_budget not in _STORM_STEP:

        def step(grads, state, max_recover, lock, factor):
            tx = optstab.gnmr(
                warmup_steps=2, max_recover=max_recover, lock_steps=lock, preempt_factor=factor,
                **BARS,
            )  # fmt: skip
            return tx.update(grads, state)[1]

        static = (2,) if static_budget else ()
        _STORM_STEP[static_budget] = jax.jit(step, static_argnums=static)
    return _STORM_STEP[static_budget]


def test_gnmr_and_gnmr_wrap_share_their_options():
    chained = inspect.signature(optstab.gnmr).parameters
    wrapped = inspect.signature(optstab.gnmr_wrap).parameters
    assert set(wrapped) == set(chained) | {"inner", "reset_warmup_steps"}
    for name, parameter in chained.items():
        if name != "action":  # the defaults differ: ("precision", "clip") vs ("skip",)
            assert wrapped[name].default == parameter.default, name
            assert wrapped[name].kind == parameter.kind, name


def test_state_fields_have_declared_dtypes():
    state = optstab.gnmr().init(PARAMS)
    assert isinstance(state, GNMRState)
    assert isinstance(state.control, GNMRControl) and isinstance(state.telemetry, GNMRTelemetry)
    assert state.units.names == NAMES and list(state.units) == list(NAMES)
    assert state.control.count.dtype == jnp.int32 and state.control.lock.dtype == jnp.int32
    assert state.telemetry.recovering.dtype == jnp.bool_
    assert jax.tree.leaves(state.units) == []  # names are static, not checkpointed arrays


def test_a_denied_spike_raises_the_baseline_by_a_bounded_factor():
    tx = optstab.gnmr(max_recover=0, warmup_steps=3, action="clip", **BARS)
    grads = [grads_with()] * 30 + [grads_with(scale_a=1000.0)]
    _, states = run(tx, grads)
    before, after = float(states[-2].control.mean[G, 0]), float(states[-1].control.mean[G, 0])
    assert int(states[-1].telemetry.denied) == 1 and not bool(states[-1].telemetry.recovering[0])
    weight = 0.01 / (1 - 0.99**31)  # the bias-corrected EMA's 31st weight
    # The weight (1 - d) / (1 - d**31): pow within 1 ulp and 0.99's float32 rounding
    # raised to the 31st power, both amplified 2.7x by 1 - 0.732, and 0.99's rounding
    # again in 1 - d: < 20 EPS32 on a weight that is 7% of the mean; 2 roundings for the
    # update: rtol 4 * EPS32.
    assert before == 2.0
    np.testing.assert_allclose(after, before * (1 + (3.0 - 1.0) * weight), rtol=4 * EPS32)
    # During warm-up nothing is capped: the history is still being formed.
    _, states = run(optstab.gnmr(warmup_steps=100), [grads_with(), grads_with(scale_a=9.0)])
    # The second weight (1 - d) / (1 - d**2): pow within 1 ulp (EPS32 / 2 absolute)
    # over 1 - 0.9801 = 0.0199 is 25 EPS32 relative; it moves the mean by 80%, with 3
    # more roundings: rtol 30 * EPS32.
    np.testing.assert_allclose(
        states[-1].control.mean[G, 0], 2.0 * (0.99 + 9.0) / 1.99, rtol=30 * EPS32
    )


def test_reset_ramps_the_units_step_size_back_up():
    tx = optstab.gnmr_wrap(
        optax.sgd(1.0), warmup_steps=3, lock_steps=1, action=("clip", "reset"),
        reset_warmup_steps=4,
    )  # fmt: skip
    grads = [grads_with()] * 4 + [grads_with(scale_a=30.0)] + [grads_with()] * 5
    updates, states = run(tx, grads)
    ages = [int(s.reset_age[0]) for s in states[4:]]
    assert ages == [0, 1, 2, 3, 4, 5]
    # sgd(1.0): the update is -g times the ramp, 0.01 on the reset step, 1 after 4 steps.
    factors = [float(-updates[t]["a"][0]) / float(grads[t]["a"][0]) for t in range(6, 10)]
    # The angle pi * s / 5 carries ~2.5 EPS32 (pi's rounding, a product, a division),
    # moving cos by 2.4 EPS32 absolute; cos itself within 4 ulp (EPS32 / 2 at 0.31);
    # then 1 + cos, two products, 1 - x and the update: ~4 EPS32 absolute on ramps of
    # 0.35 and 0.66: rtol 16 * EPS32.
    np.testing.assert_allclose(factors[:2], [1 - 0.99 * 0.5 * (1 + np.cos(np.pi * k / 5))
                                             for k in (2, 3)], rtol=16 * EPS32)  # fmt: skip
    assert factors[-1] == 1.0
    np.testing.assert_array_equal(updates[6]["b"], -np.ones(3))  # other units unramped


def _traced_lock_run(make_tx, configs, grad_list):
    """Runs ``make_tx(*config)`` over ``grad_list`` for each config (a tuple of ints),
    with one compile (the ints are traced arguments); returns the states per config and
    step."""

    @jax.jit
    def run_one(config):
        tx = make_tx(*config)

        def step(state, grads):
            _, state = tx.update(grads, state, PARAMS)
            return state, state

        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grad_list)
        return jax.lax.scan(step, tx.init(PARAMS), stacked)[1]

    return {config: run_one(tuple(jnp.int32(x) for x in config)) for config in configs}


def test_lock_zero_is_rejected_and_a_short_spike_never_moves_the_baseline():
    # lock_steps = 0 would put a unit in recovery without ever publishing it.
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="lock_steps"):
            optstab.gnmr(lock_steps=bad)
        with pytest.raises(ValueError, match="lock_steps"):
            optstab.gnmr_wrap(optax.sgd(1.0), lock_steps=bad)
    # A two-update 1000x spike, then a 100x spike 30 updates later, at every small lock,
    # held while raised (the default cap, 4 locks) or fixed.
    grads = [grads_with()] * 30 + [grads_with(scale_a=1000.0)] * 2 + [grads_with()] * 30
    grads += [grads_with(scale_a=100.0)]
    held = lambda lock: optstab.gnmr(warmup_steps=5, lock_steps=lock)
    fixed = lambda lock: optstab.gnmr(warmup_steps=5, lock_steps=lock, max_lock_steps=lock)
    configs = [(lock,) for lock in range(1, 7)]
    runs = {**_traced_lock_run(held, configs, grads)}
    runs |= {(lock, "fixed"): s for (lock,), s in _traced_lock_run(fixed, configs, grads).items()}
    for config, states in runs.items():
        lock = config[0]
        assert int(states.control.lock[30, 0]) == lock  # published after the update it entered
        # Frozen through both spike updates (the unit is in recovery for both, as
        # lock + 1 >= 2), and back to the same EMA of equal norms afterwards: the
        # baseline is exactly ||ones(4)|| = 2.
        np.testing.assert_array_equal(states.control.mean[29:32, G, 0], 2.0)
        assert float(states.control.mean[-2, G, 0]) == 2.0, config
        assert int(states.telemetry.rebaselines[-1]) == 0, config
        # Fixed: lock + 1 updates. Held: also every update still raised (GNMR over its
        # bar) when the countdown ends, and the one after it (published for its
        # forward pass), so a 2-update spike takes max(lock, 2) + 1 updates, and no
        # more: released once it is over.
        recovered = lock + 1 if "fixed" in config else max(lock, 2) + 1
        assert int(states.telemetry.recovered_steps[-2]) == recovered, config
        # The 100x spike is caught: GNMR = 200 / 2.
        assert float(states.telemetry.gnmr[-1, G, 0]) == 100.0, config
        assert bool(states.telemetry.recovering[-1, 0]), config


def test_a_lasting_shift_is_learnt_after_eleven_updates_or_the_cap():
    # From update 5 on, unit "a" sits at 10x: a new level. Under "skip" its gradient
    # cannot change while it is frozen, so only the re-baseline ends its recovery.
    shift = 50
    grads = [grads_with()] * 5 + [grads_with(scale_a=10.0)] * shift
    make = lambda lock, cap: optstab.gnmr_wrap(
        optax.sgd(1.0), warmup_steps=3, lock_steps=lock, max_lock_steps=cap, action="skip"
    )
    fixed = [(lock, lock) for lock in (1, 2, 3, 4, 5, 6, 10, 12)]
    held = [(lock, 4 * lock) for lock in (1, 2, 3, 5, 10)] + [(2, 7), (3, 30)]
    for (lock, cap), states in _traced_lock_run(make, fixed + held, grads).items():
        found = states.gnmr
        # Hand count: the unit stays raised, so each lock is held to its cap, cap + 1
        # updates; back-to-back locks (the slot is free again at each release) until a
        # release finds the risk k * (cap + 1) >= level updates old, level =
        # max(lock + 1, 11).
        level = max(lock + 1, 11)
        locks_needed = -(-level // (cap + 1))
        recovered = locks_needed * (cap + 1)
        assert int(found.telemetry.triggers[-1]) == locks_needed, (lock, cap)
        assert int(found.telemetry.recovered_steps[-1]) == recovered, (lock, cap)
        assert int(found.telemetry.rebaselines[-1]) == 1, (lock, cap)
        # Re-baselined at the new norm 10 * ||ones(4)|| = 20, then trained again.
        assert float(found.control.mean[-1, G, 0]) == 20.0, (lock, cap)
        acted = np.asarray(found.telemetry.recovering[5:, 0])
        assert acted.tolist() == [True] * recovered + [False] * (shift - recovered), (lock, cap)


def test_delta_gnmr_ignores_a_rise_back_to_the_normal_level():
    # Long history at 1, two small norms, then 0.9: a ~3x rise against the short
    # signal but no rise above the unit's mean, so no trigger.
    norms = [1.0] * 30 + [0.1, 0.1, 0.9]
    _, states = run(optstab.gnmr(warmup_steps=5, **BARS), [grads_with(scale_b=x) for x in norms])
    # Float64 hand computation of both bias-corrected EMAs (no norm here is capped).
    mean, short = 0.0, 0.0
    for k, x in enumerate(norms[:-1], start=1):
        mean += (1 - 0.99) / (1 - 0.99**k) * (x - mean)
        short += (1 - 0.5) / (1 - 0.5**k) * (x - short)
    gnmr, delta = norms[-1] / mean, norms[-1] / short
    assert delta > 2.0 and gnmr < 1.0  # the case this test is about
    # The EMAs are exact through the ones (see EPS32); the last two long-run weights
    # carry < 20 EPS32 (as in the denied-spike test) at 4% of the mean, the short ones
    # (powers of 2) a few roundings; the norms' sqrt(3) cancels to 2 roundings: rtol
    # 4 * EPS32.
    np.testing.assert_allclose(states[-1].telemetry.gnmr[G, 1], gnmr, rtol=4 * EPS32)
    np.testing.assert_allclose(states[-1].telemetry.delta_gnmr[G, 1], delta, rtol=4 * EPS32)
    assert int(states[-1].telemetry.triggers) == 0


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda adam: optax.chain(optstab.gnmr(units=optstab.units.by_depth(1)), adam),
        lambda adam: optstab.gnmr_wrap(adam, action=("skip", "reset")),
        lambda adam: optax.inject_hyperparams(optstab.gnmr_wrap, static_args="inner")(adam),
        lambda adam: optax.chain(optstab.adagc(), adam),  # same tree.py cause as GNMR
    ],
    ids=["gnmr", "gnmr_wrap", "injected_gnmr_wrap", "adagc"],
)
def test_map_params_maps_only_the_params_like_leaves(make_tx):
    adam = optax.adam(0.1)
    tx = make_tx(adam)
    state = tx.init(PARAMS)
    specs = {"a": "spec_a", "b": "spec_b", "c": "spec_c"}
    mapped = optax.tree.map_params(
        tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: None
    )
    # The params-like leaves are Adam's moments, found independently by mapping
    # Adam's own state; everything of GNMR and AdaGC maps to None.
    expected_adam = optax.tree.map_params(
        adam, lambda _, spec: spec, adam.init(PARAMS), specs, transform_non_params=lambda _: None
    )
    leaves = lambda tree: [x for x in jax.tree.leaves(tree) if x is not None]
    assert sorted(leaves(mapped)) == sorted(leaves(expected_adam))
    # The identity map keeps a working state: the same next update as the original.
    same = optax.tree.map_params(tx, lambda v: v, state)
    grads = grads_with(scale_a=2.0)
    update = jax.jit(tx.update)  # one compile for both states
    want, _ = update(grads, state, PARAMS)
    got, _ = update(grads, same, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_jit_cache_never_hands_back_another_states_unit_names():
    mask_of_state = jax.jit(optstab.recovery_mask)
    tx = optstab.gnmr()
    ab = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
    xy = tx.init({"x": jnp.ones(2), "y": jnp.ones(2)})  # same shapes, other names
    assert set(mask_of_state(ab)) == {"a", "b"}
    assert set(mask_of_state(xy)) == {"x", "y"}


def test_complex_units_are_measured_by_modulus_and_clipped_in_phase():
    params = {"r": jnp.ones(3), "z": jnp.array([1 + 2j, 2 - 1j], jnp.complex64)}
    normal = {"r": jnp.ones(3), "z": params["z"]}
    # Only the imaginary part spikes: a norm of the real parts alone would not move.
    spike = {"r": jnp.ones(3), "z": jnp.array([1 + 200j, 2 - 1j], jnp.complex64)}
    grads = [normal] * 4 + [spike]
    updates, states = run(optstab.gnmr(warmup_steps=3, action="clip", **BARS), grads, params)
    # Hand computation in float64: ||z|| = sqrt(1 + 4 + 4 + 1) before the spike.
    z = np.asarray(spike["z"], np.complex128)
    mean = np.sqrt(10.0)
    norm = np.sqrt(np.sum(np.abs(z) ** 2))
    assert states[-1].control.mean.dtype == jnp.float32
    # Integer sums of squares are exact; sqrt, bar, ratio: 3 roundings, rtol 2 * EPS32.
    np.testing.assert_allclose(states[-2].control.mean[G, 1], mean, rtol=EPS32)
    np.testing.assert_allclose(states[-1].telemetry.gnmr[G, 1], norm / mean, rtol=2 * EPS32)
    assert updates[-1]["z"].dtype == jnp.complex64
    # Two sqrt, the bar, the factor, the complex product: 5 roundings, rtol 3 * EPS32.
    np.testing.assert_allclose(updates[-1]["z"], z * (3.0 * mean / norm), rtol=3 * EPS32)
    np.testing.assert_array_equal(updates[-1]["r"], np.ones(3))
    # skip: the unit's update is exactly zero and Adam's complex moments stay frozen.
    tx = optstab.gnmr_wrap(optax.adam(0.1), warmup_steps=3, action="skip")
    updates, states = run(tx, grads, params)
    assert np.all(np.asarray(updates[-1]["z"]) == 0) and np.all(np.asarray(updates[-1]["r"]) != 0)
    np.testing.assert_array_equal(states[-1].inner[0].mu["z"], states[-2].inner[0].mu["z"])
    np.testing.assert_array_equal(states[-1].inner[0].nu["z"], states[-2].inner[0].nu["z"])


@pytest.mark.parametrize(
    "params",
    [
        jnp.ones(3),  # a single array: its structure is that of every leaf
        {"a": jnp.ones(3), "b": jnp.ones(2)},
        {"a": jnp.float32(1.0), "b": jnp.float32(2.0)},  # all leaves scalars
        jnp.float32(1.0),  # one scalar: shaped like Adam's count, but not a float count
    ],
    ids=["single_array", "dict", "scalar_leaves", "single_scalar"],
)
def test_wrap_acts_only_on_the_inner_per_parameter_state(params):
    num_units = len(jax.tree.leaves(params))
    tx = optstab.gnmr_wrap(
        optax.adam(0.1), warmup_steps=2, max_recover=num_units, action=("skip", "reset")
    )
    grads = [jax.tree.map(jnp.ones_like, params)] * 3
    grads += [jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)]
    updates, states = run(tx, grads, params)
    adam = states[-1].inner[0]
    assert int(states[-1].gnmr.telemetry.triggers) == num_units  # every unit entered recovery
    assert int(adam.count) == 4  # shared: advances through skip and reset
    for leaf in jax.tree.leaves((adam.mu, adam.nu, updates[-1])):
        assert np.all(np.asarray(leaf) == 0)  # reset on entry, then frozen; skipped
    assert np.all(np.asarray(jax.tree.leaves(states[-2].inner[0].mu)[0]) != 0)


def test_wrap_keeps_the_inner_key_and_falls_back_on_shapes():
    params = jnp.ones(3)
    grads = [jnp.ones(3)] * 3 + [100.0 * jnp.ones(3)]
    # noisy_sgd's key is shared by all units: reset must not touch it. Expected: the
    # key after four updates of noisy_sgd alone.
    noisy = optax.noisy_sgd(0.1, key=0)
    alone, noisy_update = noisy.init(params), jax.jit(noisy.update)
    for g in grads:
        _, alone = noisy_update(g, alone, params)
    tx = optstab.gnmr_wrap(noisy, warmup_steps=2, action=("clip", "reset"))
    _, states = run(tx, grads, params)
    assert int(states[-1].gnmr.telemetry.triggers) == 1
    np.testing.assert_array_equal(
        jax.random.key_data(states[-1].inner[0].rng_key), jax.random.key_data(alone[0].rng_key)
    )

    # An inner optimizer whose init rejects the placeholder of optax.tree.map_params:
    # per-parameter subtrees are then recognised by structure, shapes and dtype.
    def init(p):
        if not jax.tree.leaves(p):
            raise ValueError("no params")
        return optax.adam(0.1).init(p)

    picky = optax.GradientTransformation(init, optax.adam(0.1).update)
    tx = optstab.gnmr_wrap(picky, warmup_steps=2, action="skip")
    _, states = run(tx, grads, params)
    assert int(states[-1].inner[0].count) == 4
    np.testing.assert_array_equal(states[-1].inner[0].mu, states[-2].inner[0].mu)


@pytest.mark.parametrize("labels_kind", ["callable", "pytree"])
def test_wrap_freezes_masked_inner_states(labels_kind):
    # optax.multi_transform keeps, per group, moments whose other leaves are MaskedNode.
    # Fixed labels make its init reject map_params' placeholder (structural fallback).
    labels = {"a": "adam", "b": "momentum", "c": "momentum"}
    if labels_kind == "callable":
        group = lambda path, _: "adam" if path[0].key == "a" else "momentum"
        labels = lambda p: jax.tree_util.tree_map_with_path(group, p)
    inner = optax.multi_transform(
        {"adam": optax.adam(0.1), "momentum": optax.sgd(0.1, momentum=0.9)}, labels
    )
    tx = optstab.gnmr_wrap(inner, warmup_steps=2, max_recover=2, action="skip")
    grads = [grads_with()] * 3 + [grads_with(scale_a=100.0, scale_b=100.0)]
    updates, states = run(tx, grads)
    before, after = states[-2].inner.inner_states, states[-1].inner.inner_states
    np.testing.assert_array_equal(
        after["adam"].inner_state[0].mu["a"], before["adam"].inner_state[0].mu["a"]
    )
    trace = lambda s: s["momentum"].inner_state[0].trace
    np.testing.assert_array_equal(trace(after)["b"], trace(before)["b"])
    np.testing.assert_array_equal(trace(after)["c"], 0.9 * trace(before)["c"] + 1.0)
    assert np.all(np.asarray(updates[-1]["a"]) == 0) and np.all(np.asarray(updates[-1]["b"]) == 0)


def test_clear_errors_for_a_bad_inner_and_mismatched_updates():
    for bad in ("adam", optax.adam, None):
        with pytest.raises(TypeError, match="inner"):
            optstab.gnmr_wrap(bad)
    wrong = [
        ({**grads_with(), "a": jnp.ones(5)}, r"leaf 'a' has shape \(5,\), expected \(4,\)"),
        ({"a": jnp.ones(4), "b": jnp.ones(3), "d": jnp.ones((2, 2))}, r"missing: \['c'\]"),
        ({**grads_with(), "e": jnp.ones(1)}, r"unexpected leaves: \['e'\]"),
    ]
    for tx in (optstab.gnmr(), optstab.gnmr_wrap(optax.sgd(0.1))):
        state = tx.init(PARAMS)
        for grads, message in wrong:  # the first two were silently accepted before
            with pytest.raises(ValueError, match=message):
                jax.jit(tx.update)(grads, state, PARAMS)
