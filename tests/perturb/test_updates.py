"""optstab.perturb.perturbed_updates: the gradient perturbation as an Optax transform."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from perturb_data import U, gamma, noise_norm_rtol

from optstab import checkpoint, perturb

PARAMS = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
GRADS = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([[0.5, 0.25], [-4.0, 1.0]])}


RELATIVE_SEED_0 = perturb.perturbed_updates(0.1, key=0)


def norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64)))


_JITTED = {}


def run(tx, steps, grads=GRADS, params=PARAMS):
    """``steps`` jitted updates with fixed gradients; returns the updates and states."""
    update = _JITTED.setdefault(id(tx), jax.jit(tx.update))
    state, updates, states = tx.init(params), [], []
    for _ in range(steps):
        u, state = update(grads, state, params)
        updates.append(u)
        states.append(state)
    return updates, states


@functools.partial(jax.jit, static_argnames=("mode", "fmt"))
def perturb_once(grads, scale, key, mode="relative", fmt="float8_e4m3"):
    """One update of a fresh transform; scale and key traced: one compile per mode."""
    tx = perturb.perturbed_updates(scale, mode, key, fmt=fmt)
    return tx.update(grads, tx.init(PARAMS))


def assert_same_bits(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(
            x.view(f"u{x.dtype.itemsize}"), y.view(f"u{y.dtype.itemsize}")
        )


def test_bias_mode_chained_with_sgd_gives_exact_updates():
    tx = optax.chain(perturb.perturbed_updates(0.25, mode="bias"), optax.sgd(2.0))
    (updates,), _ = run(tx, 1)
    for name in GRADS:
        np.testing.assert_array_equal(updates[name], -2.0 * (0.75 * np.asarray(GRADS[name])))


def test_relative_mode_perturbs_each_leaf_by_its_own_norm():
    updates, _ = perturb_once(GRADS, 0.1, jax.random.key(3), "relative")
    for name in GRADS:
        g = GRADS[name]
        rtol = noise_norm_rtol(g.size, norm(g), 0.1 * norm(g))
        np.testing.assert_allclose(norm(updates[name] - g), 0.1 * norm(g), rtol=rtol)


def test_absolute_mode_perturbs_each_leaf_by_scale():
    updates, _ = perturb_once(GRADS, 0.3, jax.random.key(0), "absolute")
    for name in GRADS:
        rtol = noise_norm_rtol(GRADS[name].size, norm(GRADS[name]), 0.3)
        np.testing.assert_allclose(norm(updates[name] - GRADS[name]), 0.3, rtol=rtol)


def test_round_mode_rounds_each_leaf():
    grads = {"a": jnp.array([0.3, 1.1, 5.2]), "b": jnp.array([[7.0, -0.2], [2.6, 1.0]])}
    updates, _ = perturb_once(grads, 1.0, jax.random.key(0), "round", "float4_e2m1")
    np.testing.assert_array_equal(updates["a"], [0.5, 1.0, 6.0])
    np.testing.assert_array_equal(updates["b"], [[6.0, 0.0], [3.0, 1.0]])


def test_schedule_is_evaluated_at_the_update_count():
    # inverse(1): sizes 1, 1/2, 1/3 -> bias factors 0, 1/2, 2/3.
    updates, states = run(perturb.perturbed_updates(perturb.inverse(1.0), mode="bias"), 3)
    for factor, u in zip([0.0, 0.5, 2.0 / 3.0], updates, strict=True):
        # size = 1 / t (one or two roundings: XLA may use a reciprocal), then
        # fl(g - fl(size g)): 4 roundings of quantities <= |g|.
        np.testing.assert_allclose(u["a"], factor * np.asarray(GRADS["a"]), rtol=0, atol=4 * U * 3)
    assert [int(s.count) for s in states] == [1, 2, 3]


def test_noise_follows_the_key():
    same = perturb_once(GRADS, 0.1, jax.random.key(0), "relative")
    again = perturb_once(GRADS, 0.1, jax.random.key(0), "relative")
    other = perturb_once(GRADS, 0.1, jax.random.key(1), "relative")
    assert_same_bits(same[0], again[0])
    assert not np.array_equal(same[0]["a"], other[0]["a"])
    # An int seed is the typed key of that seed.
    (from_int, _), _ = run(RELATIVE_SEED_0, 2)
    assert_same_bits(from_int, same[0])


def test_noise_changes_from_step_to_step():
    updates, _ = run(RELATIVE_SEED_0, 2)
    assert not np.array_equal(updates[0]["a"], updates[1]["a"])
    rtol = noise_norm_rtol(3, norm(GRADS["a"]), 0.1 * norm(GRADS["a"]))
    for u in updates:
        np.testing.assert_allclose(norm(u["a"] - GRADS["a"]), 0.1 * norm(GRADS["a"]), rtol=rtol)


def test_python_zero_scale_returns_the_updates_unchanged_and_counts():
    tx = perturb.perturbed_updates(0)
    state = tx.init(PARAMS)
    updates, state = tx.update(GRADS, state)
    assert updates is GRADS
    assert int(state.count) == 1


def test_state_holds_a_count_and_a_typed_key():
    state = perturb.perturbed_updates(0.1, key=7).init(PARAMS)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    assert jax.dtypes.issubdtype(state.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(state.key), jax.random.key_data(jax.random.key(7))
    )


def test_bfloat16_updates_keep_their_dtype():
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), GRADS)
    updates, _ = perturb_once(grads, 0.1, jax.random.key(0), "bias")
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    np.testing.assert_array_equal(updates["a"], (0.9 * np.asarray(GRADS["a"])).astype(jnp.bfloat16))


def test_extra_args_are_ignored():
    tx = perturb.perturbed_updates(0.5, mode="bias")
    updates, _ = jax.jit(lambda g, s: tx.update(g, s, PARAMS, loss=1.0))(GRADS, tx.init(PARAMS))
    np.testing.assert_array_equal(updates["a"], 0.5 * np.asarray(GRADS["a"]))  # exact halving


# ------------------------------------------------------------------ jit, vmap, wrappers


def test_inject_hyperparams_makes_scale_a_live_hyperparameter():
    tx = optax.inject_hyperparams(perturb.perturbed_updates)(scale=0.5, mode="bias")
    state = tx.init(PARAMS)
    assert state.hyperparams["scale"].dtype == jnp.float32
    traces = []

    @jax.jit
    def update(grads, state):
        traces.append(1)
        return tx.update(grads, state, PARAMS)

    u1, state = update(GRADS, state)
    np.testing.assert_array_equal(u1["a"], 0.5 * np.asarray(GRADS["a"]))  # exact (see above)
    state.hyperparams["scale"] = jnp.float32(0.25)
    u2, state = update(GRADS, state)
    # g - 0.25 g = 0.75 g: exact for these small integers.
    np.testing.assert_array_equal(u2["a"], 0.75 * np.asarray(GRADS["a"]))
    # A traced zero is an exact identity too.
    state.hyperparams["scale"] = jnp.float32(0.0)
    u0, state = update(GRADS, state)
    assert_same_bits(u0, GRADS)
    assert len(traces) == 1


def test_jit_does_not_recompile_across_steps():
    tx = optax.chain(perturb.perturbed_updates(perturb.inverse_sqrt(0.1), "bias"), optax.sgd(0.1))
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = tx.update(GRADS, state, params)
        return optax.apply_updates(params, updates), state

    state0 = tx.init(PARAMS)
    params, state = step(PARAMS, state0)
    params, state = step(params, state)
    assert len(traces) == 1
    assert jax.tree.map(lambda x: (x.dtype, x.shape), state) == jax.tree.map(
        lambda x: (x.dtype, x.shape), state0
    )


def test_vmap_over_keys_equals_separate_runs():
    keys = jax.random.split(jax.random.key(0), 3)

    def one(key):
        tx = perturb.perturbed_updates(0.2, key=key)
        return tx.update(GRADS, tx.init(PARAMS))[0]

    batched = jax.jit(jax.vmap(one))(keys)
    for i in range(3):
        single, _ = perturb_once(GRADS, 0.2, keys[i], "relative")
        for name in GRADS:
            # The same noise in two programs: its two norms may be summed in another
            # order (gamma(n + 2) each, relative to the noise, 0.2 ||g||), and g + noise
            # rounds once (U |g + noise|) in each.
            g = np.asarray(GRADS[name], np.float64)
            atol = 2 * 2 * gamma(g.size + 2) * 0.2 * norm(g) + 2 * U * 1.2 * np.abs(g).max()
            np.testing.assert_allclose(batched[name][i], single[name], rtol=0, atol=atol)
    assert not np.array_equal(batched["a"][0], batched["a"][1])


def test_checkpoint_round_trip_keeps_the_key_and_continues_bit_identically(tmp_path):
    tx = optax.chain(perturb.perturbed_updates(0.1, key=5), optax.sgd(0.1))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(GRADS, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.device_put(PARAMS, jax.devices()[0])  # restored arrays are committed
    state = jax.jit(tx.init)(params)
    for _ in range(2):
        params, state = step(params, state)
    saved = {"params": params, "opt_state": state}
    checkpoint.save(tmp_path / "ckpt", 2, saved)
    restored = checkpoint.restore(tmp_path / "ckpt", 2, jax.eval_shape(lambda: saved))
    key = restored["opt_state"][0].key
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(state[0].key))
    a, b = (saved["params"], saved["opt_state"]), (restored["params"], restored["opt_state"])
    for _ in range(2):
        a, b = step(*a), step(*b)
    assert_same_bits(a, b)
    assert int(b[1][0].count) == 4


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"scale": -0.1}, "scale"),
        ({"scale": 0.1, "mode": "gaussian"}, "mode"),
        ({"scale": 0.1, "mode": "round", "fmt": "float16"}, "fmt"),
        ({"scale": 0.1, "rounding": "up"}, "rounding"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        perturb.perturbed_updates(**kwargs)


# ------------------------------------------------------------------ complex leaves

COMPLEX = {"z": jnp.array([3.0 + 4.0j, 1.0 - 2.0j, 0.5j], jnp.complex64), "r": jnp.ones(2)}


def test_complex_leaves_keep_their_imaginary_part_in_bias_mode():
    tx = perturb.perturbed_updates(0.5, mode="bias")
    updates, _ = jax.jit(tx.update)(COMPLEX, tx.init(COMPLEX))
    assert updates["z"].dtype == jnp.complex64 and updates["r"].dtype == jnp.float32
    # 0.5 * z exactly (a power of two): the imaginary parts are not dropped.
    np.testing.assert_array_equal(updates["z"], [1.5 + 2.0j, 0.5 - 1.0j, 0.25j])
    np.testing.assert_array_equal(updates["r"], [0.5, 0.5])


def test_complex_leaves_relative_noise_has_the_norm_of_abs_z():
    tx = perturb.perturbed_updates(0.1, mode="relative", key=3)
    updates, _ = jax.jit(tx.update)(COMPLEX, tx.init(COMPLEX))
    delta = np.asarray(updates["z"]) - np.asarray(COMPLEX["z"])
    # ||z|| = sqrt(25 + 5 + 0.25) = 5.5 exactly. float32 error: a few ulps from the norms
    # of 6 real coordinates and the products, plus one ulp of each |z + delta| (<= 5.5 *
    # 1.1) in the difference taken here: 16 eps * (1 + 1 / 0.1) relative to ||delta||.
    tol = 16 * np.finfo(np.float32).eps * (1 + 1 / 0.1)
    np.testing.assert_allclose(np.linalg.norm(delta), 0.1 * 5.5, rtol=tol)
    assert np.all(delta.imag != 0)


def test_complex_leaves_round_each_part():
    grads = {"z": jnp.array([0.3 + 1.1j, 5.2 - 0.2j], jnp.complex64)}
    tx = perturb.perturbed_updates(1.0, mode="round", fmt="float4_e2m1")
    updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["z"], [0.5 + 1.0j, 6.0 - 0.0j])
