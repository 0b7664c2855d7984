"""optstab.lowprec.recoverable_units and amax_signal: GNMR's units and forward signal for
a model's quantized layers, on a small decoder-like nnx model (embedding, positions,
LayerNorms, QuantLinear layers in a list of blocks, a float32 head)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optstab
from optstab import lowprec

WIDTH, VOCAB, LENGTH = 8, 11, 5


class Spy(lowprec.QuantLinear):
    """A QuantLinear that also records max |input| itself (a max is exact in any order)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = lowprec.QuantState(jnp.zeros((), jnp.float32))

    def __call__(self, inputs, outliers=None):
        self.seen.set_value(jax.lax.stop_gradient(jnp.max(jnp.abs(inputs))))
        return super().__call__(inputs, outliers)


class Block(nnx.Module):
    def __init__(self, config, rngs):
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.up = Spy(WIDTH, 2 * WIDTH, config=config, rngs=rngs)
        self.down = Spy(2 * WIDTH, WIDTH, config=config, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Tiny(nnx.Module):
    def __init__(self, config, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.position = nnx.Param(0.1 * jax.random.normal(rngs.params(), (LENGTH, WIDTH)))
        self.blocks = nnx.List([Block(config, rngs) for _ in range(2)])
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position.get_value()[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny(config=None):
    return Tiny(config or lowprec.quant_config("int8"), nnx.Rngs(0))


@nnx.jit
def forward(model, tokens):
    """One jitted forward pass (eager dispatch of every small op is slow to compile)."""
    return model(tokens)


@nnx.jit
def switch_and_read(model, mask):
    lowprec.set_high_precision(model, mask, strict=False)
    return lowprec.high_precision_flags(model)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (3, LENGTH)), jnp.int32)
LAYERS = ["blocks/0/up", "blocks/0/down", "blocks/1/up", "blocks/1/down"]
# Written out by hand: the unit of every parameter leaf of Tiny.
EXPECTED_LABELS = {
    "blocks/0/down/bias": "blocks/0/down",
    "blocks/0/down/kernel": "blocks/0/down",
    "blocks/0/norm/bias": None,
    "blocks/0/norm/scale": None,
    "blocks/0/up/bias": "blocks/0/up",
    "blocks/0/up/kernel": "blocks/0/up",
    "blocks/1/down/bias": "blocks/1/down",
    "blocks/1/down/kernel": "blocks/1/down",
    "blocks/1/norm/bias": None,
    "blocks/1/norm/scale": None,
    "blocks/1/up/bias": "blocks/1/up",
    "blocks/1/up/kernel": "blocks/1/up",
    "embed/embedding": None,
    "head/bias": None,
    "head/kernel": None,
    "position": None,
}


def labels_by_leaf(units, params) -> dict:
    """``{leaf name: label}`` as a units consumer reads them (flatten up to the params)."""
    labels = jax.tree.structure(params).flatten_up_to(units(params))
    return dict(zip(optstab.tree.leaf_names(params), labels, strict=True))


def test_recoverable_units_label_each_quantized_leaf_with_its_layer_and_the_rest_none():
    model = tiny()
    units = lowprec.recoverable_units(model)
    assert labels_by_leaf(units, nnx.state(model, nnx.Param)) == EXPECTED_LABELS
    # The same on the Param state of a functional split, and on a plain dict of arrays.
    _, params, _ = nnx.split(model, nnx.Param, ...)
    assert labels_by_leaf(units, params) == EXPECTED_LABELS
    assert labels_by_leaf(units, nnx.to_pure_dict(params)) == EXPECTED_LABELS


class Recorder:
    """A GradientTransformation that records the labels of what it is given."""

    def __init__(self, units):
        self.units, self.seen = units, {}

    def transform(self):
        def init(params):
            self.seen["init"] = labels_by_leaf(self.units, params)
            return optax.EmptyState()

        def update(updates, state, params=None):
            self.seen["update_updates"] = labels_by_leaf(self.units, updates)
            self.seen["update_params"] = labels_by_leaf(self.units, params)
            return updates, state

        return optax.GradientTransformation(init, update)


def test_recoverable_units_fit_what_nnx_optimizer_passes_to_init_and_update():
    model = tiny()
    recorder = Recorder(lowprec.recoverable_units(model))
    optimizer = nnx.Optimizer(
        model, optax.chain(recorder.transform(), optax.sgd(0.1)), wrt=nnx.Param
    )

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(TOKENS) ** 2))(model)
        optimizer.update(model, grads)

    step(model, optimizer)
    assert set(recorder.seen) == {"init", "update_updates", "update_params"}
    for labels in recorder.seen.values():
        assert labels == EXPECTED_LABELS


def test_unit_names_are_the_layers_that_set_high_precision_switches_and_amax_signal_keys():
    model = tiny()
    labels = labels_by_leaf(lowprec.recoverable_units(model), nnx.state(model, nnx.Param))
    units = sorted({label for label in labels.values() if label is not None})
    assert units == sorted(LAYERS)
    forward(model, TOKENS)
    assert sorted(lowprec.amax_signal(model)) == units
    for unit in units:  # each unit name switches exactly its own layer
        flags = switch_and_read(model, {unit: jnp.array(True)})
        assert {path: bool(flag) for path, flag in flags.items()} == {
            path: path == unit for path in LAYERS
        }


def test_a_model_without_quantized_layers_has_no_recoverable_units():
    with pytest.raises(ValueError, match="no quantized layer"):
        lowprec.recoverable_units(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def first_layer_input(model, tokens) -> np.ndarray:
    """The input of blocks/0/up, computed in numpy from the model's parameters."""
    embed = np.asarray(model.embed.embedding.get_value(), np.float64)
    position = np.asarray(model.position.get_value(), np.float64)
    x = embed[np.asarray(tokens)] + position[: tokens.shape[-1]]
    norm = model.blocks[0].norm
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    scale, bias = (np.asarray(v.get_value(), np.float64) for v in (norm.scale, norm.bias))
    return (x - mean) / np.sqrt(var + norm.epsilon) * scale + bias


def test_amax_signal_is_read_inside_an_nnx_jit_step_after_the_grad_pass():
    model = tiny()
    traces = []

    @nnx.jit
    def step(model, tokens):
        traces.append(1)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
        seen = {path: layer.seen.get_value() for path, layer in lowprec.quant_layers(model)}
        return lowprec.amax_signal(model), seen

    for tokens in (TOKENS, TOKENS[::-1, ::-1] % 7):
        signal, seen = step(model, tokens)
        assert all(v.dtype == jnp.float32 and v.shape == () for v in signal.values())
        # Every layer's signal is the max |input| of this pass, as the layer saw it.
        assert {k: float(v) for k, v in signal.items()} == {k: float(v) for k, v in seen.items()}
        # blocks/0/up's input is LayerNorm(embedding + position), known in float64. The
        # float32 LayerNorm of 8 values (a sum, mean, variance and rsqrt) is accurate to
        # a few ulps of its outputs: 64 u relative is ample.
        want = np.max(np.abs(first_layer_input(model, tokens)))
        np.testing.assert_allclose(signal["blocks/0/up"], want, rtol=64 * 2.0**-24)
    assert len(traces) == 1


def test_amax_signal_is_the_amax_the_next_delayed_scale_reads():
    # Under delayed scaling the next call's scale comes from the largest amax of the last
    # `history` calls, this one included: by hand, the max over the Spy's own records
    # (max |input| taken outside the quantizer; a max is exact, so equality is exact).
    model = tiny(lowprec.quant_config("int8", scale_mode="delayed", history=3))
    norm = model.blocks[0].norm
    base = norm.scale.get_value()
    seen = {path: [] for path in LAYERS}
    held = []
    for size in (1.0, 5.0, 1.0, 1.0, 1.0):  # a one-call burst on blocks/0/up's input
        norm.scale.set_value(size * base)
        forward(model, TOKENS)
        signal, newest = lowprec.amax_signal(model), lowprec.input_amax(model)
        for path, layer in lowprec.quant_layers(model):
            seen[path].append(float(layer.seen.get_value()))
            assert float(newest[path]) == seen[path][-1]
            assert float(signal[path]) == max(seen[path][-3:])
        held.append(float(signal["blocks/0/up"]))
    up = seen["blocks/0/up"]
    assert up[1] > 2 * max(up[2:])  # the burst, then quiet calls
    # For the two calls after the burst the signal holds it (so does the scale) while the
    # newest amax has fallen; on the third it has left the history.
    assert held == [up[0], up[1], up[1], up[1], max(up[2:])]


def test_amax_signal_is_the_newest_amax_under_current_scaling():
    model = tiny(lowprec.quant_config("int8", scaling="fine_grained", block_size=4))
    forward(model, TOKENS)
    for path, layer in lowprec.quant_layers(model):
        assert float(lowprec.amax_signal(model)[path]) == float(layer.seen.get_value())


def test_amax_signal_is_zero_before_the_first_call_and_kept_when_non_finite():
    model = tiny(lowprec.quant_config("int8", scale_mode="delayed", history=2))
    assert all(float(v) == 0.0 for v in lowprec.amax_signal(model).values())
    model.embed.embedding.set_value(model.embed.embedding.get_value().at[TOKENS[0, 0]].set(jnp.inf))
    forward(model, TOKENS)
    layer = model.blocks[0].up
    assert not np.isfinite(float(lowprec.amax_signal(model)["blocks/0/up"]))
    assert float(layer.amax_history[0]) == 0.0  # the history skips it, the signal keeps it


def test_a_bare_quantized_layer_is_its_own_recoverable_unit():
    # The model is the layer: its path is "", as amax_signal's keys say, so GNMR's
    # external signal names the one unit.
    config = lowprec.quant_config("int8", scale_mode="delayed", history=2)
    layer = lowprec.QuantLinear(2, 1, config=config, rngs=nnx.Rngs(0))
    tx = optstab.gnmr(
        action=("precision",), units=lowprec.recoverable_units(layer), signal="external"
    )
    params = nnx.state(layer, nnx.Param)
    state = tx.init(params)
    assert tuple(optstab.find_gnmr_state(state).units) == ("",)
    layer(jnp.ones((1, 2)))
    grads = jax.tree.map(jnp.zeros_like, params)
    tx.update(grads, state, params, unit_signal=lowprec.amax_signal(layer))
