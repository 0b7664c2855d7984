"""optstab.lowprec.quantize: scales, error bounds, delayed scaling, straight-through and
cotangent gradients, int8, and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optstab import lowprec
from optstab.lowprec import formats
from optstab.lowprec import scaling as q

FMTS = ("float8_e4m3", "float8_e5m2", "float4_e2m1", "int8")


def sample(shape=(64, 32), seed=0, spread=3.0):
    """Values spread over several orders of magnitude, both signs."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * np.exp(spread * rng.standard_normal(shape)))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("scaling", q.SCALINGS)
def test_nearest_error_within_half_a_grid_step(fmt, scaling):
    x = sample()
    scale = q.scale_from_amax(q.amax(x, scaling), fmt)
    got = np.asarray(jax.jit(q.quantize, static_argnums=2)(x, scale, fmt))
    spec = formats.get_format(fmt)
    step = np.asarray(formats.grid_spacing(x / scale, spec)) * np.asarray(scale)
    assert np.all(np.abs(got - np.asarray(x)) <= 0.5 * step * (1 + 1e-6))
    # The amax maps onto the format's largest value, so it is represented exactly.
    amax = np.max(np.abs(np.asarray(x)), axis=-1 if scaling == "per_token" else None)
    got_amax = np.max(np.abs(got), axis=-1 if scaling == "per_token" else None)
    np.testing.assert_allclose(got_amax, amax, rtol=1e-6)


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_error_below_one_step_and_unbiased(fmt):
    x = jnp.full((20000,), 0.3)
    scale = jnp.float32(1.0) if fmt != "int8" else jnp.float32(0.07)  # 0.3 / 0.07 = 4.29
    keys = jax.random.split(jax.random.key(1), 1)[0]
    got = np.asarray(q.quantize(x, scale, fmt, "stochastic", keys))
    step = np.asarray(formats.grid_spacing(x / scale, formats.get_format(fmt))) * float(scale)
    assert np.all(np.abs(got - 0.3) < step)
    assert len(np.unique(got)) == 2  # the two neighbours
    standard_error = step[0] / 2 / np.sqrt(x.size)
    assert abs(got.mean() - 0.3) < 5 * standard_error


def test_int8_grid_and_saturation():
    x = jnp.array([0.4, 0.6, -1.5, 126.6, 200.0, -1e9, jnp.nan])
    got = np.asarray(lowprec.round_to_format(x, "int8"))
    np.testing.assert_array_equal(got[:6], [0.0, 1.0, -2.0, 127.0, 127.0, -127.0])
    assert np.isnan(got[6])


def test_zero_tiny_and_nonfinite_amax_give_scale_one():
    scale = jax.jit(q.scale_from_amax, static_argnums=1)
    for amax in (0.0, 1e-36, jnp.inf, jnp.nan):  # 1e-36 / 448 flushes to zero under jit
        assert float(scale(jnp.float32(amax), "float8_e4m3")) == 1.0, amax
    assert float(scale(jnp.float32(254.0), "int8")) == 2.0
    tiny = jnp.array([1e-36, 0.0])
    out = jax.jit(lambda x: q.quantize(x, scale(q.amax(x), "float8_e4m3"), "float8_e4m3"))(tiny)
    assert np.all(np.isfinite(np.asarray(out)))


def test_nonfinite_values_pass_through_unchanged():
    x = jnp.array([1.0, jnp.inf, -jnp.inf, jnp.nan, 1000.0])
    out = np.asarray(jax.jit(q.fake_quant, static_argnums=2)(x, jnp.float32(1.0), "int8"))
    np.testing.assert_array_equal(out[:3], [1.0, np.inf, -np.inf])
    assert np.isnan(out[3]) and out[4] == 127.0  # finite out-of-range values saturate
    g = jax.grad(lambda v: jnp.sum(q.fake_quant(v, jnp.float32(1.0), "int8") * 0 + v))(x)
    np.testing.assert_array_equal(g, np.ones(5))
    f = lambda v: q.quantize_cotangent(v, "float8_e5m2")
    cotangent = jnp.array([1.0, jnp.inf, 2.0, 0.0, 0.0])
    back = np.asarray(jax.vjp(f, jnp.zeros(5))[1](cotangent)[0])
    assert back[1] == np.inf  # an overflow upstream is not hidden


def test_history_skips_nonfinite_amax():
    history = q.push_history(jnp.array([2.0, 1.0]), jnp.float32(jnp.inf))
    np.testing.assert_array_equal(history, [0.0, 2.0])
    history = q.push_history(history, jnp.float32(jnp.nan))
    np.testing.assert_array_equal(history, [0.0, 0.0])


def test_per_token_scales_rows_independently():
    x = jnp.array([[1e-3, 2e-3, -4e-3], [100.0, 1.0, -3.0]])
    got = np.asarray(q.quantize(x, q.scale_from_amax(q.amax(x, "per_token"), "int8"), "int8"))
    np.testing.assert_allclose(got[0], x[0], rtol=0.01)  # the small row keeps its precision
    per_tensor = np.asarray(q.quantize(x, q.scale_from_amax(q.amax(x), "int8"), "int8"))
    assert np.all(per_tensor[0] == 0)  # one scale for both rows crushes the small one


def test_delayed_scaling_history():
    history = jnp.zeros(3)
    assert float(q.delayed_amax(history, jnp.float32(5.0))) == 5.0  # empty: current
    history = q.push_history(history, jnp.float32(2.0))
    history = q.push_history(history, jnp.float32(7.0))
    np.testing.assert_array_equal(history, [7.0, 2.0, 0.0])
    assert float(q.delayed_amax(history, jnp.float32(1.0))) == 7.0
    for _ in range(2):
        history = q.push_history(history, jnp.float32(1.0))
    np.testing.assert_array_equal(history, [1.0, 1.0, 7.0])
    history = q.push_history(history, jnp.float32(1.0))
    assert float(q.delayed_amax(history, jnp.float32(1.0))) == 1.0  # 7 has dropped out


def test_fake_quant_value_is_quantized_and_gradient_is_identity():
    x = sample((16,), seed=3)
    scale = q.scale_from_amax(q.amax(x), "float8_e4m3")
    value, vjp = jax.vjp(lambda v: q.fake_quant(v, scale, "float8_e4m3"), x)
    np.testing.assert_array_equal(value, q.quantize(x, scale, "float8_e4m3"))
    cotangent = sample((16,), seed=4)
    np.testing.assert_array_equal(vjp(cotangent)[0], cotangent)


def test_fake_quant_keeps_bf16():
    x = sample((8,)).astype(jnp.bfloat16)
    out = q.fake_quant(x, q.scale_from_amax(q.amax(x), "float8_e4m3"), "float8_e4m3")
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("scaling", q.SCALINGS)
def test_quantize_cotangent(scaling):
    x = sample((4, 8), seed=5)
    g = sample((4, 8), seed=6)

    def pullback(skip):
        f = lambda v: q.quantize_cotangent(v, "float8_e5m2", scaling, skip=skip)
        value, vjp = jax.vjp(f, x)
        np.testing.assert_array_equal(value, x)
        return np.asarray(vjp(g)[0])

    expected = q.quantize(g, q.scale_from_amax(q.amax(g, scaling), "float8_e5m2"), "float8_e5m2")
    np.testing.assert_array_equal(pullback(False), expected)
    assert not np.array_equal(pullback(False), g)
    np.testing.assert_array_equal(pullback(True), g)


def test_quantize_cotangent_stochastic_same_key_same_bits():
    x = sample((32,), seed=7)
    g = sample((32,), seed=8)

    def grad(key):
        f = lambda v: q.quantize_cotangent(v, "float4_e2m1", rounding="stochastic", key=key)
        return np.asarray(jax.vjp(f, x)[1](g)[0])

    np.testing.assert_array_equal(grad(jax.random.key(0)), grad(jax.random.key(0)))
    assert not np.array_equal(grad(jax.random.key(0)), grad(jax.random.key(1)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fmt": "float16"}, "fmt"),
        ({"backward_fmt": "int4"}, "fmt"),
        ({"scaling": "per_channel"}, "scaling"),
        ({"scale_mode": "lagged"}, "scale_mode"),
        ({"scale_mode": "delayed", "scaling": "per_token"}, "delayed"),
        ({"rounding": "up"}, "rounding"),
        ({"history": 0}, "history"),
        ({"history": 2.5}, "history"),
    ],
)
def test_quant_config_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        q.quant_config(**kwargs)


def test_stochastic_cotangent_needs_key():
    with pytest.raises(ValueError, match="key"):
        q.quantize_cotangent(jnp.ones(3), rounding="stochastic")
