"""optstab.lowprec.scaling: amaxes, scales and quantized values against hand computations,
error bounds per format and granularity (fine-grained tiles and blocks included), delayed
scaling, straight-through and cotangent gradients, int8, and validation.

Expected values are written out by hand or computed here in numpy from the definitions
(scale = amax / format max; value = round(x / scale) * scale on the format's grid),
never with the functions under test.
"""

import jax
import jax.numpy as jnp
import lowprec_reference as ref
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from optstab import lowprec
from optstab.lowprec import scaling as q

FMTS = ("float8_e4m3", "float8_e5m2", "float4_e2m1", "int8")
FORMAT_MAX = ref.FORMAT_MAX
U = ref.U


def sample(shape=(64, 32), seed=0, spread=3.0):
    """Values spread over several orders of magnitude, both signs."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * np.exp(spread * rng.standard_normal(shape))).astype(
        np.float32
    )


# ------------------------------------------------------------------ hand computations


def test_per_tensor_amax_scale_and_values_by_hand():
    x = jnp.array([0.5, -1.1, 0.25, 2.0])
    assert float(q.amax(x)) == 2.0
    scale = q.scale_from_amax(q.amax(x), "int8")
    # amax / 127: XLA may compute it as amax * (1 / 127), two roundings: 2 U.
    np.testing.assert_allclose(scale, 2.0 / 127.0, rtol=2 * U)
    # x / scale = 31.75, -69.85, 15.875, 127 -> 32, -70, 16, 127 (times 2 / 127). Float32
    # error: the division x / scale and the product k * scale, one rounding each (the
    # quotients are >= 0.1 away from a rounding tie): 4 U relative covers them.
    want = np.array([32, -70, 16, 127]) * 2.0 / 127.0
    np.testing.assert_allclose(q.quantize(x, scale, "int8"), want, rtol=4 * U)
    # float8 e4m3 with scale 1: the grid values next to 0.3 and 3.3, and saturation.
    got = q.quantize(jnp.array([0.3, 3.3, -500.0]), jnp.float32(1.0), "float8_e4m3")
    np.testing.assert_array_equal(got, [0.3125, 3.25, -448.0])


def test_per_token_scales_rows_independently_by_hand():
    x = jnp.array([[1e-3, 2.1e-3, -4e-3], [100.0, 1.0, -3.0]])
    np.testing.assert_array_equal(q.amax(x, "per_token"), np.float32([[4e-3], [100.0]]))
    got = q.quantize(x, q.scale_from_amax(q.amax(x, "per_token"), "int8"), "int8")
    # Row 0: scale 4e-3 / 127, quotients 31.75, 66.675, -127 -> 32, 67, -127.
    # Row 1: scale 100 / 127, quotients 127, 1.27, -3.81 -> 127, 1, -4. (4 U: as above.)
    want = [np.array([32, 67, -127]) * 4e-3 / 127, np.array([127, 1, -4]) * 100 / 127]
    np.testing.assert_allclose(got, want, rtol=4 * U)
    # One scale for both rows (100 / 127) crushes the small row to zero.
    per_tensor = q.quantize(x, q.scale_from_amax(q.amax(x), "int8"), "int8")
    np.testing.assert_array_equal(per_tensor[0], 0.0)


# Two rows of two 1x4 tiles: the tile amaxes are 2, 100 and 0.04, 1.
TILES_X = np.array(
    [
        [0.5, -1.1, 0.25, 2.0, 100.0, -3.0, 0.0, 60.0],
        [-0.01, 0.021, 0.04, -0.03, 1.0, 1.0, -1.0, 0.6],
    ],
    np.float32,
)
# By hand: quotients x / (tile amax / 127) rounded to integers (none within 0.1 of a tie):
# row 0: 31.75, -69.85, 15.875, 127 | 127, -3.81, 0, 76.2
# row 1: -31.75, 66.675, 127, -95.25 | 127, 127, -127, 76.2
TILES_INT8 = np.array(
    [
        [*(np.array([32, -70, 16, 127]) * 2 / 127), *(np.array([127, -4, 0, 76]) * 100 / 127)],
        [*(np.array([-32, 67, 127, -95]) * 0.04 / 127), *(np.array([127, 127, -127, 76]) / 127)],
    ]
)


def test_fine_grained_tile_amax_scales_and_values_by_hand():
    x = jnp.asarray(TILES_X)
    np.testing.assert_array_equal(q.tile_amax(x, 4), np.float32([[2.0, 100.0], [0.04, 1.0]]))
    amax = q.amax(x, "fine_grained", block_size=4)  # each element gets its tile's amax
    np.testing.assert_array_equal(amax[:, 3:5], np.float32([[2.0, 100.0], [0.04, 1.0]]))
    assert amax.shape == x.shape
    got = q.quantize(x, q.scale_from_amax(amax, "int8"), "int8")
    np.testing.assert_allclose(got, TILES_INT8, rtol=4 * U)  # 4 U: as above
    # Per tensor (scale 100 / 127) the small tile of row 1 is crushed; its own scale keeps it.
    per_tensor = q.quantize(x, q.scale_from_amax(q.amax(x), "int8"), "int8")
    np.testing.assert_array_equal(per_tensor[1, :4], 0.0)


def test_fine_grained_last_tile_may_be_shorter():
    x = jnp.array([[1.0, -2.0, 3.0, 0.5, -7.0, 6.0]])  # tiles [0:4], [4:6]
    np.testing.assert_array_equal(q.tile_amax(x, 4), [[3.0, 7.0]])
    np.testing.assert_array_equal(q.amax(x, "fine_grained", 4), [[3, 3, 3, 3, 7, 7]])
    np.testing.assert_array_equal(q.tile_amax(x, 128), [[7.0]])  # one tile when C <= 128


def test_weight_blocks_by_hand():
    w = jnp.array(
        [
            [1.0, -2.0, 0.5, 0.1, 9.0],
            [0.0, 0.5, -3.0, 0.2, 0.0],
            [4.0, 0.1, 0.0, -0.3, 1.0],
        ]
    )  # 2x2 blocks: rows [0:2], [2:3]; columns [0:2], [2:4], [4:5]
    np.testing.assert_array_equal(q.block_amax(w, 2), np.float32([[2, 3, 9], [4, 0.3, 1]]))
    expanded = q.weight_amax(w, "fine_grained", 2)
    np.testing.assert_array_equal(
        expanded,
        np.float32([[2, 2, 3, 3, 9], [2, 2, 3, 3, 9], [4, 4, 0.3, 0.3, 1]]),
    )
    assert float(q.weight_amax(w, "per_token")) == 9.0  # other recipes: one weight scale


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("scaling", q.SCALINGS)
def test_nearest_error_within_half_a_grid_step(fmt, scaling):
    """|Q(x) - x| <= half the grid spacing at x's scale, for every scaling and format."""
    x = sample()
    scale = ref.scales(x, scaling, fmt)
    got_scale = q.scale_from_amax(q.amax(jnp.asarray(x), scaling, block_size=8), fmt)
    got_scale = np.broadcast_to(np.asarray(got_scale), x.shape)
    np.testing.assert_allclose(got_scale, scale, rtol=2 * U)  # see numpy_scales
    got = np.asarray(jax.jit(q.quantize, static_argnums=2)(x, got_scale, fmt), np.float64)
    assert_within_half_a_step(got, x, got_scale, fmt)
    # Each group's amax maps onto the format's largest value: x / scale is within 2U of
    # it (the scale's own 2U) and rounds to it, and max * scale adds one rounding: 4U.
    group_amax = scale * FORMAT_MAX[fmt]  # as float64 the exact group amax, up to 1 U
    top = np.abs(x) >= group_amax * (1 - 4 * U)
    np.testing.assert_allclose(np.abs(got[top]), np.abs(x[top]), rtol=4 * U)


def assert_within_half_a_step(got, x, scale, fmt):
    """``|got - x| <= 0.5 * spacing(x / scale) * scale + 2U |x|``.

    The exact rounding of ``x / scale`` to the grid errs by at most half a spacing; the
    float32 quotient ``x / scale`` and product ``k * scale`` add one rounding each (at
    most ``U |x|`` each, up to a factor 1 + O(U)).
    """
    x64, s64 = np.asarray(x, np.float64), np.asarray(scale, np.float64)
    bound = 0.5 * ref.spacing(x64 / s64, fmt) * s64 + 2 * U * np.abs(x64) * (1 + 4 * U)
    excess = np.abs(got - x64) - bound
    assert np.all(excess <= 0), (excess.max(), np.unravel_index(excess.argmax(), x.shape))


FINE_SHAPE, FINE_BLOCK = (3, 10), 4  # tiles of 4, 4 and 2 channels


@pytest.fixture(scope="module")
def fine_quantize():
    """One compiled fine-grained fake quantizer per format (fixed shape and block)."""

    def make(fmt):
        def fn(x):
            scale = q.scale_from_amax(q.amax(x, "fine_grained", FINE_BLOCK), fmt)
            return q.fake_quant(x, scale, fmt), scale

        return jax.jit(fn)

    return {fmt: make(fmt) for fmt in FMTS}


@given(seed=st.integers(0, 2**32 - 1))
def test_fine_grained_round_trip_error_per_tile_for_every_format(fine_quantize, seed):
    """Tiles of very different magnitudes: each keeps half a step of its own scale."""
    rng = np.random.default_rng(seed)
    magnitude = np.exp(rng.uniform(-8, 8, (FINE_SHAPE[0], 3)))  # one per tile
    per_channel = np.repeat(magnitude, FINE_BLOCK, axis=1)[:, : FINE_SHAPE[1]]
    x = (rng.standard_normal(FINE_SHAPE) * per_channel).astype(np.float32)
    for fmt, fn in fine_quantize.items():
        got, got_scale = fn(x)
        scale = ref.scales(x, "fine_grained", fmt, FINE_BLOCK)
        np.testing.assert_allclose(got_scale, scale, rtol=2 * U)  # see numpy_scales
        assert_within_half_a_step(np.asarray(got, np.float64), x, np.asarray(got_scale), fmt)


# ------------------------------------------------------------------ other behaviour


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_error_below_one_step_and_unbiased(fmt):
    # 0.3 lies between the grid neighbours below (by hand, at scale 1 for the float
    # formats; int8 at scale 0.07: 0.3 / 0.07 = 4.29 lies between 4 and 5).
    lo, hi, scale = {
        "float8_e4m3": (0.28125, 0.3125, 1.0),  # spacing 2**-5 in [0.25, 0.5)
        "float8_e5m2": (0.25, 0.3125, 1.0),  # spacing 2**-4
        "float4_e2m1": (0.0, 0.5, 1.0),  # subnormal spacing 0.5
        "int8": (4 * 0.07, 5 * 0.07, 0.07),
    }[fmt]
    x = jnp.full((20000,), 0.3)
    got = np.asarray(q.quantize(x, jnp.float32(scale), fmt, "stochastic", jax.random.key(1)))
    # int8's neighbours k * 0.07 carry the rounding of the product (U relative).
    np.testing.assert_allclose(np.unique(got), [lo, hi], rtol=2 * U)
    # Unbiased: the mean of n draws of a two-point variable of spread (hi - lo) has a
    # standard error <= (hi - lo) / (2 sqrt(n)); 5 of them (a 6e-7 chance to fail).
    standard_error = (hi - lo) / 2 / np.sqrt(x.size)
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


def test_delayed_scaling_history_by_hand():
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


def test_fake_quant_value_by_hand_and_identity_gradient():
    x = jnp.array([0.3, -1.1, 2.6, 7.0])
    # float4 e2m1 at scale 0.5: x / 0.5 = 0.6, -2.2, 5.2, 14 -> 0.5, -2, 6, 6 (saturated).
    value, vjp = jax.vjp(lambda v: q.fake_quant(v, jnp.float32(0.5), "float4_e2m1"), x)
    np.testing.assert_array_equal(value, [0.25, -1.0, 3.0, 3.0])
    cotangent = jnp.array([1.0, -2.0, 3.0, 4.0])
    np.testing.assert_array_equal(vjp(cotangent)[0], cotangent)


def test_fake_quant_keeps_bf16():
    x = jnp.asarray(sample((8,))).astype(jnp.bfloat16)
    out = q.fake_quant(x, q.scale_from_amax(q.amax(x), "float8_e4m3"), "float8_e4m3")
    assert out.dtype == jnp.bfloat16


# The cotangent of test_quantize_cotangent and, by hand, its float4 e2m1 quantization.
COTANGENT = jnp.array([[0.3, -12.0, 2.2, 0.0], [5.2, 10.4, -0.4, 1.0]])
COTANGENT_E2M1 = {
    # amax 12 -> scale 2; g / 2 = 0.15, -6, 1.1, 0 | 2.6, 5.2, -0.2, 0.5 on the grid
    # 0, 0.5, 1, 1.5, 2, 3, 4, 6 -> 0, -6, 1, 0 | 3, 6, -0, 0.5.
    "per_tensor": np.array([[0.0, -12.0, 2.0, 0.0], [6.0, 12.0, -0.0, 1.0]]),
    # row 1 alone: amax 10.4 -> scale 10.4 / 6; g / scale = 3, 6, -0.23, 0.577 -> 3, 6, -0,
    # 0.5.
    "per_token": np.array([[0.0, -12.0, 2.0, 0.0], [5.2, 10.4, -0.0, 0.5 * 10.4 / 6]]),
    # 1 x 2 tiles: amaxes 12, 2.2 | 10.4, 1.0; the tile (0.3, -12) as per tensor; the tile
    # (2.2, 0): scale 2.2 / 6, quotients 6, 0; the tile (5.2, 10.4) as per token; the
    # tile (-0.4, 1.0): scale 1 / 6, quotients -2.4, 6 -> -2, 6.
    "fine_grained": np.array([[0.0, -12.0, 2.2, 0.0], [5.2, 10.4, -2.0 / 6, 1.0]]),
}


@pytest.mark.parametrize("scaling", q.SCALINGS)
def test_quantize_cotangent_by_hand(scaling):
    x = jnp.ones_like(COTANGENT)

    def pullback(skip):
        f = lambda v: q.quantize_cotangent(v, "float4_e2m1", scaling, skip=skip, block_size=2)
        value, vjp = jax.vjp(f, x)
        np.testing.assert_array_equal(value, x)
        return np.asarray(vjp(COTANGENT)[0])

    # float32 error: scale = amax / 6 and the quotients are rounded once each (none is
    # near a tie of the grid), and k * scale once more: 4 U relative.
    np.testing.assert_allclose(pullback(False), COTANGENT_E2M1[scaling], rtol=4 * U)
    np.testing.assert_array_equal(pullback(True), COTANGENT)


def test_quantize_cotangent_int8_tiles_by_hand():
    f = lambda v: q.quantize_cotangent(v, "int8", "fine_grained", block_size=4)
    back = jax.vjp(f, jnp.zeros_like(TILES_X))[1](jnp.asarray(TILES_X))[0]
    np.testing.assert_allclose(back, TILES_INT8, rtol=4 * U)  # 4 U: as for the values


def test_quantize_cotangent_stochastic_same_key_same_bits():
    x = jnp.asarray(sample((32,), seed=7))
    g = jnp.asarray(sample((32,), seed=8))

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
        ({"scale_mode": "delayed", "scaling": "fine_grained"}, "delayed"),
        ({"rounding": "up"}, "rounding"),
        ({"history": 0}, "history"),
        ({"history": 2.5}, "history"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 64.0}, "block_size"),
    ],
)
def test_quant_config_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        q.quant_config(**kwargs)


def test_block_scaling_needs_a_matrix_and_cotangents_a_valid_block():
    with pytest.raises(ValueError, match="2-D"):
        q.block_amax(jnp.ones((2, 2, 2)), 2)
    with pytest.raises(ValueError, match="block_size"):
        q.quantize_cotangent(jnp.ones(3), scaling="fine_grained", block_size=0)


def test_stochastic_cotangent_needs_key():
    with pytest.raises(ValueError, match="key"):
        q.quantize_cotangent(jnp.ones(3), rounding="stochastic")
