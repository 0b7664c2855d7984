"""Low-precision training, simulated in float32 ("fake quantization").

* :mod:`~optstab.lowprec.formats`: rounding onto the grids of float8 e4m3 / e5m2,
  float4 e2m1 and int8 (nearest or stochastic, saturating).
* :mod:`~optstab.lowprec.scaling`: scaled quantization (per-tensor or per-token,
  current or delayed scaling) with straight-through gradients, and cotangent
  quantization for the backward pass.
* :mod:`~optstab.lowprec.layers`: :class:`QuantLinear`, an ``nnx.Linear`` with a traced
  per-layer precision switch driven by :func:`optstab.recovery_mask` through
  :func:`set_high_precision`.
"""

from optstab.lowprec.formats import FORMATS, FloatFormat, IntFormat, round_to_format
from optstab.lowprec.layers import (
    HighPrecision,
    QuantLinear,
    QuantState,
    high_precision_flags,
    input_amax,
    quant_layers,
    set_high_precision,
)
from optstab.lowprec.scaling import (
    QuantConfig,
    amax,
    fake_quant,
    quant_config,
    quantize,
    quantize_cotangent,
    scale_from_amax,
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
    "fake_quant",
    "high_precision_flags",
    "input_amax",
    "quant_config",
    "quant_layers",
    "quantize",
    "quantize_cotangent",
    "round_to_format",
    "scale_from_amax",
    "set_high_precision",
]
