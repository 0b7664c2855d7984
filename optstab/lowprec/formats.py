"""Rounding to small number formats (float8 e4m3 / e5m2, float4 e2m1, int8) in float32.

A value is rounded to the nearest number representable in the format (ties to even),
or stochastically to one of its two neighbours with probabilities that make the result
unbiased. The result is returned in float32 (fake quantization): the format's grid is
simulated, no narrow dtype is stored.

The grid spacing at ``x`` is ``2 ** (max(e, e_min) - mantissa_bits)`` with ``e`` the
binary exponent of ``|x|`` (``2 ** e <= |x| < 2 ** (e + 1)``) and ``e_min`` the smallest
normal exponent, so subnormals are handled by the same formula. Rounding on this grid
is exact in float32 for these formats.

``int8`` is the symmetric integer grid ``-127 .. 127`` (spacing 1; -128 is not used,
so the grid is symmetric as in common int8 recipes).

Out-of-range values saturate. A value beyond the format's largest finite number maps
to that number (with its sign), and infinities map to it too; NaN stays NaN. This is
our choice: casting with ``ml_dtypes`` would turn an out-of-range e4m3 value into NaN
(e4m3fn has no infinity), whereas hardware FP8 matmuls usually saturate.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class FloatFormat(NamedTuple):
    """A binary floating-point format without infinities (we saturate instead)."""

    name: str
    mantissa_bits: int  # explicit fraction bits
    min_exponent: int  # exponent of the smallest normal number
    max_value: float  # largest finite value


class IntFormat(NamedTuple):
    """A symmetric integer format: the integers in ``[-max_value, max_value]``."""

    name: str
    max_value: float  # largest integer, 2 ** (bits - 1) - 1


Format = FloatFormat | IntFormat

FORMATS: dict[str, Format] = {
    "float8_e4m3": FloatFormat("float8_e4m3", 3, -6, 448.0),
    "float8_e5m2": FloatFormat("float8_e5m2", 2, -14, 57344.0),
    "float4_e2m1": FloatFormat("float4_e2m1", 1, 0, 6.0),
    "int8": IntFormat("int8", 127.0),
}

ROUNDINGS = ("nearest", "stochastic")


def get_format(fmt: str | Format) -> Format:
    """Looks a format up by name; raises ``ValueError`` for an unknown one."""
    if isinstance(fmt, FloatFormat | IntFormat):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def grid_spacing(x: jax.Array, fmt: Format) -> jax.Array:
    """Distance between the two representable neighbours of each element of ``x``."""
    if isinstance(fmt, IntFormat):
        return jnp.ones_like(x)
    _, e = jnp.frexp(jnp.abs(x))  # |x| = m * 2**e with m in [0.5, 1)
    exponent = jnp.maximum(e - 1, fmt.min_exponent)
    return jnp.ldexp(jnp.ones_like(x), exponent - fmt.mantissa_bits)


def round_to_format(
    x: jax.Array,
    fmt: str | Format = "float8_e4m3",
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Rounds ``x`` onto the grid of ``fmt``; returns float32.

    Args:
      x: any float array.
      fmt: ``"float8_e4m3"`` (max 448), ``"float8_e5m2"`` (max 57344), ``"float4_e2m1"``
        (max 6), ``"int8"`` (max 127), or a :class:`FloatFormat` / :class:`IntFormat`.
      rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (up with probability
        equal to the distance from the lower neighbour over the grid spacing).
      key: PRNG key, required for stochastic rounding.

    Returns:
      float32 array of the shape of ``x``; out-of-range values saturate at the
      format's largest finite value, NaN stays NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from optstab.lowprec import round_to_format
      >>> round_to_format(jnp.array([0.3, 3.3, 500.0]), "float8_e4m3").tolist()
      [0.3125, 3.25, 448.0]
    """
    spec = get_format(fmt)
    check_rounding(rounding)
    x = jnp.clip(jnp.asarray(x, jnp.float32), -spec.max_value, spec.max_value)
    step = grid_spacing(x, spec)
    if rounding == "nearest":
        rounded = jnp.round(x / step) * step
    else:
        if key is None:
            raise ValueError("key is required for rounding='stochastic'")
        lower = jnp.floor(x / step) * step
        up = jax.random.uniform(key, x.shape) < (x - lower) / step
        rounded = jnp.where(up, lower + step, lower)
    return jnp.clip(rounded, -spec.max_value, spec.max_value)
