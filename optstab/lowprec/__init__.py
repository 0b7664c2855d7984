"""Low-precision number formats, simulated in float32 ("fake quantization").

Only the rounding kernel lives here so far (:func:`round_to_format`); the perturbation
lab (:mod:`optstab.perturb`) uses it for its low-precision rounding mode.
"""

from optstab.lowprec.formats import FORMATS, FloatFormat, round_to_format

__all__ = ["FORMATS", "FloatFormat", "round_to_format"]
