"""Stress tooling: activation outliers that only a quantizer sees (benchmarks only).

This module is not a training feature. It exists so that a benchmark can put an
activation-outlier burst in front of a quantizer without changing the function the
model computes: the quantizer sees ``x * a`` for per-channel multipliers ``a`` and the
layer continues with ``Q(x * a) / a``. In exact arithmetic (and whenever the layer runs
in high precision) the layer is unchanged; only the number format feels the outliers,
the way the massive activations of large LMs stress a per-tensor scale that the
following weights would otherwise absorb. The ``lowprec_lm`` study's
``quantizer_outliers`` regime is built on it (see ``benchmarks/lowprec_lm.py``).

:class:`~optstab.lowprec.QuantLinear` takes the multipliers as its optional
``outliers`` call argument and hands them to :func:`through_quantizer`; a model that is
trained for real never passes them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def check_outliers(outliers: jax.Array | None, in_features: int) -> None:
    """Raises ``ValueError`` unless ``outliers`` is ``None`` or has shape ``(in_features,)``."""
    if outliers is not None and jnp.shape(outliers) != (in_features,):
        raise ValueError(f"outliers must have shape ({in_features},), got {jnp.shape(outliers)}")


def through_quantizer(
    x: jax.Array, outliers: jax.Array | None, quantize: Callable[[jax.Array], jax.Array]
) -> jax.Array:
    """``quantize(x * a) / a`` for per-channel multipliers ``a`` (last axis of ``x``).

    Args:
      x: float32 activations ``(..., channels)``.
      outliers: ``(channels,)`` multipliers ``a`` (nonzero), or ``None`` for
        ``quantize(x)``.
      quantize: the quantizer, ``x -> fake-quantized x`` (it records what it sees).

    Returns:
      The activations as the quantizer left them, back on the scale of ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from optstab.lowprec import stress
      >>> crush = lambda v: jnp.where(jnp.abs(v) < 0.5 * jnp.max(jnp.abs(v)), 0.0, v)
      >>> x = jnp.array([[1.0, 2.0]])
      >>> stress.through_quantizer(x, jnp.array([1.0, 100.0]), crush)  # channel 0 crushed
      Array([[0., 2.]], dtype=float32)
    """
    if outliers is None:
        return quantize(x)
    outliers = jnp.asarray(outliers, jnp.float32)
    return quantize(x * outliers) / outliers
