"""optstab.lowprec.layers: QuantLinear numerics, the traced precision switch (no
recompilation), the outlier hook, delayed scaling and rounding keys as NNX state, and the
wiring from a real GNMR state through recovery_mask to the right layers."""

import jax
import jax.numpy as jnp
import lowprec_reference as ref
import numpy as np
import optax
import pytest
from flax import nnx

import optstab
from optstab import lowprec


class TwoLayers(nnx.Module):
    def __init__(self, config, rngs, dtype=jnp.float32):
        kw = dict(config=config, rngs=rngs, param_dtype=dtype)
        self.l1 = lowprec.QuantLinear(6, 5, **kw)
        self.l2 = lowprec.QuantLinear(5, 3, **kw)

    def __call__(self, x, outliers=None):
        return self.l2(jax.nn.tanh(self.l1(x, outliers)))


def inputs(shape=(4, 6), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def per_layer(params):
    return optstab.units.by_regex({r"^(.*)/[^/]+$": r"\1"})(params)


def values(layer):
    """The layer's kernel and bias as float64 numpy arrays."""
    return (np.asarray(v.get_value(), np.float64) for v in (layer.kernel, layer.bias))


def assert_within(actual, desired, bound):
    """``|actual - desired| <= bound`` elementwise (float64)."""
    excess = np.abs(np.asarray(actual, np.float64) - np.asarray(desired, np.float64)) - bound
    assert np.all(excess <= 0), excess.max()


def dense_bound(x, w, b, n_layers=1):
    """Float32 error bound of ``x @ w + b`` (as float64 arrays): gamma_{k+1} of the
    absolute terms, k the inner dimension (the bias adds one term)."""
    return ref.gamma(w.shape[0] + 1) * (np.abs(x) @ np.abs(w) + np.abs(b))


def test_high_precision_matches_nnx_linear():
    layer = lowprec.QuantLinear(6, 5, config=lowprec.quant_config("float4_e2m1"), rngs=nnx.Rngs(0))
    plain = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    x = inputs()
    # float4 keeps 1 mantissa bit: errors of ~10% of the inputs, far above 1e-3.
    assert not np.allclose(layer(x), plain(x), rtol=1e-3)
    lowprec.set_high_precision(layer, {"": jnp.array(True)})
    # Two float32 evaluations of x @ w + b (6 products and a bias): each within
    # gamma_7 of the absolute terms of the exact value.
    w, b = values(plain)
    assert_within(layer(x), plain(x), 2 * dense_bound(np.asarray(x, np.float64), w, b))


@pytest.mark.parametrize("fmt", ["float8_e4m3", "float8_e5m2", "float4_e2m1", "int8"])
def test_low_precision_output_is_the_product_of_quantized_inputs(fmt):
    config = lowprec.quant_config(fmt)
    layer = lowprec.QuantLinear(6, 5, config=config, rngs=nnx.Rngs(1))
    x = np.asarray(inputs())
    w, b = values(layer)
    w32 = w.astype(np.float32)
    # The numpy reference: one per-tensor scale each for x and the kernel.
    xq = ref.quantize(x, ref.scales(x, "per_tensor", fmt), fmt).astype(np.float64)
    wq = ref.quantize(w32, ref.scales(w32, "per_tensor", fmt), fmt).astype(np.float64)
    # Float32 error: the dot and bias (gamma_7), and the scales, which XLA may compute
    # 2U away from numpy's (one more rounding each side): 4U of the quantized terms.
    bound = dense_bound(xq, wq, b) + 4 * ref.U * (np.abs(xq) @ np.abs(wq))
    assert_within(layer(jnp.asarray(x)), xq @ wq + b, bound)


@pytest.mark.parametrize("fmt", ["float8_e4m3", "int8"])
def test_fine_grained_layer_uses_activation_tiles_and_weight_blocks(fmt):
    """1x4 activation tiles and 4x4 kernel blocks (8 inputs, 6 outputs: 2 x 2 blocks, the
    last block column 2 wide), each with its own scale, computed here in numpy."""
    config = lowprec.quant_config(fmt, scaling="fine_grained", block_size=4)
    layer = lowprec.QuantLinear(8, 6, config=config, rngs=nnx.Rngs(3))
    x = np.asarray(inputs((3, 8))) * np.float32([1, 1, 1, 1, 100, 100, 100, 100])
    w, b = values(layer)
    w32 = (w * np.float32([[1e-3]] * 4 + [[1.0]] * 4)).astype(np.float32)  # a small block row
    layer.kernel.set_value(jnp.asarray(w32))
    x_scale = ref.scales(x, "fine_grained", fmt, block=4)
    w_scale = (ref.block_amax_expanded(w32, 4) / np.float32(ref.FORMAT_MAX[fmt])).astype(np.float32)
    xq = ref.quantize(x, x_scale, fmt).astype(np.float64)
    wq = ref.quantize(w32, w_scale, fmt).astype(np.float64)
    bound = dense_bound(xq, wq, b) + 4 * ref.U * (np.abs(xq) @ np.abs(wq))  # as above
    assert_within(layer(jnp.asarray(x)), xq @ wq + b, bound)
    # The recorded input amax is the largest tile amax: the whole input's.
    assert float(layer.input_amax.get_value()) == np.abs(x).max()
    # Per tensor, the small block row of the kernel (1e-3 against 1) rounds coarsely
    # (int8: to zero; e4m3: into its subnormals): the outputs differ well beyond 1e-3.
    per_tensor = lowprec.QuantLinear(8, 6, config=lowprec.quant_config(fmt), rngs=nnx.Rngs(3))
    per_tensor.kernel.set_value(jnp.asarray(w32))
    assert not np.allclose(per_tensor(jnp.asarray(x)), layer(jnp.asarray(x)), rtol=1e-3)


def test_switch_flips_numerics_without_recompiling():
    model = TwoLayers(lowprec.quant_config("float4_e2m1"), nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    traces = []

    @jax.jit
    def forward(params, rest, flag, x):
        traces.append(1)
        m = nnx.merge(graphdef, params, rest, copy=True)
        lowprec.set_high_precision(m, {"l1": flag, "l2": flag})
        return m(x)

    x = inputs()
    low = forward(params, rest, jnp.array(False), x)
    high = forward(params, rest, jnp.array(True), x)
    assert len(traces) == 1 and forward._cache_size() == 1
    assert not np.allclose(low, high, rtol=1e-3)  # float4 errors: ~10%, far above 1e-3
    lowprec.set_high_precision(model, {"": jnp.array(True)})
    # Eager and jitted float32 runs of l2(tanh(l1(x))): each layer within dense_bound
    # of exact, tanh (1-Lipschitz) within 4 ulps, so they differ by at most twice the
    # first layer's bound carried through |w2|, plus twice the second layer's.
    w1, b1 = values(model.l1)
    w2, b2 = values(model.l2)
    x64 = np.asarray(x, np.float64)
    h = np.tanh(x64 @ w1 + b1)
    first = 2 * dense_bound(x64, w1, b1) + 8 * ref.U * np.abs(h)
    assert_within(high, model(x), first @ np.abs(w2) + 2 * dense_bound(np.abs(h), w2, b2))


def test_outliers_reach_only_the_quantizer():
    config = lowprec.quant_config("int8")
    layer = lowprec.QuantLinear(6, 5, config=config, rngs=nnx.Rngs(2))
    x = inputs()
    bursts = jnp.ones(6).at[2].set(1000.0)
    clean_low = layer(x)
    crushed = layer(x, bursts)
    # Channel 2 sets the int8 scale s = 1000 max|x_2| / 127, so every other channel
    # (|x| < 0.5 s) rounds to zero and channel 2 keeps x_2 within half a step, s / 2000.
    x64, (w, b) = np.asarray(x, np.float64), values(layer)
    step = 1000 * np.abs(x64[:, 2]).max() / 127 / 1000
    assert np.all(np.abs(np.delete(x64, 2, axis=1)) < 0.5 * step * 1000)
    # The kernel is int8 too: within half a step of its own scale, max|w| / 127.
    w_step = np.abs(w).max() / 127
    expected = x64[:, 2:3] * w[2:3] + b
    bound = (
        np.abs(x64[:, 2:3]) * 0.5 * w_step
        + 0.5 * step * (np.abs(w[2:3]) + 0.5 * w_step)
        + dense_bound(np.abs(x64), np.abs(w), b)  # the float32 dot and bias
    )
    assert_within(crushed, expected, bound)
    assert not np.allclose(crushed, clean_low, atol=1e-2)  # five channels lost: O(1) changes
    lowprec.set_high_precision(layer, {"": jnp.array(True)})
    np.testing.assert_array_equal(layer(x, bursts), layer(x))  # float32 never sees them


def test_stress_helper_is_what_the_layer_applies():
    x = inputs()
    bursts = jnp.ones(6).at[4].set(30.0)
    seen = []
    out = lowprec.stress.through_quantizer(x, bursts, lambda v: seen.append(v) or 2 * v)
    np.testing.assert_array_equal(seen[0], x * bursts)  # the quantizer sees x * a
    np.testing.assert_array_equal(out, 2 * (x * bursts) / bursts)  # and the layer Q(xa) / a
    with pytest.raises(ValueError, match="outliers"):
        lowprec.stress.check_outliers(jnp.ones(3), 6)


def test_input_amax_records_what_the_quantizer_saw():
    model = TwoLayers(lowprec.quant_config("int8"), nnx.Rngs(0))
    x = inputs()
    bursts = jnp.ones(6).at[1].set(50.0)
    model(x, bursts)
    amax = lowprec.input_amax(model)
    assert list(amax) == ["l1", "l2"]
    # The same float32 product x * 50 as the layer's, and a max is exact in any order.
    assert float(amax["l1"]) == np.max(np.abs(np.asarray(x) * np.asarray(bursts)))
    lowprec.set_high_precision(model, {"": jnp.array(True)})
    model(x)  # recorded in high precision too
    assert float(lowprec.input_amax(model)["l1"]) == np.max(np.abs(np.asarray(x)))


def test_delayed_scaling_lags_a_burst():
    config = lowprec.quant_config("int8", scale_mode="delayed", history=2)
    layer = lowprec.QuantLinear(4, 1, config=config, rngs=nnx.Rngs(0), use_bias=False)
    layer.kernel.set_value(jnp.eye(4)[:, :1])  # output = first input channel
    calm = jnp.array([[1.0, 0.5, -0.5, 0.25]])
    burst = calm.at[0, 0].set(100.0)
    layer(calm)
    np.testing.assert_array_equal(layer.amax_history.get_value(), [1.0, 0.0])
    saturated = layer(burst)  # the scale still comes from amax 1: 100 saturates at 1
    # Float32: the scales 1 / 127 (kernel and input: 2U each, see lowprec_reference),
    # 127 * scale (one rounding each) and their product: within 8U of the exact value.
    np.testing.assert_allclose(saturated, [[1.0]], rtol=8 * ref.U)
    np.testing.assert_array_equal(layer.amax_history.get_value(), [100.0, 1.0])
    after = layer(calm)  # the burst is over: scale 100 / 127, 1.0 rounds to 1 * scale
    np.testing.assert_allclose(after, [[100.0 / 127.0]], rtol=8 * ref.U)  # as above


def test_stochastic_rounding_key_lives_in_state():
    config = lowprec.quant_config("float4_e2m1", rounding="stochastic")

    def outputs(seed):
        layer = lowprec.QuantLinear(6, 5, config=config, rngs=nnx.Rngs(params=0, quant=seed))
        return np.asarray(layer(inputs())), np.asarray(layer(inputs()))

    first, second = outputs(3)
    again_first, again_second = outputs(3)
    np.testing.assert_array_equal(first, again_first)  # same key, same bits
    np.testing.assert_array_equal(second, again_second)
    assert not np.array_equal(first, second)  # the key advances between calls
    assert not np.array_equal(first, outputs(4)[0])


def test_backward_quantization_changes_gradients_only_in_low_precision():
    config = lowprec.quant_config("float8_e4m3", backward_fmt="float4_e2m1")
    model = TwoLayers(config, nnx.Rngs(0))
    reference = TwoLayers(lowprec.quant_config("float8_e4m3"), nnx.Rngs(0))
    x = inputs()

    def grads(m):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)

    low, low_ref = grads(model), grads(reference)
    # A float4 cotangent keeps 1 mantissa bit: ~10% changes, far above 1e-3.
    assert not np.allclose(low.l1.kernel.get_value(), low_ref.l1.kernel.get_value(), rtol=1e-3)
    for m in (model, reference):
        lowprec.set_high_precision(m, {"": jnp.array(True)})
    high, high_ref = grads(model), grads(reference)
    np.testing.assert_array_equal(high.l1.kernel.get_value(), high_ref.l1.kernel.get_value())


def test_bf16_params():
    """bf16 parameters and inputs are cast exactly to float32, so the layer's bf16 output
    is the float32 twin's output rounded to bf16, bit for bit; gradients keep bf16."""
    config = lowprec.quant_config("float8_e4m3")
    layer = lowprec.QuantLinear(6, 5, config=config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    twin = lowprec.QuantLinear(6, 5, config=config, rngs=nnx.Rngs(0))
    nnx.update(twin, jax.tree.map(lambda v: v.astype(jnp.float32), nnx.state(layer, nnx.Param)))
    x = inputs().astype(jnp.bfloat16)
    out = layer(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, twin(x.astype(jnp.float32)).astype(jnp.bfloat16))
    model = TwoLayers(config, nnx.Rngs(0), dtype=jnp.bfloat16)
    grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(model)
    assert grads.l1.kernel.get_value().dtype == jnp.bfloat16


def test_per_token_scaling_in_the_layer():
    config = lowprec.quant_config("int8", scaling="per_token")
    layer = lowprec.QuantLinear(3, 1, config=config, rngs=nnx.Rngs(0), use_bias=False)
    layer.kernel.set_value(jnp.array([[1.0], [0.0], [0.0]]))
    x = jnp.array([[1e-3, 2.1e-3, 0.0], [300.0, 1.0, 0.0]])
    got = np.asarray(layer(x))[:, 0]
    # Each row within half an int8 step of its own scale (amax / 127), plus float32
    # rounding (scales, products: 8U); one scale for both rows would zero row 0.
    step = np.array([2.1e-3, 300.0]) / 127
    assert_within(got, [1e-3, 300.0], 0.5 * step + 8 * ref.U * np.array([1e-3, 300.0]))


def test_delayed_history_through_a_jitted_functional_step():
    config = lowprec.quant_config("int8", scale_mode="delayed", history=3)
    model = TwoLayers(config, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, x):
        m = nnx.merge(graphdef, params, rest, copy=True)
        y = m(x)
        return y, nnx.split(m, nnx.Param, ...)[2]

    for scale in (1.0, 4.0):
        _, rest = step(params, rest, scale * inputs())
    history = nnx.merge(graphdef, params, rest).l1.amax_history.get_value()
    top = np.max(np.abs(np.asarray(inputs())))
    # Scaling by 4 is exact in float32 and a max is exact: the history is exact too.
    np.testing.assert_array_equal(history, np.float32([4 * top, top, 0.0]))
    assert step._cache_size() == 1


def test_bad_layer_options_are_rejected():
    with pytest.raises(ValueError, match="dtype"):
        lowprec.QuantLinear(3, 2, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    layer = lowprec.QuantLinear(3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="outliers"):
        layer(jnp.ones((1, 3)), jnp.ones(4))
    layer.high_precision.set_value(jnp.array([True, False]))
    with pytest.raises(ValueError, match="vmap"):
        layer(jnp.ones((1, 3)))


def test_nonfinite_inputs_pass_through():
    layer = lowprec.QuantLinear(3, 1, config=lowprec.quant_config("int8"), rngs=nnx.Rngs(0))
    out = layer(jnp.array([[1.0, jnp.inf, 0.5]]))
    assert not np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("units", [None, per_layer, optstab.units.by_depth(1)])
def test_gnmr_state_drives_the_right_layer(units):
    """A gradient spike on l2 in a real GNMR chain puts l2, and only l2, in float32."""
    model = TwoLayers(lowprec.quant_config("float4_e2m1"), nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(
        optstab.gnmr(action=("precision",), warmup_steps=3, lock_steps=4, units=units),
        optax.sgd(1e-2),
    )
    opt_state = tx.init(params)
    x = inputs()

    @jax.jit
    def step(params, rest, opt_state, spike):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            lowprec.set_high_precision(m, optstab.recovery_mask(opt_state))
            return jnp.mean(m(x) ** 2), lowprec.high_precision_flags(m)

        (_, flags), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        spiked = optstab.tree.leaf_names(grads).index("l2/kernel")
        leaves, treedef = jax.tree.flatten(grads)
        leaves[spiked] = leaves[spiked] * spike
        grads = jax.tree.unflatten(treedef, leaves)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, flags

    seen = []
    for t in range(12):
        params, opt_state, flags = step(params, rest, opt_state, jnp.float32(1e3 if t == 6 else 1))
        seen.append({k: bool(v) for k, v in flags.items()})
    assert step._cache_size() == 1
    assert all(not any(f.values()) for f in seen[:7])  # the mask acts from the next step
    for t in range(7, 11):  # lock_steps = 4 forward passes after the trigger
        assert seen[t] == {"l1": False, "l2": True}, (t, seen[t])
    assert seen[11] == {"l1": False, "l2": False}


def test_nnx_optimizer_and_nnx_jit_step_compile_once():
    """The README wiring: nnx.Optimizer + nnx.jit; a GNMR trigger flips one layer to
    float32 for lock_steps steps without a second trace."""
    model = TwoLayers(lowprec.quant_config("int8", scale_mode="delayed"), nnx.Rngs(0))
    tx = optax.chain(
        optstab.gnmr(action=("precision",), warmup_steps=3, lock_steps=2, units=per_layer),
        optax.adam(1e-3),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
        traces.append(1)
        lowprec.set_high_precision(model, optstab.recovery_mask(optimizer.opt_state))
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return lowprec.high_precision_flags(model)

    x = inputs()
    seen = []
    for t in range(10):
        y = jnp.full((4, 3), 1e3 if t == 5 else 0.0)  # a loss spike at step 5
        seen.append({k: bool(v) for k, v in train_step(model, optimizer, x, y).items()})
    assert len(traces) == 1
    assert not any(any(f.values()) for f in seen[:6])
    assert sum(f["l1"] or f["l2"] for f in seen[6:]) == 2  # lock_steps forward passes
    assert all(sum(f.values()) <= 1 for f in seen)  # budget: one unit


def test_vmapped_mask_sets_batched_switches():
    model = TwoLayers(lowprec.quant_config("int8"), nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(flag):
        m = nnx.merge(graphdef, params, rest, copy=True)
        lowprec.set_high_precision(m, {"l1/kernel": flag, "l2": ~flag})
        return jnp.stack(list(lowprec.high_precision_flags(m).values()))

    got = jax.vmap(forward)(jnp.array([True, False]))
    np.testing.assert_array_equal(got, [[True, False], [False, True]])


def test_strict_wiring_names_the_uncovered_layer():
    model = TwoLayers(lowprec.quant_config("int8"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="'l2'"):
        lowprec.set_high_precision(model, {"l1": jnp.array(True)})
    lowprec.set_high_precision(model, {"l1": jnp.array(True)}, strict=False)
    assert dict(lowprec.high_precision_flags(model)) == {"l1": True, "l2": False}
    assert [path for path, _ in lowprec.quant_layers(model)] == ["l1", "l2"]
    lowprec.set_high_precision(model, {"l1x": jnp.array(True)}, strict=False)
    assert not bool(lowprec.high_precision_flags(model)["l1"])  # "l1x" is not "l1"
