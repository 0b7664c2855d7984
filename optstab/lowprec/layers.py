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

Bookkeeping that is not trained lives in :class:`QuantState` variables: the input amax
of the last call (:func:`input_amax`), the amax history of delayed scaling and the PRNG
key of stochastic rounding (split on each call, so the same key gives the same bits).
In a functional training step, split the model with ``nnx.split(model, nnx.Param, ...)``
and carry the rest of the state (``QuantState`` and ``HighPrecision``) alongside the
parameters.

Design choices (ours): the kernel is always scaled per tensor with current scaling;
the bias is added in float32; a layer in high precision still records its input
amax, so a delayed scale is current when the layer drops back to low precision.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from optstab.lowprec import scaling as q

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
        current = q.amax(x, self.config.scaling)
        self.input_amax.set_value(jax.lax.stop_gradient(jnp.max(current)))
        if self.config.scale_mode == "current":
            return q.scale_from_amax(current, self.config.fmt)
        history = self.amax_history.get_value()
        scale = q.scale_from_amax(q.delayed_amax(history, current), self.config.fmt)
        self.amax_history.set_value(q.push_history(history, jax.lax.stop_gradient(current)))
        return scale

    def __call__(self, inputs: jax.Array, outliers: jax.Array | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(..., in_features)``.
          outliers: optional ``(in_features,)`` per-channel multipliers ``a`` for stress
            tests: the quantizer sees ``x * a`` and the matmul uses ``Q(x * a) / a``, so
            in exact arithmetic (and in high precision) the layer is unchanged and only
            the format feels the outliers, as with the massive activations of large
            LMs, which the following weights absorb.
        """
        config = self.config
        exact = self.high_precision.get_value()
        if jnp.ndim(exact) != 0:
            raise ValueError(
                f"the high-precision switch has shape {jnp.shape(exact)}; a batched mask "
                "(e.g. from vmapped optimizer states) must be applied inside jax.vmap"
            )
        if outliers is not None and jnp.shape(outliers) != (self.in_features,):
            raise ValueError(
                f"outliers must have shape ({self.in_features},), got {jnp.shape(outliers)}"
            )
        k_input, k_kernel, k_cotangent = self._next_keys()
        kernel = self.kernel.get_value()
        x = jnp.asarray(inputs, jnp.float32)
        w = jnp.asarray(kernel, jnp.float32)
        if outliers is None:
            x_seen = x
        else:
            outliers = jnp.asarray(outliers, jnp.float32)
            x_seen = x * outliers
        x_low = q.fake_quant(
            x_seen, self._input_scale(x_seen), config.fmt, config.rounding, k_input
        )
        if outliers is not None:
            x_low = x_low / outliers
        w_scale = q.scale_from_amax(q.amax(w), config.fmt)
        w_low = q.fake_quant(w, w_scale, config.fmt, config.rounding, k_kernel)
        x = jnp.where(exact, x, x_low)
        w = jnp.where(exact, w, w_low)
        y = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
        if config.backward_fmt is not None:
            y = q.quantize_cotangent(
                y, config.backward_fmt, config.scaling, config.rounding, k_cotangent, exact
            )
        if self.bias is not None:
            y = y + jnp.asarray(self.bias.get_value(), jnp.float32)
        return y.astype(jnp.result_type(inputs, kernel))


def quant_layers(model: nnx.Module) -> Iterator[tuple[str, QuantLinear]]:
    """``(path, layer)`` for every :class:`QuantLinear` in ``model`` ('/'-joined paths)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QuantLinear):
            yield "/".join(str(part) for part in path), node


def _overlaps(unit: str, path: str) -> bool:
    if not unit or not path or unit == path:
        return True
    return unit.startswith(path + "/") or path.startswith(unit + "/")


def set_high_precision(
    model: nnx.Module, mask: Mapping[str, jax.Array], *, strict: bool = True
) -> None:
    """Sets every :class:`QuantLinear`'s switch from a ``{unit_name: bool}`` mask.

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


def input_amax(model: nnx.Module) -> dict[str, jax.Array]:
    """``{layer_path: amax}``: the largest input magnitude each :class:`QuantLinear`'s
    quantizer saw on its last call (float32; what an outlier burst moves first)."""
    return {path: layer.input_amax.get_value() for path, layer in quant_layers(model)}


def high_precision_flags(model: nnx.Module) -> dict[str, jax.Array]:
    """``{layer_path: bool}``: the current switch of every :class:`QuantLinear`."""
    return {path: layer.high_precision.get_value() for path, layer in quant_layers(model)}
