"""Low-precision training, simulated in float32 ("fake quantization").

* :mod:`~optstab.lowprec.formats`: rounding onto the grids of float8 e4m3 / e5m2,
  float4 e2m1 and int8 (nearest or stochastic, saturating).
* :mod:`~optstab.lowprec.scaling`: scaled quantization (per-tensor, per-token or
  DeepSeek-V3-style fine-grained tiles and blocks; current or delayed scaling) with
  straight-through gradients, and cotangent quantization for the backward pass.
* :mod:`~optstab.lowprec.layers`: :class:`QuantLinear`, an ``nnx.Linear`` with a traced
  per-layer precision switch driven by :func:`optstab.recovery_mask` through
  :func:`set_high_precision`; :func:`recoverable_units` and :func:`amax_signal` wire
  GNMR's units and forward signal to a model's quantized layers.
* :mod:`~optstab.lowprec.stress`: stress tooling for benchmarks (outliers that only a
  quantizer sees); not a training feature.
"""

from optstab.lowprec import stress
from optstab.lowprec.formats import FORMATS, FloatFormat, IntFormat, round_to_format
from optstab.lowprec.layers import (
    HighPrecision,
    QuantLinear,
    QuantState,
    amax_signal,
    has_low_precision_path,
    high_precision_flags,
    input_amax,
    quant_layers,
    recoverable_units,
    set_high_precision,
)
from optstab.lowprec.scaling import (
    QuantConfig,
    amax,
    block_amax,
    fake_quant,
    quant_config,
    quantize,
    quantize_cotangent,
    scale_from_amax,
    tile_amax,
    weight_amax,
)

__all__ = [
    "FORMATS",
    "FloatFormat",
    "HighPrecision",
    "IntFormat",
    "QuantConfig",
    "QuantLinear",
    "QuantState",
    "amax",
    "amax_signal",
    "block_amax",
    "fake_quant",
    "has_low_precision_path",
    "high_precision_flags",
    "input_amax",
    "quant_config",
    "quant_layers",
    "quantize",
    "quantize_cotangent",
    "recoverable_units",
    "round_to_format",
    "scale_from_amax",
    "set_high_precision",
    "stress",
    "tile_amax",
    "weight_amax",
]
