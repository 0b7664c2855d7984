"""optstab.perturb.schedules: size schedules, Poisson spikes and the per-step key layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optstab import perturb
from optstab.perturb import schedules

STEPS = jnp.arange(40)
# A schedule value is c / sqrt(t) or c / t in float32: the conversion of t is exact, then
# one or two correctly rounded operations, or XLA's reciprocal square root (a few ulps)
# in place of 1 / sqrt: 8 U relative bounds them all.
SCHEDULE_RTOL = 8 * 2.0**-24


def values(schedule, steps=STEPS) -> np.ndarray:
    """The schedule at every step, evaluated in one jitted vmap."""
    return np.asarray(jax.jit(jax.vmap(schedule))(steps))


def test_constant():
    v = values(perturb.constant(0.3))
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, np.float32(0.3))


def test_inverse_sqrt_is_c_over_sqrt_of_step_plus_one():
    v = values(perturb.inverse_sqrt(0.5))
    np.testing.assert_allclose(v, 0.5 / np.sqrt(np.arange(40) + 1.0), rtol=SCHEDULE_RTOL)
    assert v[0] == np.float32(0.5)


def test_inverse_is_c_over_step_plus_one():
    v = values(perturb.inverse(2.0))
    np.testing.assert_allclose(v, 2.0 / (np.arange(40) + 1.0), rtol=SCHEDULE_RTOL)
    assert v[0] == 2.0 and v[3] == 0.5


def test_schedule_numbers_may_be_traced():
    f = jax.jit(lambda c, step: perturb.inverse_sqrt(c)(step))
    assert float(f(jnp.float32(3.0), 8)) == pytest.approx(1.0, rel=SCHEDULE_RTOL, abs=0)
    assert float(f(jnp.float32(6.0), 8)) == pytest.approx(2.0, rel=SCHEDULE_RTOL, abs=0)
    assert f._cache_size() == 1


def test_spike_holds_size_for_its_window():
    v = values(perturb.spike(t0=5, size=7.0, duration=3))
    expected = np.zeros(40, np.float32)
    expected[5:8] = 7.0
    np.testing.assert_array_equal(v, expected)


def test_spike_default_is_one_step_over_a_zero_base():
    v = values(perturb.spike(t0=0, size=2.0))
    np.testing.assert_array_equal(np.nonzero(v)[0], [0])


def test_spike_base_may_be_a_number_or_a_schedule():
    v = values(perturb.spike(t0=10, size=5.0, duration=2, base=0.1))
    np.testing.assert_array_equal(v[[9, 10, 11, 12]], np.float32([0.1, 5.0, 5.0, 0.1]))
    base = perturb.inverse_sqrt(1.0)
    w = values(perturb.spike(t0=10, size=5.0, duration=2, base=base))
    outside = np.r_[0:10, 12:40]
    np.testing.assert_array_equal(w[outside], values(base)[outside])
    np.testing.assert_array_equal(w[10:12], 5.0)


@functools.partial(jax.jit, static_argnames="duration")
def poisson(key, rate, size, base, start, duration=1):
    """poisson_spikes at steps 0..299; all numbers traced: one compile per duration."""
    schedule = perturb.poisson_spikes(key, rate, size, duration, base, start)
    return jax.vmap(schedule)(jnp.arange(300))


def test_poisson_spikes_is_a_pure_function_of_the_step():
    key = jax.random.key(3)
    schedule = perturb.poisson_spikes(key, rate=0.3, size=2.0, duration=3)
    batched = np.asarray(poisson(key, 0.3, 2.0, 0.0, 0, 3))
    np.testing.assert_array_equal(batched, poisson(key, 0.3, 2.0, 0.0, 0, 3))
    one_by_one = jax.jit(lambda s: jnp.stack([schedule(s[i]) for i in range(4)]))
    np.testing.assert_array_equal(batched[[0, 7, 13, 39]], one_by_one(jnp.array([0, 7, 13, 39])))
    assert set(np.unique(batched)) == {0.0, 2.0}


def test_poisson_spikes_rate_zero_never_fires_and_rate_one_always_after_start():
    key = jax.random.key(0)
    np.testing.assert_array_equal(poisson(key, 0.0, 3.0, 0.5, 0), 0.5)
    always = np.asarray(poisson(key, 1.0, 3.0, 0.5, 10, 3))
    np.testing.assert_array_equal(always[:10], 0.5)
    np.testing.assert_array_equal(always[10:], 3.0)


def test_poisson_spikes_windows_follow_their_starts():
    key = jax.random.key(1)
    starts = np.asarray(poisson(key, 0.1, 1.0, 0.0, 0)) > 0
    windowed = np.asarray(poisson(key, 0.1, 1.0, 0.0, 0, 3)) > 0
    expected = starts | np.r_[False, starts[:-1]] | np.r_[False, False, starts[:-2]]
    np.testing.assert_array_equal(windowed, expected)
    # A Bernoulli(0.1) process: the number of starts is Binomial(300, 0.1), mean 30 and
    # sd 5.2; [10, 50] is 3.8 sd either side (a 1.5e-4 chance for a random key).
    assert 10 <= starts.sum() <= 50
    other_key = np.asarray(poisson(jax.random.key(2), 0.1, 1.0, 0.0, 0)) > 0
    assert not np.array_equal(starts, other_key)


def test_as_schedule():
    assert float(schedules.as_schedule(None)(3)) == 0.0
    assert float(schedules.as_schedule(0.25)(3)) == 0.25
    fn = perturb.inverse(1.0)
    assert schedules.as_schedule(fn) is fn


def key_rows(keys) -> list[tuple]:
    """Each key of an array of typed keys as a hashable tuple of its raw bits."""
    data = np.asarray(jax.random.key_data(keys))
    return [tuple(row) for row in data.reshape(-1, data.shape[-1])]


ROOT = jax.random.key(4)
STEPS_TESTED = 40


@functools.cache
def keys_of_steps(root_seed=4, num_operators=3):
    """operator_keys for steps 0..STEPS_TESTED-1, (steps, N, 2), traced step under vmap."""
    root = jax.random.key(root_seed)
    return jax.jit(jax.vmap(lambda t: perturb.operator_keys(root, t, num_operators)))(
        jnp.arange(STEPS_TESTED)
    )


def test_operator_keys_layout():
    keys = perturb.operator_keys(ROOT, 7, 3)
    assert keys.shape == (3, 2) and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)


def test_operator_keys_are_distinct_over_operators_directions_and_steps():
    rows = key_rows(keys_of_steps())
    assert len(set(rows)) == len(rows) == STEPS_TESTED * 3 * 2


def test_operator_keys_are_a_pure_function_of_root_and_step():
    # A Python step, a traced step under jit and a vmapped step give the same keys.
    traced = jax.jit(lambda t: perturb.operator_keys(ROOT, t, 3))
    for step in (0, 7, 39):
        eager = key_rows(perturb.operator_keys(ROOT, step, 3))
        assert eager == key_rows(traced(jnp.int32(step)))
        assert eager == key_rows(keys_of_steps()[step])
    # Another root shares no key with this one.
    assert not set(key_rows(keys_of_steps(5))) & set(key_rows(keys_of_steps()))


def test_operator_keys_are_fresh_children_never_a_parent_or_a_data_key():
    """Checked against jax.random itself: no operator key is the root, the step's
    fold_in(root, t) (the parent they are derived from), a child of a plain split of the
    root, or the minibatch key fold_in(root, t) that run_sgd would use if the data key
    and the perturbation key were the same seed."""
    ours = set(key_rows(keys_of_steps()))
    parents = jax.vmap(lambda t: jax.random.fold_in(ROOT, t))(jnp.arange(STEPS_TESTED))
    others = key_rows(ROOT[None]) + key_rows(parents) + key_rows(jax.random.split(ROOT, 64))
    assert not ours & set(others)


def test_composite_points_draw_from_their_key_columns():
    """The pairing of points and keys: operator i's forward point draws from
    keys[i, 0], its backward point from keys[i, 1], as the public operators do with
    those keys (a hand-built forward pass gives the same gradient bits)."""
    model = perturb.Composite(
        [perturb.dense(3, "tanh"), perturb.logistic_head()],
        forward_mode="absolute",
        backward_mode="absolute",
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 2)), jnp.float32)
    y = jnp.arange(8) % 2
    params = jax.jit(model.init, static_argnums=1)(jax.random.key(0), 2)
    keys = perturb.operator_keys(ROOT, 3, 2)
    # Forward noise at operator 0 and backward noise at operator 1, nothing else built.
    points = perturb.Points((True, False), (False, True))
    injection = model.make_injection(keys, [0.3, 0.0], [0.0, 0.5], points)

    def by_hand(params):
        z = perturb.forward(model.operators[0].apply(params[0], x), keys[0, 0], 0.3, "absolute")
        z = model.operators[1].apply(params[1], z)
        z = perturb.backward(z, keys[1, 1], 0.5, "absolute")
        return model.data_loss_from_output(z, y)

    ours, hand = jax.jit(lambda p: (model.gradient(p, x, y, injection), jax.grad(by_hand)(p)))(
        params
    )
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(hand), strict=True):
        np.testing.assert_array_equal(a, b)
    # Swapping the columns (forward drawing from keys[0, 1]) changes the gradient.
    swapped = model.make_injection(keys[:, ::-1], [0.3, 0.0], [0.0, 0.5], points)
    other = jax.jit(lambda p: model.gradient(p, x, y, swapped))(params)
    assert not np.array_equal(other[0]["w"], ours[0]["w"])


def test_as_key_accepts_ints_raw_and_typed_keys():
    want = np.asarray(jax.random.key_data(jax.random.key(5)))
    from_int = schedules.as_key(5)
    from_raw = schedules.as_key(jax.random.PRNGKey(5))
    for key in (from_int, from_raw):
        assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(jax.random.key_data(key), want)
    typed = jax.random.key(9)
    assert schedules.as_key(typed) is typed


def test_as_key_accepts_an_integer_array_seed_even_traced():
    # optax.inject_hyperparams turns an int key argument into such an array.
    want = np.asarray(jax.random.key_data(jax.random.key(5)))
    np.testing.assert_array_equal(jax.random.key_data(schedules.as_key(jnp.asarray(5))), want)
    traced = jax.jit(lambda seed: jax.random.key_data(schedules.as_key(seed)))(jnp.int32(5))
    np.testing.assert_array_equal(traced, want)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: perturb.constant(-1.0), "c"),
        (lambda: perturb.inverse_sqrt(-1.0), "c"),
        (lambda: perturb.inverse(-0.5), "c"),
        (lambda: perturb.spike(t0=-1, size=1.0), "t0"),
        (lambda: perturb.spike(t0=1.5, size=1.0), "t0"),
        (lambda: perturb.spike(t0=0, size=-1.0), "size"),
        (lambda: perturb.spike(t0=0, size=1.0, duration=0), "duration"),
        (lambda: perturb.spike(t0=0, size=1.0, duration=2.5), "duration"),
        (lambda: perturb.poisson_spikes(jax.random.key(0), rate=1.5, size=1.0), "rate"),
        (lambda: perturb.poisson_spikes(jax.random.key(0), rate=-0.1, size=1.0), "rate"),
        (lambda: perturb.poisson_spikes(jax.random.key(0), rate=0.1, size=-1.0), "size"),
        (lambda: perturb.poisson_spikes(jax.random.key(0), 0.1, 1.0, duration=0), "duration"),
        (lambda: perturb.poisson_spikes(jax.random.key(0), 0.1, 1.0, duration=2.0), "duration"),
    ],
)
def test_bad_schedule_arguments_raise_value_error_naming_them(make, name):
    with pytest.raises(ValueError, match=name):
        make()
