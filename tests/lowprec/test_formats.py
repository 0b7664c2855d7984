"""optstab.lowprec.round_to_format against ml_dtypes: nearest rounding, saturation, NaN,
error bounds and the unbiasedness of stochastic rounding."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from optstab.lowprec import FORMATS, FloatFormat, round_to_format

DTYPES = {
    "float8_e4m3": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float4_e2m1": ml_dtypes.float4_e2m1fn,
}
BITS = {"float8_e4m3": 8, "float8_e5m2": 8, "float4_e2m1": 4}
FMTS = tuple(DTYPES)
SIZE = 8192  # every call is padded to this length: one compile per format and rounding
_round = jax.jit(round_to_format, static_argnames=("fmt", "rounding"))


def rnd(x, fmt, rounding="nearest", key=None) -> np.ndarray:
    """``round_to_format`` of a 1-D ``x`` (at most SIZE values), jitted at a fixed shape."""
    x = np.asarray(x, np.float32)
    padded = np.zeros(SIZE, np.float32)
    padded[: x.size] = x
    key = jax.random.key(0) if key is None else key
    return np.asarray(_round(jnp.asarray(padded), fmt, rounding, key))[: x.size]


def grid(fmt: str) -> np.ndarray:
    """Every finite value of the format (float32, sorted), enumerated from its bit patterns."""
    raw = np.arange(2 ** BITS[fmt], dtype=np.uint8).view(DTYPES[fmt]).astype(np.float32)
    return np.unique(raw[np.isfinite(raw)])


def cast(x, fmt: str) -> np.ndarray:
    """The ml_dtypes cast (round to nearest, ties to even), back to float32."""
    return np.asarray(x, np.float32).astype(DTYPES[fmt]).astype(np.float32)


def in_range_samples(fmt: str, n: int = 2000, seed: int = 0) -> np.ndarray:
    """Log-uniform magnitudes over the whole range (subnormals included), random signs."""
    rng = np.random.default_rng(seed)
    g = grid(fmt)
    tiny = g[g > 0][0]
    mags = np.exp(rng.uniform(np.log(tiny / 4), np.log(g[-1]), n))
    return (mags * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def neighbours(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """The grid values ``lo <= x <= hi`` enclosing each in-range ``x``."""
    g = grid(fmt)
    hi_idx = np.clip(np.searchsorted(g, x, side="left"), 1, len(g) - 1)
    lo, hi = g[hi_idx - 1], g[hi_idx]
    on_grid = np.isin(x, g)
    return np.where(on_grid, x, lo), np.where(on_grid, x, hi)


def test_format_table_matches_ml_dtypes():
    for name, dtype in DTYPES.items():
        info = ml_dtypes.finfo(dtype)
        fmt = FORMATS[name]
        assert fmt.max_value == float(info.max)
        assert fmt.mantissa_bits == info.nmant
        assert 2.0**fmt.min_exponent == float(info.smallest_normal)


@pytest.mark.parametrize("fmt", FMTS)
def test_nearest_equals_the_ml_dtypes_cast_on_grid_points_and_ties(fmt):
    g = grid(fmt)
    ties = (g[1:] + g[:-1]) / 2  # exact in float32: the ties-to-even cases
    x = np.concatenate([g, ties, -ties])
    np.testing.assert_array_equal(rnd(x, fmt), cast(x, fmt))


@pytest.mark.parametrize("fmt", FMTS)
def test_nearest_equals_the_ml_dtypes_cast_on_random_in_range_values(fmt):
    x = in_range_samples(fmt)
    np.testing.assert_array_equal(rnd(x, fmt), cast(x, fmt))


@pytest.mark.parametrize("fmt", FMTS)
def test_signed_zeros_and_underflow_keep_their_sign(fmt):
    x = np.array([0.0, -0.0, 1e-30, -1e-30], np.float32)
    got = rnd(x, fmt)
    np.testing.assert_array_equal(got, 0.0)
    np.testing.assert_array_equal(np.signbit(got), [False, True, False, True])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", FMTS)
def test_out_of_range_and_infinities_saturate_and_nan_stays_nan(fmt, rounding):
    top = FORMATS[fmt].max_value
    x = [1.01 * top, -1.01 * top, 1e30, -1e30, np.inf, -np.inf, np.nan]
    got = rnd(x, fmt, rounding)
    np.testing.assert_array_equal(got[:6], [top, -top, top, -top, top, -top])
    assert np.isnan(got[6])


@pytest.mark.parametrize("fmt", FMTS)
def test_nearest_error_is_at_most_half_the_local_spacing(fmt):
    x = in_range_samples(fmt, seed=1)
    lo, hi = neighbours(x, fmt)
    q = rnd(x, fmt)
    assert np.all((q == lo) | (q == hi))
    assert np.all(np.abs(q - x) <= (hi - lo) / 2)


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_returns_one_of_the_two_neighbours(fmt):
    x = in_range_samples(fmt, seed=2)
    lo, hi = neighbours(x, fmt)
    q = rnd(x, fmt, "stochastic", jax.random.key(3))
    assert np.all((q == lo) | (q == hi))
    off_grid = lo < hi
    assert np.all(np.abs(q - x)[off_grid] < (hi - lo)[off_grid])
    # Both neighbours occur: the rounding is not secretly deterministic.
    assert np.any((q == lo) & off_grid) and np.any((q == hi) & off_grid)


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_keeps_grid_values_exactly(fmt):
    g = grid(fmt)
    x = np.concatenate([g, -g])
    np.testing.assert_array_equal(rnd(x, fmt, "stochastic"), x)


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding_is_unbiased(fmt):
    x = np.array([0.3, -0.7, 1.1, -2.6, 5.3], np.float32)
    x = np.concatenate([x, x * 37.0]) if fmt != "float4_e2m1" else x
    lo, hi = neighbours(x, fmt)
    n = SIZE // x.size  # independent draws per value (one uniform per element)
    q = rnd(np.tile(x, n), fmt, "stochastic", jax.random.key(7)).reshape(n, x.size)
    p_up = (x - lo) / (hi - lo)
    stderr = (hi - lo) * np.sqrt(p_up * (1 - p_up) / n)
    assert np.all(stderr > 0)
    # 4 standard errors of the mean: a 6e-5 chance per value to fail by bad luck.
    np.testing.assert_array_less(np.abs(q.mean(0) - x), 4 * stderr)


def test_stochastic_rounding_depends_only_on_the_key():
    x = np.linspace(-3.0, 3.0, 64)
    a = rnd(x, "float8_e4m3", "stochastic", jax.random.key(1))
    b = rnd(x, "float8_e4m3", "stochastic", jax.random.key(1))
    c = rnd(x, "float8_e4m3", "stochastic", jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bfloat16_input_gives_float32_on_the_grid():
    x = jnp.array([0.3, 3.3, 500.0], jnp.bfloat16)
    got = round_to_format(x, "float8_e4m3")
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(
        got, cast(np.asarray(x, np.float32).clip(-448, 448), "float8_e4m3")
    )


def test_a_custom_format_object_is_accepted():
    e4m3 = FloatFormat("mine", 3, -6, 448.0)
    x = in_range_samples("float8_e4m3", 200)
    np.testing.assert_array_equal(rnd(x, e4m3), cast(x, "float8_e4m3"))


def test_eager_call_equals_the_jitted_one():
    x = in_range_samples("float8_e5m2", 64)
    np.testing.assert_array_equal(
        round_to_format(jnp.asarray(x), "float8_e5m2"), rnd(x, "float8_e5m2")
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fmt": "float16"}, "fmt"),
        ({"rounding": "up"}, "rounding"),
        ({"rounding": "stochastic"}, "key"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        round_to_format(jnp.ones(3), **kwargs)
