"""Flax NNX layers with fake-quantized matmuls and a per-layer precision switch.

:class:`QuantLinear` is an ``nnx.Linear`` whose matmul inputs (the activation and the
kernel) are fake-quantized as a :class:`~optstab.lowprec.scaling.QuantConfig` says,
and whose output cotangent may be quantized too. Each layer carries a traced boolean
:class:`HighPrecision` variable: while it is true the layer computes as ``nnx.Linear``
does in float32 (at ``Precision.HIGHEST``). Because the switch is a value, not a Python
attribute, flipping it never recompiles the training step.

GNMR's precision action is wired in one line per training step::

    lowprec.set_high_precision(model, optstab.recovery_mask(opt_state))

A layer is switched by every mask entry whose unit name *overlaps* the layer's path:
the names are equal, or one is a '/'-prefix of the other. So per-leaf GNMR units
(``"blocks/0/up/kernel"``), per-layer units (``"blocks/0/up"``) and per-block units
(``"blocks/0"``) all drive the right layers. Unit names are those GNMR gives the
model's ``nnx.Param`` state (the layer's attribute path joined with '/').

Wiring GNMR to the quantized layers takes one line each way (extensions of ours, not
the GNMR paper's): :func:`recoverable_units` is a units spec that puts each quantized
layer's parameters in one unit named by the layer's path and leaves every other
parameter (norms, embeddings, positions: they have no low-precision path, so precision
recovery cannot help them) out of all units; :func:`amax_signal` gives, per quantized
layer, the amax its next input scale will be computed from (the newest input amax, or
under delayed scaling the largest in the amax history), the forward signal that shows an
activation-outlier burst, and the scale lag after it, before the gradient does::

    tx = optax.chain(optstab.gnmr(signal="external", units=lowprec.recoverable_units(model),
                                  action=("precision",)), optax.adamw(1e-3))
    ...  # in the step, after the forward/backward pass:
    optimizer.update(model, grads, unit_signal=lowprec.amax_signal(model))

A layer *has a low-precision path* when it holds a :class:`HighPrecision` switch in an
attribute named ``high_precision`` (as :class:`QuantLinear` does); :func:`quant_layers`,
:func:`set_high_precision` and :func:`recoverable_units` find every such layer, and
:func:`amax_signal` reads its :class:`QuantState` named ``input_amax``.

Bookkeeping that is not trained lives in :class:`QuantState` variables: the input amax
of the last call (:func:`input_amax`), the amax history of delayed scaling and the PRNG
key of stochastic rounding (split on each call, so the same key gives the same bits).
In a functional training step, split the model with ``nnx.split(model, nnx.Param, ...)``
and carry the rest of the state (``QuantState`` and ``HighPrecision``) alongside the
parameters.

Design choices (ours): the kernel is scaled per tensor with current scaling, or per
``block_size x block_size`` block under ``scaling="fine_grained"``; the bias is added in
float32; a layer in high precision still records its input amax, so a delayed scale is
current when the layer drops back to low precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from optstab.lowprec import scaling as q
from optstab.lowprec import stress
from optstab.tree import leaf_names

DEFAULT_CONFIG = q.QuantConfig()
SUPPORTED_LINEAR_OPTIONS = frozenset(
    {"use_bias", "param_dtype", "kernel_init", "bias_init", "kernel_metadata", "bias_metadata"}
)


class QuantState(nnx.Variable):
    """Untrained low-precision bookkeeping: input amax, amax history, rounding key."""


class HighPrecision(nnx.Variable):
    """Traced bool: while true, the layer runs unquantized (float32)."""


class QuantLinear(nnx.Linear):
    """``nnx.Linear`` with fake-quantized matmul inputs and a traced precision switch.

    Args:
      in_features, out_features: as ``nnx.Linear``.
      config: a :class:`~optstab.lowprec.scaling.QuantConfig` (static).
      rngs: ``nnx.Rngs``; stochastic rounding draws its key from the ``"quant"``
        stream if present, else from ``"params"``.
      **kwargs: passed to ``nnx.Linear``: ``use_bias``, ``param_dtype``, the
        initialisers and their metadata. Options that change how the matmul is
        computed (``dtype``, ``precision``, ``dot_general``, ...) raise ``ValueError``:
        the layer computes in float32 at ``Precision.HIGHEST`` and returns the
        result type of its input and kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optstab import lowprec
      >>> layer = lowprec.QuantLinear(4, 2, config=lowprec.quant_config("int8"),
      ...                             rngs=nnx.Rngs(0))
      >>> x = jnp.array([[1e-3, 1.0, -2.0, 50.0]])
      >>> low = layer(x)
      >>> lowprec.set_high_precision(layer, {"": jnp.array(True)})
      >>> bool(jnp.allclose(low, layer(x)))  # 1e-3 is below int8's step here
      False
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        config: q.QuantConfig = DEFAULT_CONFIG,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        unsupported = sorted(set(kwargs) - SUPPORTED_LINEAR_OPTIONS)
        if unsupported:
            raise ValueError(
                f"QuantLinear does not support {unsupported}: it computes in float32 with "
                f"its own quantized matmul; supported options: {sorted(SUPPORTED_LINEAR_OPTIONS)}"
            )
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        config = q.quant_config(*config)
        self.config = config
        self.high_precision = HighPrecision(jnp.array(False))
        self.input_amax = QuantState(jnp.zeros((), jnp.float32))  # of the last call
        if config.scale_mode == "delayed":
            self.amax_history = QuantState(jnp.zeros((config.history,), jnp.float32))
        if config.rounding == "stochastic":
            stream = rngs["quant"] if "quant" in rngs else rngs["params"]
            self.rounding_key = QuantState(stream())

    def _next_keys(self) -> tuple[Any, Any, Any]:
        if self.config.rounding != "stochastic":
            return None, None, None
        key, k_input, k_kernel, k_cotangent = jax.random.split(self.rounding_key.get_value(), 4)
        self.rounding_key.set_value(key)
        return k_input, k_kernel, k_cotangent

    def _input_scale(self, x: jax.Array) -> jax.Array:
        config = self.config
        current = q.amax(x, config.scaling, config.block_size)
        self.input_amax.set_value(jax.lax.stop_gradient(jnp.max(current)))
        if config.scale_mode == "current":
            return q.scale_from_amax(current, config.fmt)
        history = self.amax_history.get_value()
        scale = q.scale_from_amax(q.delayed_amax(history, current), config.fmt)
        self.amax_history.set_value(q.push_history(history, jax.lax.stop_gradient(current)))
        return scale

    def _quantize_input(self, x: jax.Array, key: Any) -> jax.Array:
        config = self.config
        return q.fake_quant(x, self._input_scale(x), config.fmt, config.rounding, key)

    def __call__(self, inputs: jax.Array, outliers: jax.Array | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(..., in_features)``.
          outliers: stress tooling for benchmarks, not a training feature: optional
            ``(in_features,)`` per-channel multipliers that only the input quantizer
            sees (:func:`optstab.lowprec.stress.through_quantizer`); leave it ``None``.
        """
        config = self.config
        exact = self.high_precision.get_value()
        if jnp.ndim(exact) != 0:
            raise ValueError(
                f"the high-precision switch has shape {jnp.shape(exact)}; a batched mask "
                "(e.g. from vmapped optimizer states) must be applied inside jax.vmap"
            )
        stress.check_outliers(outliers, self.in_features)
        k_input, k_kernel, k_cotangent = self._next_keys()
        kernel = self.kernel.get_value()
        x = jnp.asarray(inputs, jnp.float32)
        w = jnp.asarray(kernel, jnp.float32)
        x_low = stress.through_quantizer(x, outliers, lambda v: self._quantize_input(v, k_input))
        w_scale = q.scale_from_amax(q.weight_amax(w, config.scaling, config.block_size), config.fmt)
        w_low = q.fake_quant(w, w_scale, config.fmt, config.rounding, k_kernel)
        x = jnp.where(exact, x, x_low)
        w = jnp.where(exact, w, w_low)
        y = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
        if config.backward_fmt is not None:
            y = q.quantize_cotangent(
                y,
                config.backward_fmt,
                config.scaling,
                config.rounding,
                k_cotangent,
                exact,
                config.block_size,
            )
        if self.bias is not None:
            y = y + jnp.asarray(self.bias.get_value(), jnp.float32)
        return y.astype(jnp.result_type(inputs, kernel))


def has_low_precision_path(node: Any) -> bool:
    """Whether ``node`` is a layer with a low-precision path: an NNX module holding a
    :class:`HighPrecision` switch named ``high_precision`` (e.g. a :class:`QuantLinear`)."""
    return isinstance(node, nnx.Module) and isinstance(
        getattr(node, "high_precision", None), HighPrecision
    )


def quant_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """``(path, layer)`` for every layer of ``model`` with a low-precision path (every
    :class:`QuantLinear`), in graph order; paths are '/'-joined attribute paths."""
    for path, node in nnx.iter_graph(model):
        if has_low_precision_path(node):
            yield "/".join(str(part) for part in path), node


def _overlaps(unit: str, path: str) -> bool:
    if not unit or not path or unit == path:
        return True
    return unit.startswith(path + "/") or path.startswith(unit + "/")


def set_high_precision(
    model: nnx.Module, mask: Mapping[str, jax.Array], *, strict: bool = True
) -> None:
    """Sets every quantized layer's switch from a ``{unit_name: bool}`` mask.

    Args:
      model: an NNX module containing :class:`QuantLinear` layers.
      mask: e.g. ``optstab.recovery_mask(opt_state)``; values may be traced and may
        carry a batch shape (``vmap`` over seeds).
      strict: raise ``ValueError`` if some layer matches no unit name (a wiring bug:
        that layer could never be recovered).
    """
    for path, layer in quant_layers(model):
        flags = [jnp.asarray(flag, bool) for unit, flag in mask.items() if _overlaps(unit, path)]
        if not flags and strict:
            raise ValueError(
                f"no unit name in the mask covers layer {path!r}; mask has {sorted(mask)}"
            )
        value = jnp.array(False)
        for flag in flags:
            value = value | flag
        layer.high_precision.set_value(value)


def _recorded_amax(path: str, layer: nnx.Module) -> jax.Array:
    recorded = getattr(layer, "input_amax", None)
    if not isinstance(recorded, QuantState):
        raise ValueError(f"layer {path!r} keeps no input_amax QuantState to read")
    return recorded.get_value()


def input_amax(model: nnx.Module) -> dict[str, jax.Array]:
    """``{layer_path: amax}``: each quantized layer's input amax in the latest forward pass.

    The largest magnitude the layer's input quantizer saw on its last call (float32
    scalar, no gradient; under fine-grained scaling the largest over its tiles), recorded
    in the layer's ``input_amax`` :class:`QuantState` by the forward pass itself. A
    non-finite amax is kept here (a delayed-scaling history records it as 0). A layer in
    high precision records it too. Before the first call it is 0.

    Raises:
      ValueError: when a quantized layer keeps no ``input_amax`` state.
    """
    return {path: _recorded_amax(path, layer) for path, layer in quant_layers(model)}


def amax_signal(model: nnx.Module) -> dict[str, jax.Array]:
    """``{layer_path: amax}``: the amax each quantized layer's next input scale comes from.

    The forward signal for GNMR's precision action (``gnmr(signal="external")`` with
    ``update(..., unit_signal=amax_signal(model))``). What a low-precision layer risks
    under activation outliers is a scale set by a few huge values, which crushes every
    other value onto a few grid points; what recovery removes is that scale, for the
    forward passes it covers. So the signal is the amax from which the *next* forward
    pass's scale is computed, read after this pass:

    * current scaling (any granularity): the newest input amax (:func:`input_amax`), the
      best guess of the next one;
    * delayed scaling: ``max(input amax, max(amax history))``, the largest amax of the
      history the next scale reads (this pass's amax included). When a burst of outliers
      ends, the newest amax falls at once, but the history keeps the outliers' amax, and
      the crushing scale, for ``history`` more calls. This signal stays raised exactly as
      long, so a GNMR lock held while the signal is raised covers the lag too; the newest
      amax would release the layer while its scale is still crushed.

    A non-finite input amax makes the signal non-finite (an overflow is a risk, which
    GNMR ranks first), although the history does not record it. Float32 scalars without
    gradient, traced and jit-safe: read them right after the forward (or
    ``nnx.value_and_grad``) pass inside the same ``nnx.jit`` step. A layer in high
    precision keeps recording, so the signal shows the risk it would run if it dropped
    back. Before the first call it is 0.

    The keys are the layer paths that :func:`recoverable_units` uses as unit names, so
    the dict is GNMR's ``unit_signal`` for a model wired with those units.

    Raises:
      ValueError: when a quantized layer keeps no ``input_amax`` state.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optstab import lowprec
      >>> config = lowprec.quant_config("int8", scale_mode="delayed", history=2)
      >>> layer = lowprec.QuantLinear(2, 1, config=config, rngs=nnx.Rngs(0))
      >>> for peak in (5.0, 1.0, 1.0):  # a burst, then two quiet calls
      ...     _ = layer(jnp.array([[peak, -0.5]]))
      ...     print(float(lowprec.input_amax(layer)[""]), float(lowprec.amax_signal(layer)[""]))
      5.0 5.0
      1.0 5.0
      1.0 1.0
    """
    signal = {}
    for path, layer in quant_layers(model):
        value = _recorded_amax(path, layer)
        history = getattr(layer, "amax_history", None)
        if isinstance(history, QuantState):
            value = jnp.maximum(value, jnp.max(history.get_value()))
        signal[path] = value
    return signal


def recoverable_units(model: nnx.Module) -> Callable[[Any], Any]:
    """GNMR units of ``model``: one unit per quantized layer, nothing else watched.

    Returns a units spec (a callable ``params -> labels``, like
    :func:`optstab.units.by_regex`) for the model's parameter pytree, as
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands it to ``tx.init`` and
    ``tx.update`` (an ``nnx.State``), or ``nnx.split(model, nnx.Param, ...)`` gives it:
    every leaf of a layer with a low-precision path (:func:`quant_layers`) is labelled
    with that layer's '/'-joined path (``"blocks/0/up"``, the name
    :func:`set_high_precision` matches and :func:`amax_signal` uses as its key), and
    every other leaf (norms, embeddings, positions, a float32 head) with ``None``: it
    belongs to no unit, is not watched and passes through.

    The layer paths are read from ``model`` when this is called (they are static).

    Raises:
      ValueError: when ``model`` has no layer with a low-precision path.

    Example:
      >>> import jax, optstab
      >>> from flax import nnx
      >>> from optstab import lowprec
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.norm = nnx.LayerNorm(4, rngs=rngs)
      ...         self.up = lowprec.QuantLinear(4, 4, rngs=rngs)
      >>> model = Net(nnx.Rngs(0))
      >>> params = nnx.state(model, nnx.Param)
      >>> labels = lowprec.recoverable_units(model)(params)
      >>> optstab.tree.leaf_names(params)
      ['norm/bias', 'norm/scale', 'up/bias', 'up/kernel']
      >>> jax.tree.structure(params).flatten_up_to(labels)
      [None, None, 'up', 'up']
    """
    layers = tuple(path for path, _ in quant_layers(model))
    if not layers:
        raise ValueError("the model has no quantized layer (no layer with a low-precision path)")

    def unit_of(leaf_name: str) -> str | None:
        # "" is a quantized layer at the model's root (the model is the layer).
        owners = [p for p in layers if p == "" or leaf_name.startswith(p + "/")]
        return max(owners, key=len) if owners else None

    def labels(params: Any) -> Any:
        names = iter(leaf_names(params))
        return jax.tree.map(lambda _: unit_of(next(names)), params)

    return labels


def high_precision_flags(model: nnx.Module) -> dict[str, jax.Array]:
    """``{layer_path: bool}``: the current switch of every quantized layer."""
    return {path: layer.high_precision.get_value() for path, layer in quant_layers(model)}
