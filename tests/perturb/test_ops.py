"""optstab.perturb.ops: the forward / backward perturbation operators, mode by mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from perturb_data import U, assert_within, gamma, noise_norm_rtol

from optstab import perturb
from optstab.lowprec import round_to_format

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(10), (4, 5)) * 3.0  # the value (or cotangent) perturbed
C = jax.random.normal(jax.random.key(11), (4, 5))  # a cotangent
OPTS = ("mode", "fmt", "rounding")


@functools.partial(jax.jit, static_argnames=OPTS)
def run_ops(x, c, key, scale, mode="relative", fmt="float8_e4m3", rounding="nearest"):
    """Both operators at once (one compile per mode and dtype, shared by the tests).

    Returns ``forward``'s value and the cotangent it passes back for ``c``, and
    ``backward``'s value and the cotangent it passes back for ``c``.
    """
    kw = {"fmt": fmt, "rounding": rounding}
    y, fwd_pullback = jax.vjp(lambda v: perturb.forward(v, key, scale, mode, **kw), x)
    z, bwd_pullback = jax.vjp(lambda v: perturb.backward(v, key, scale, mode, **kw), x)
    return y, fwd_pullback(c)[0], z, bwd_pullback(c)[0]


def fwd(x, key, scale, mode="relative", **kw):
    return run_ops(x, C.astype(x.dtype), key, jnp.float32(scale), mode, **kw)[0]


def fwd_vjp(x, c, key, scale, mode="relative", **kw):
    return run_ops(x, c, key, jnp.float32(scale), mode, **kw)[1]


def bwd(x, key, scale, mode="relative", **kw):
    return run_ops(x, C.astype(x.dtype), key, jnp.float32(scale), mode, **kw)[2]


def bwd_vjp(x, c, key, scale, mode="relative", **kw):
    return run_ops(x, c, key, jnp.float32(scale), mode, **kw)[3]


def norm(a) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64)))


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


# ----------------------------------------------------------------- forward values


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0])
def test_forward_absolute_has_norm_scale(scale):
    y = fwd(X, KEY, scale, "absolute")
    np.testing.assert_allclose(norm(y - X), scale, rtol=noise_norm_rtol(X.size, norm(X), scale))


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0])
def test_forward_relative_has_norm_scale_times_norm_of_x(scale):
    y = fwd(X, KEY, scale, "relative")
    rtol = noise_norm_rtol(X.size, norm(X), scale * norm(X))
    np.testing.assert_allclose(norm(y - X), scale * norm(X), rtol=rtol)


@pytest.mark.parametrize("scale", [0.25, 1.0, 2.0])
def test_forward_bias_is_minus_scale_times_x(scale):
    y = np.asarray(fwd(X, KEY, scale, "bias"))
    x = np.asarray(X)
    np.testing.assert_array_equal(y, x + np.float32(-scale) * x)  # the same two roundings


@pytest.mark.parametrize("fmt", ["float8_e4m3", "float8_e5m2", "float4_e2m1"])
def test_forward_round_at_scale_one_is_the_rounding(fmt):
    x = X / 2  # within every format's range, so q(x) - x is exact (Sterbenz)
    y = fwd(x, KEY, 1.0, "round", fmt=fmt)
    np.testing.assert_array_equal(y, round_to_format(x, fmt))


def test_forward_round_at_scale_half_blends_value_and_rounding():
    q = np.asarray(round_to_format(X, "float4_e2m1"), np.float64)
    y = fwd(X, KEY, 0.5, "round", fmt="float4_e2m1")
    # y = fl(x + 0.5 fl(q - x)): one rounding of the difference, one of the sum (the
    # halving is exact), against the exact (x + q) / 2 in float64.
    x = np.asarray(X, np.float64)
    assert_within(y, (x + q) / 2, U * np.abs(q - x) + U * np.abs(x + q))
    assert not np.array_equal(y, q) and not np.array_equal(y, X)


def test_forward_stochastic_round_lands_on_a_neighbour_and_depends_on_the_key():
    kw = {"mode": "round", "fmt": "float4_e2m1", "rounding": "stochastic"}
    y1 = np.asarray(fwd(X / 4, jax.random.key(1), 1.0, **kw))
    y2 = np.asarray(fwd(X / 4, jax.random.key(2), 1.0, **kw))
    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert np.all(np.isin(np.abs(y1), grid)) and np.all(np.abs(y1 - X / 4) < 1.0)
    assert not np.array_equal(y1, y2)


@pytest.mark.parametrize("mode", perturb.MODES)
def test_forward_has_identity_vjp(mode):
    np.testing.assert_array_equal(fwd_vjp(X, C, KEY, 0.7, mode), C)


# ------------------------------------------------------------- backward operator


@pytest.mark.parametrize("mode", perturb.MODES)
def test_backward_returns_the_value_unchanged(mode):
    np.testing.assert_array_equal(bwd(X, KEY, 0.7, mode), X)


@pytest.mark.parametrize("scale", [0.01, 2.0])
def test_backward_absolute_cotangent_error_has_norm_scale(scale):
    g = bwd_vjp(X, C, KEY, scale, "absolute")
    np.testing.assert_allclose(norm(g - C), scale, rtol=noise_norm_rtol(C.size, norm(C), scale))


@pytest.mark.parametrize("scale", [0.01, 2.0])
def test_backward_relative_cotangent_error_is_relative_to_the_cotangent(scale):
    g = bwd_vjp(X, C, KEY, scale, "relative")
    rtol = noise_norm_rtol(C.size, norm(C), scale * norm(C))
    np.testing.assert_allclose(norm(g - C), scale * norm(C), rtol=rtol)
    # Relative to the cotangent, not to the value it flows back through.
    g10 = bwd_vjp(10 * X, C, KEY, scale, "relative")
    np.testing.assert_array_equal(g10, g)


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_backward_bias_scales_the_cotangent_exactly(scale):
    c = np.asarray(C, np.float64)
    g = np.asarray(bwd_vjp(X, C, KEY, scale, "bias"), np.float64)
    # The cotangent becomes c - scale * c = (1 - scale) c. In float32 that is at most two
    # roundings (the product, then the sum; XLA may fuse them into one FMA, which
    # rounds once): |g - (1 - scale) c| <= U (|scale c| + |(1 - scale) c|), U = 2^-24.
    # For scale 0.5 and 1 the product is exact and so is the result.
    exact = (1.0 - scale) * c
    bound = 2.0**-24 * (np.abs(scale * c) + np.abs(exact))
    assert np.all(np.abs(g - exact) <= bound)


def test_backward_round_rounds_the_cotangent():
    g = bwd_vjp(X, C, KEY, 1.0, "round", fmt="float8_e5m2")
    np.testing.assert_array_equal(g, round_to_format(C, "float8_e5m2"))


def test_backward_through_a_function_perturbs_its_gradient():
    f = lambda x, s: jnp.sum(jnp.sin(perturb.backward(x, KEY, s, "bias")))
    g = jax.jit(jax.grad(f))(X, 0.25)
    # cos in float32 (XLA's is accurate to a few ulps: 8U of the O(1) scale it works on),
    # then fl(c - fl(0.25 c)): two roundings; against 0.75 cos in float64.
    c = np.cos(np.asarray(X, np.float64))
    assert_within(g, 0.75 * c, 8 * U + 2 * U * np.abs(c))


# ---------------------------------------------------------------- scale zero

# Signed zeros, infinities, NaN and a float32 subnormal, in the shape of X.
SPECIAL = X.at[0, :].set(jnp.array([-0.0, 0.0, jnp.inf, -jnp.inf, jnp.nan])).at[1, 0].set(1e-40)


@pytest.mark.parametrize("mode", perturb.MODES)
def test_python_zero_scale_returns_the_input_object(mode):
    assert perturb.forward(SPECIAL, KEY, 0, mode) is SPECIAL
    assert perturb.backward(SPECIAL, KEY, 0.0, mode) is SPECIAL


@pytest.mark.parametrize("mode", perturb.MODES)
def test_traced_zero_scale_is_a_bit_exact_identity(mode):
    zero = jnp.float32(0.0)
    np.testing.assert_array_equal(bits(fwd(SPECIAL, KEY, zero, mode)), bits(SPECIAL))
    cot = bwd_vjp(X, SPECIAL, KEY, zero, mode)
    np.testing.assert_array_equal(bits(cot), bits(SPECIAL))


def test_traced_zero_scale_keeps_non_finite_inputs_that_would_poison_the_noise():
    # At scale > 0 the relative mode turns an inf anywhere into NaN everywhere.
    assert np.all(np.isnan(np.asarray(fwd(SPECIAL, KEY, 0.1, "relative"))))
    np.testing.assert_array_equal(bits(fwd(SPECIAL, KEY, 0.0, "relative")), bits(SPECIAL))


# ---------------------------------------------------------------- jit and keys


@pytest.mark.parametrize("mode", ["relative", "bias"])
def test_traced_scale_does_not_recompile(mode):
    traces = []

    @jax.jit
    def step(x, c, scale):
        traces.append(1)
        y, pullback = jax.vjp(lambda v: perturb.backward(v, KEY, scale, mode), x)
        return perturb.forward(y, KEY, scale, mode), pullback(c)[0]

    y1, g1 = step(X, C, jnp.float32(0.1))
    y2, g2 = step(X, C, jnp.float32(0.3))
    y0, g0 = step(X, C, jnp.float32(0.0))
    assert len(traces) == 1 and step._cache_size() == 1
    assert not np.array_equal(y1, y2) and not np.array_equal(g1, g2)
    np.testing.assert_array_equal(y0, X)
    np.testing.assert_array_equal(g0, C)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_same_key_same_bits_other_key_other_bits(mode):
    a, b = fwd(X, jax.random.key(5), 0.1, mode), fwd(X, jax.random.key(5), 0.1, mode)
    c = fwd(X, jax.random.key(6), 0.1, mode)
    np.testing.assert_array_equal(bits(a), bits(b))
    assert not np.array_equal(a, c)
    ga, gb = (
        bwd_vjp(X, C, jax.random.key(5), 0.1, mode),
        bwd_vjp(X, C, jax.random.key(5), 0.1, mode),
    )
    gc = bwd_vjp(X, C, jax.random.key(6), 0.1, mode)
    np.testing.assert_array_equal(bits(ga), bits(gb))
    assert not np.array_equal(ga, gc)


@pytest.mark.parametrize("mode", perturb.MODES)
def test_bfloat16_keeps_its_dtype(mode):
    x = X.astype(jnp.bfloat16)
    y = fwd(x, KEY, 0.5, mode)
    g = bwd_vjp(x, C.astype(jnp.bfloat16), KEY, 0.5, mode)
    assert y.dtype == jnp.bfloat16 and g.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32))


def test_bfloat16_relative_size_is_right_up_to_bfloat16_rounding():
    x = X.astype(jnp.bfloat16)
    y = fwd(x, KEY, 0.1, "relative")
    # bfloat16 keeps 8 significant bits: x + delta is rounded by at most 2**-8 of each
    # |y| element, i.e. 2**-8 ||y|| <= 2**-8 (1.1 ||x||) in norm, against ||delta|| =
    # 0.1 ||x||; the float32 noise itself is far more accurate (noise_norm_rtol).
    rtol = 2.0**-8 * 1.1 / 0.1 + noise_norm_rtol(x.size, norm(x), 0.1 * norm(x))
    np.testing.assert_allclose(
        norm(y.astype(jnp.float32) - x.astype(jnp.float32)), 0.1 * norm(x), rtol=rtol
    )


@pytest.mark.parametrize("mode", perturb.MODES)
def test_perturbation_function_has_each_modes_closed_form(mode):
    """``perturbation`` (the delta the operators add) against each mode's definition."""
    spec = perturb.make_spec(mode, fmt="float4_e2m1")
    delta = np.asarray(jax.jit(perturb.perturbation, static_argnums=3)(X, KEY, 0.4, spec))
    assert delta.dtype == np.float32 and delta.shape == X.shape
    x = np.asarray(X, np.float64)
    if mode == "bias":
        np.testing.assert_array_equal(delta, np.float32(-0.4) * np.asarray(X))
    elif mode == "round":  # 0.4 (q(x) - x): one rounding of the difference, one product
        q = np.asarray(round_to_format(X, "float4_e2m1"), np.float64)
        assert_within(delta, 0.4 * (q - x), 2 * U * 0.4 * np.abs(q - x))
    else:  # norms of 20 values (gamma(22) each) and a few products: noise_norm_rtol
        want = 0.4 if mode == "absolute" else 0.4 * norm(X)
        rtol = 2 * gamma(X.size + 2) + 4 * U
        np.testing.assert_allclose(norm(delta), want, rtol=rtol)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("op", [perturb.forward, perturb.backward])
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "gaussian"}, "mode"),
        ({"fmt": "float16"}, "fmt"),
        ({"rounding": "up"}, "rounding"),
        ({"scale": -0.1}, "scale"),
    ],
)
def test_bad_options_raise_value_error_naming_the_argument(op, kwargs, name):
    kwargs = {"scale": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        op(X, KEY, **kwargs)


def test_bad_options_are_rejected_even_at_scale_zero():
    with pytest.raises(ValueError, match="mode"):
        perturb.forward(X, KEY, 0, "gaussian")


def test_make_spec_validates():
    assert perturb.make_spec("bias") == perturb.PerturbSpec("bias", "float8_e4m3", "nearest")
    with pytest.raises(ValueError, match="mode"):
        perturb.make_spec("scaled")


def test_stochastic_rounding_without_a_key_raises():
    with pytest.raises(ValueError, match="key"):
        perturb.forward(X, None, 1.0, "round", rounding="stochastic")
    with pytest.raises(ValueError, match="key"):
        jax.grad(lambda x: perturb.backward(x, None, 1.0, "round", rounding="stochastic").sum())(X)


# ---------------------------------------------------------------- complex values

Z = jnp.array([[3.0 + 4.0j, 1.0 - 2.0j], [0.5j, -1.5 + 0.0j]], jnp.complex64)


def test_complex_bias_scales_real_and_imaginary_parts():
    # -0.5 * z is exact in complex64 (a power of two), so z + delta is too.
    y = jax.jit(lambda z: perturb.forward(z, KEY, 0.5, "bias"))(Z)
    assert y.dtype == jnp.complex64
    np.testing.assert_array_equal(y, [[1.5 + 2.0j, 0.5 - 1.0j], [0.25j, -0.75 + 0.0j]])


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_complex_random_modes_perturb_both_parts_with_the_norm_of_abs_z(mode):
    delta = np.asarray(jax.jit(lambda z: perturb.forward(z, KEY, 0.25, mode))(Z)) - np.asarray(Z)
    # ||Z|| = sqrt(25 + 5 + 0.25 + 2.25) = sqrt(32.5), the norm of |z| (not of the real part).
    want = 0.25 if mode == "absolute" else 0.25 * np.sqrt(32.5)
    # float32 error: the norms of 8 real coordinates and the products scale * ||v|| * u /
    # ||u|| carry a few ulps each, and each element of z + delta one ulp of |z + delta|
    # (<= |z| + |delta| <= 6): 16 * eps relative to ||delta|| is ample for both.
    tol = 16 * np.finfo(np.float32).eps * (1 + np.sqrt(32.5) / want)
    np.testing.assert_allclose(np.linalg.norm(delta), want, rtol=tol)
    assert np.all(delta.imag != 0) and np.all(delta.real != 0)


def test_complex_round_rounds_each_part():
    z = jnp.array([0.3 + 1.1j, 5.2 - 0.2j, 2.6 + 7.0j], jnp.complex64)
    y = jax.jit(lambda z: perturb.forward(z, KEY, 1.0, "round", fmt="float4_e2m1"))(z)
    # float4 e2m1 grid: 0, 0.5, 1, 1.5, 2, 3, 4, 6 (saturating at 6).
    np.testing.assert_array_equal(y, [0.5 + 1.0j, 6.0 - 0.0j, 3.0 + 6.0j])


def test_integer_values_are_rejected():
    with pytest.raises(ValueError, match="float or complex"):
        perturb.forward(jnp.arange(3), KEY, 0.1)
