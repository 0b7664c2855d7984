"""Scaled fake quantization: per-tensor, per-token or fine-grained scales, current or delayed.

A tensor ``x`` is stored in a narrow format as ``round(x / s) * s``: the scale ``s``
maps the tensor's absolute maximum (its *amax*) onto the format's largest value, so
the whole range of the format is used. We simulate this in float32 ("fake
quantization"); no narrow dtype is stored and the matmul itself runs in float32, as
on hardware that accumulates FP8 or int8 products in float32.

* Scaling granularity: ``"per_tensor"`` (one scale) or ``"per_token"`` (one scale per
  row, i.e. per index of all leading axes, the amax taken over the last axis), or
  ``"fine_grained"``, the recipe of DeepSeek-V3 (arXiv 2412.19437, section 3.3.1): one
  scale per ``1 x block_size`` tile of the activations (per token and per group of
  ``block_size`` channels; the last tile may be shorter) and one per
  ``block_size x block_size`` block of a weight matrix (:func:`weight_amax`), so an
  outlier only coarsens its own tile. ``block_size`` is 128 in that recipe.
* Scale source: ``"current"`` (the amax of this very tensor, computed where it is
  quantized; the default, and what fine-grained recipes use) or ``"delayed"`` (the
  largest amax in a history of the last ``history`` calls, as in FP8 recipes with an
  amax history; the history is state that the caller carries, see
  :mod:`optstab.lowprec.layers`). Delayed scaling lags: a burst of large values
  saturates on its first call, and the inflated scale outlives the burst by up to
  ``history`` calls. With an empty (all-zero) history the current amax is used.
  Delayed scaling is per-tensor only (rows and tiles change from call to call).
* A zero or non-finite amax gives scale 1; a non-finite amax is not recorded in a
  delayed-scaling history (it would freeze the scale for ``history`` calls).
* Finite out-of-range values saturate at the format's largest value (see
  :mod:`optstab.lowprec.formats` for why we saturate rather than produce NaN).
  Non-finite values (NaN, +-inf, in values or cotangents) pass through unchanged:
  fake quantization never hides an overflow that happened upstream.
* Gradients: :func:`fake_quant` is straight-through (the identity VJP), as in
  quantization-aware training. :func:`quantize_cotangent` is the identity on values
  and quantizes the cotangent instead (current scaling only), to simulate a
  low-precision backward pass.

These choices (saturation, straight-through gradients, the empty-history rule,
per-tensor weights outside the fine-grained recipe) are ours; they follow common FP8
and int8 training recipes but no particular paper. The fine-grained tiles and blocks
follow DeepSeek-V3's description; their simulation in float32 (no FP8 GEMM, no
promotion of partial sums) is ours.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optstab.lowprec import formats

SCALINGS = ("per_tensor", "per_token", "fine_grained")
SCALE_MODES = ("current", "delayed")


class QuantConfig(NamedTuple):
    """Static options of a fake-quantized matmul (hashable; build with :func:`quant_config`).

    Attributes:
      fmt: format of the activations and weights (the matmul inputs).
      scaling: ``"per_tensor"`` or ``"per_token"`` for the activations, weights scaled
        per tensor; or ``"fine_grained"``: ``1 x block_size`` activation tiles and
        ``block_size x block_size`` weight blocks, each with its own scale.
      scale_mode: ``"current"`` or ``"delayed"`` (activations; weights use current).
      rounding: ``"nearest"`` or ``"stochastic"``.
      history: amax history length for delayed scaling.
      backward_fmt: format of the output cotangent (current scaling, same granularity
        as ``scaling`` for activations), or ``None`` to keep the backward pass in float32.
      block_size: tile and block width of ``"fine_grained"`` scaling (unused otherwise).
    """

    fmt: str = "float8_e4m3"
    scaling: str = "per_tensor"
    scale_mode: str = "current"
    rounding: str = "nearest"
    history: int = 16
    backward_fmt: str | None = None
    block_size: int = 128


def check_scaling(scaling: str) -> None:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")


def quant_config(
    fmt: str = "float8_e4m3",
    scaling: str = "per_tensor",
    scale_mode: str = "current",
    rounding: str = "nearest",
    history: int = 16,
    backward_fmt: str | None = None,
    block_size: int = 128,
) -> QuantConfig:
    """Validates the options; raises ``ValueError`` naming the bad one.

    Recipes: ``quant_config("float8_e4m3")`` is per-tensor current scaling;
    ``scale_mode="delayed"`` takes the activation scale from an amax history;
    ``quant_config("float8_e4m3", scaling="fine_grained")`` is DeepSeek-V3's 1x128 /
    128x128 fine-grained current scaling.

    Example:
      >>> from optstab import lowprec
      >>> lowprec.quant_config("int8", scaling="fine_grained", block_size=64).block_size
      64
    """
    formats.get_format(fmt)
    if backward_fmt is not None:
        formats.get_format(backward_fmt)
    formats.check_rounding(rounding)
    check_scaling(scaling)
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if scale_mode == "delayed" and scaling != "per_tensor":
        raise ValueError("scale_mode='delayed' needs scaling='per_tensor'")
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"history must be a static int >= 1, got {history!r}")
    check_block_size(block_size)
    return QuantConfig(
        fmt, scaling, scale_mode, rounding, int(history), backward_fmt, int(block_size)
    )


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a static int >= 1, got {block_size!r}")


def amax(x: jax.Array, scaling: str = "per_tensor", block_size: int = 128) -> jax.Array:
    """float32 absolute maximum, broadcastable against ``x``.

    A scalar (``"per_tensor"``); per row, the last axis kept with size 1
    (``"per_token"``); or, for ``"fine_grained"``, the amax of each element's
    ``1 x block_size`` tile along the last axis, repeated over the tile (shape of ``x``;
    :func:`tile_amax` gives one value per tile).
    """
    check_scaling(scaling)
    magnitude = jnp.abs(jnp.asarray(x, jnp.float32))
    if scaling == "per_tensor":
        return jnp.max(magnitude)
    if scaling == "per_token":
        return jnp.max(magnitude, axis=-1, keepdims=True)
    tiles = tile_amax(magnitude, block_size)
    return jnp.repeat(tiles, block_size, axis=-1)[..., : magnitude.shape[-1]]


def _pad_to_blocks(x: jax.Array, block_size: int, axes: tuple[int, ...]) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    for axis in axes:
        widths[axis] = (0, -x.shape[axis] % block_size)
    return jnp.pad(x, widths)  # zeros never raise an amax


def tile_amax(x: jax.Array, block_size: int = 128) -> jax.Array:
    """float32 amax of each ``1 x block_size`` tile of the last axis: ``(..., tiles)``
    with ``tiles = ceil(channels / block_size)`` (the last tile may be shorter)."""
    check_block_size(block_size)
    magnitude = _pad_to_blocks(jnp.abs(jnp.asarray(x, jnp.float32)), block_size, (-1,))
    shape = (*magnitude.shape[:-1], magnitude.shape[-1] // block_size, block_size)
    return jnp.max(magnitude.reshape(shape), axis=-1)


def block_amax(w: jax.Array, block_size: int = 128) -> jax.Array:
    """float32 amax of each ``block_size x block_size`` block of a 2-D ``w``:
    ``(ceil(rows / block_size), ceil(cols / block_size))``."""
    check_block_size(block_size)
    if jnp.ndim(w) != 2:
        raise ValueError(f"block scaling needs a 2-D weight, got shape {jnp.shape(w)}")
    magnitude = _pad_to_blocks(jnp.abs(jnp.asarray(w, jnp.float32)), block_size, (0, 1))
    rows, cols = magnitude.shape[0] // block_size, magnitude.shape[1] // block_size
    return jnp.max(magnitude.reshape(rows, block_size, cols, block_size), axis=(1, 3))


def weight_amax(w: jax.Array, scaling: str = "per_tensor", block_size: int = 128) -> jax.Array:
    """float32 amax of a 2-D weight for the recipe ``scaling``, broadcastable against it.

    One amax for the whole tensor, except under ``"fine_grained"``, where each element
    gets the amax of its ``block_size x block_size`` block (:func:`block_amax`).
    """
    check_scaling(scaling)
    if scaling != "fine_grained":
        return amax(w)
    blocks = block_amax(w, block_size)
    rows = jnp.repeat(blocks, block_size, axis=0)[: w.shape[0]]
    return jnp.repeat(rows, block_size, axis=1)[:, : w.shape[1]]


def scale_from_amax(amax_value: jax.Array, fmt: str | formats.Format) -> jax.Array:
    """``amax / max_value`` of the format; 1 where that is not a finite normal float32
    (amax zero, tiny enough to flush to zero, or not finite)."""
    spec = formats.get_format(fmt)
    scale = jnp.asarray(amax_value, jnp.float32) / spec.max_value
    usable = jnp.isfinite(scale) & (scale >= jnp.finfo(jnp.float32).tiny)
    return jnp.where(usable, scale, 1.0).astype(jnp.float32)


def delayed_amax(history: jax.Array, current: jax.Array) -> jax.Array:
    """The amax delayed scaling uses: the history's maximum, or ``current`` if it is empty."""
    past = jnp.max(history)
    return jnp.where(past > 0, past, current)


def push_history(history: jax.Array, value: jax.Array) -> jax.Array:
    """The history with ``value`` as its newest entry (the oldest one drops out).

    A non-finite value is recorded as 0 (an empty entry), so one overflowed step
    cannot freeze the scale for the whole history.
    """
    value = jnp.reshape(value, (1,)).astype(history.dtype)
    value = jnp.where(jnp.isfinite(value), value, 0)
    return jnp.concatenate([value, history[:-1]])


def quantize(
    x: jax.Array,
    scale: jax.Array,
    fmt: str | formats.Format = "float8_e4m3",
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """``round(x / scale) * scale`` on the format's grid, in ``x``'s dtype (no gradient rule).

    Example:
      >>> import jax.numpy as jnp
      >>> from optstab.lowprec import quantize
      >>> x = jnp.array([0.01, 1.0, 100.0])
      >>> quantize(x, jnp.float32(100.0 / 127), "int8").tolist()  # 0.01 is below one step
      [0.0, 0.787401..., 100.0]
    """
    scale = jnp.asarray(scale, jnp.float32)
    x32 = jnp.asarray(x, jnp.float32)
    rounded = formats.round_to_format(x32 / scale, fmt, rounding, key) * scale
    return jnp.where(jnp.isfinite(x32), rounded, x32).astype(jnp.asarray(x).dtype)


def fake_quant(
    x: jax.Array,
    scale: jax.Array,
    fmt: str | formats.Format = "float8_e4m3",
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """:func:`quantize` with a straight-through gradient (the VJP is the identity)."""
    return _straight_through(x, quantize(x, scale, fmt, rounding, key))


@jax.custom_vjp
def _straight_through(x, quantized):
    return quantized


def _straight_through_fwd(x, quantized):
    return quantized, None


def _straight_through_bwd(_, cotangent):
    return cotangent, None


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


class _CotangentSpec(NamedTuple):
    fmt: str
    scaling: str
    rounding: str
    block_size: int


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _quantize_cotangent(x, key, skip, spec):
    return x


def _quantize_cotangent_fwd(x, key, skip, spec):
    return x, (key, skip)


def _quantize_cotangent_bwd(spec, residuals, cotangent):
    key, skip = residuals
    scale = scale_from_amax(amax(cotangent, spec.scaling, spec.block_size), spec.fmt)
    quantized = quantize(cotangent, scale, spec.fmt, spec.rounding, key)
    return jnp.where(skip, cotangent, quantized), None, None


_quantize_cotangent.defvjp(_quantize_cotangent_fwd, _quantize_cotangent_bwd)


def quantize_cotangent(
    x: jax.Array,
    fmt: str = "float8_e5m2",
    scaling: str = "per_tensor",
    rounding: str = "nearest",
    key: jax.Array | None = None,
    skip: jax.Array | bool = False,
    block_size: int = 128,
) -> jax.Array:
    """Identity on values; the cotangent flowing back through ``x`` is quantized.

    Args:
      x: any float array.
      fmt, scaling, rounding: as in :class:`QuantConfig` (current scaling;
        ``"fine_grained"`` uses ``1 x block_size`` tiles of the cotangent's last axis).
      key: PRNG key, required for stochastic rounding.
      skip: traced bool; where true the cotangent passes unchanged (high precision).
      block_size: tile width of ``"fine_grained"`` scaling.
    """
    formats.get_format(fmt)
    formats.check_rounding(rounding)
    check_scaling(scaling)
    check_block_size(block_size)
    if rounding == "stochastic" and key is None:
        raise ValueError("key is required for rounding='stochastic'")
    if key is None:
        key = jax.random.key(0)  # unused by nearest rounding
    spec = _CotangentSpec(fmt, scaling, rounding, block_size)
    return _quantize_cotangent(x, key, jnp.asarray(skip, bool), spec)
