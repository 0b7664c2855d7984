"""optstab.lowprec.layers: QuantLinear numerics, the traced precision switch (no
recompilation), the outlier hook, delayed scaling and rounding keys as NNX state, and the
wiring from a real GNMR state through recovery_mask to the right layers."""

import jax
import jax.numpy as jnp
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


def test_high_precision_matches_nnx_linear():
    layer = lowprec.QuantLinear(6, 5, config=lowprec.quant_config("float4_e2m1"), rngs=nnx.Rngs(0))
    plain = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    x = inputs()
    assert not np.allclose(layer(x), plain(x), rtol=1e-3)
    lowprec.set_high_precision(layer, {"": jnp.array(True)})
    np.testing.assert_allclose(layer(x), plain(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["float8_e4m3", "float8_e5m2", "float4_e2m1", "int8"])
def test_low_precision_output_is_the_product_of_quantized_inputs(fmt):
    config = lowprec.quant_config(fmt)
    layer = lowprec.QuantLinear(6, 5, config=config, rngs=nnx.Rngs(1))
    x = inputs()
    w, b = layer.kernel.get_value(), layer.bias.get_value()
    xq = lowprec.quantize(x, lowprec.scale_from_amax(lowprec.amax(x), fmt), fmt)
    wq = lowprec.quantize(w, lowprec.scale_from_amax(lowprec.amax(w), fmt), fmt)
    np.testing.assert_allclose(layer(x), xq @ wq + b, rtol=1e-6, atol=1e-6)


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
    assert not np.allclose(low, high, rtol=1e-3)
    lowprec.set_high_precision(model, {"": jnp.array(True)})
    np.testing.assert_allclose(high, model(x), rtol=1e-6)


def test_outliers_reach_only_the_quantizer():
    config = lowprec.quant_config("int8")
    layer = lowprec.QuantLinear(6, 5, config=config, rngs=nnx.Rngs(2))
    x = inputs()
    bursts = jnp.ones(6).at[2].set(1000.0)
    clean_low = layer(x)
    crushed = layer(x, bursts)
    # Channel 2 sets the int8 scale, so every other channel rounds to zero.
    expected = (x[:, 2:3] * layer.kernel.get_value()[2:3]) + layer.bias.get_value()
    np.testing.assert_allclose(crushed, expected, rtol=0.05, atol=1e-2)  # W is int8 too
    assert not np.allclose(crushed, clean_low, atol=1e-2)
    lowprec.set_high_precision(layer, {"": jnp.array(True)})
    np.testing.assert_array_equal(layer(x, bursts), layer(x))  # float32 never sees them


def test_input_amax_records_what_the_quantizer_saw():
    model = TwoLayers(lowprec.quant_config("int8"), nnx.Rngs(0))
    x = inputs()
    model(x, jnp.ones(6).at[1].set(50.0))
    amax = lowprec.input_amax(model)
    assert list(amax) == ["l1", "l2"]
    np.testing.assert_allclose(amax["l1"], np.max(np.abs(x * jnp.ones(6).at[1].set(50.0))))
    lowprec.set_high_precision(model, {"": jnp.array(True)})
    model(x)  # recorded in high precision too
    np.testing.assert_allclose(lowprec.input_amax(model)["l1"], np.max(np.abs(x)))


def test_delayed_scaling_lags_a_burst():
    config = lowprec.quant_config("int8", scale_mode="delayed", history=2)
    layer = lowprec.QuantLinear(4, 1, config=config, rngs=nnx.Rngs(0), use_bias=False)
    layer.kernel.set_value(jnp.eye(4)[:, :1])  # output = first input channel
    calm = jnp.array([[1.0, 0.5, -0.5, 0.25]])
    burst = calm.at[0, 0].set(100.0)
    layer(calm)
    np.testing.assert_array_equal(layer.amax_history.get_value(), [1.0, 0.0])
    saturated = layer(burst)  # the scale still comes from amax 1: 100 saturates at 1
    np.testing.assert_allclose(saturated, [[1.0]], rtol=1e-6)
    np.testing.assert_array_equal(layer.amax_history.get_value(), [100.0, 1.0])
    after = layer(calm)  # the burst is over, the scale is still 100/127
    np.testing.assert_allclose(after, [[100.0 / 127.0]], rtol=1e-6)


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
    assert not np.allclose(low.l1.kernel.get_value(), low_ref.l1.kernel.get_value(), rtol=1e-3)
    for m in (model, reference):
        lowprec.set_high_precision(m, {"": jnp.array(True)})
    high, high_ref = grads(model), grads(reference)
    np.testing.assert_array_equal(high.l1.kernel.get_value(), high_ref.l1.kernel.get_value())


def test_bf16_params():
    """bf16 parameters and inputs: bf16 output equal (to bf16 rounding) to the same
    quantized computation from float32 copies; gradients keep the parameter dtype."""
    config = lowprec.quant_config("float8_e4m3")
    model = TwoLayers(config, nnx.Rngs(0), dtype=jnp.bfloat16)
    twin = TwoLayers(config, nnx.Rngs(0))
    nnx.update(twin, jax.tree.map(lambda v: v.astype(jnp.float32), nnx.state(model, nnx.Param)))
    x = inputs().astype(jnp.bfloat16)
    out = model(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), twin(x.astype(jnp.float32)), rtol=1e-2, atol=1e-2
    )
    grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(model)
    assert grads.l1.kernel.get_value().dtype == jnp.bfloat16


def test_per_token_scaling_in_the_layer():
    config = lowprec.quant_config("int8", scaling="per_token")
    layer = lowprec.QuantLinear(3, 1, config=config, rngs=nnx.Rngs(0), use_bias=False)
    layer.kernel.set_value(jnp.array([[1.0], [0.0], [0.0]]))
    x = jnp.array([[1e-3, 2e-3, 0.0], [300.0, 1.0, 0.0]])
    got = np.asarray(layer(x))[:, 0]
    np.testing.assert_allclose(got, [1e-3, 300.0], rtol=1e-2)  # the small row keeps its value


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
    top = float(np.max(np.abs(inputs())))
    np.testing.assert_allclose(history, [4 * top, top, 0.0], rtol=1e-6)
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
