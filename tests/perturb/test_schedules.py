"""optstab.perturb.schedules: size schedules, Poisson spikes and the per-step key layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optstab import perturb
from optstab.perturb import schedules

STEPS = jnp.arange(40)


def values(schedule, steps=STEPS) -> np.ndarray:
    """The schedule at every step, evaluated in one jitted vmap."""
    return np.asarray(jax.jit(jax.vmap(schedule))(steps))


def test_constant():
    v = values(perturb.constant(0.3))
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, np.float32(0.3))


def test_inverse_sqrt_is_c_over_sqrt_of_step_plus_one():
    v = values(perturb.inverse_sqrt(0.5))
    np.testing.assert_allclose(v, 0.5 / np.sqrt(np.arange(40) + 1.0), rtol=1e-6)
    assert v[0] == np.float32(0.5)


def test_inverse_is_c_over_step_plus_one():
    v = values(perturb.inverse(2.0))
    np.testing.assert_allclose(v, 2.0 / (np.arange(40) + 1.0), rtol=1e-6)
    assert v[0] == 2.0 and v[3] == 0.5


def test_schedule_numbers_may_be_traced():
    f = jax.jit(lambda c, step: perturb.inverse_sqrt(c)(step))
    assert float(f(jnp.float32(3.0), 8)) == pytest.approx(1.0)
    assert float(f(jnp.float32(6.0), 8)) == pytest.approx(2.0)
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
    # A Bernoulli(0.1) process: the number of starts is Binomial(300, 0.1) (sd ~5.2).
    assert 10 <= starts.sum() <= 50
    other_key = np.asarray(poisson(jax.random.key(2), 0.1, 1.0, 0.0, 0)) > 0
    assert not np.array_equal(starts, other_key)


def test_as_schedule():
    assert float(schedules.as_schedule(None)(3)) == 0.0
    assert float(schedules.as_schedule(0.25)(3)) == 0.25
    fn = perturb.inverse(1.0)
    assert schedules.as_schedule(fn) is fn


def test_operator_keys_layout_and_determinism():
    root = jax.random.key(4)
    keys = perturb.operator_keys(root, 7, 3)
    assert keys.shape == (3, 2) and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(keys)).reshape(6, -1)
    assert len({tuple(row) for row in data}) == 6, "keys of one step must all differ"
    expected = jax.random.split(jax.random.fold_in(root, 7), 6).reshape(3, 2)
    np.testing.assert_array_equal(data, np.asarray(jax.random.key_data(expected)).reshape(6, -1))
    again = jax.random.key_data(perturb.operator_keys(root, 7, 3))
    np.testing.assert_array_equal(jax.random.key_data(keys), again)
    next_step = jax.random.key_data(perturb.operator_keys(root, 8, 3))
    assert not np.array_equal(jax.random.key_data(keys), next_step)


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
