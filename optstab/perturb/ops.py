"""Forward and backward perturbation operators for the perturbed forward-backward SGD lab.

Method: SGD on a composition of N operators whose forward values and backward
cotangents are perturbed (Kong, Zhang and Yuan, "Perturbed forward-backward SGD",
https://arxiv.org/abs/2602.20646). The paper's text and code are not available; the
operators below are our reconstruction of its setting from the abstract.

* :func:`forward` returns ``x + delta`` and passes the cotangent through unchanged
  (straight-through on ``delta``): the backward pass is the exact derivative of the
  perturbed forward computation.
* :func:`backward` returns ``x`` unchanged and adds ``xi`` to the cotangent flowing
  back through it.

Magnitude modes (ours where the paper is silent; ``v`` is ``x`` for :func:`forward`
and the incoming cotangent for :func:`backward`, norms over the whole array):

* ``"absolute"``: ``delta = scale * u / ||u||`` with ``u`` standard Gaussian, so
  ``||delta|| = scale`` exactly.
* ``"relative"``: ``delta = scale * ||v|| * u / ||u||``, so ``||delta|| = scale * ||v||``.
* ``"bias"``: ``delta = -scale * v`` (a systematic shrinkage, no randomness).
* ``"round"``: ``delta = scale * (q(v) - v)`` with ``q`` rounding to a low-precision
  format (``fmt``: float8 e4m3 / e5m2, float4 e2m1; ``rounding``: nearest or
  stochastic; values beyond the format's range saturate). ``scale = 1`` is the plain
  cast; other values blend it, which keeps ``scale`` a continuous knob.

At ``scale == 0`` both operators are exact identities, bit for bit: a ``lax.cond``
returns the input and skips the noise at run time, and when ``scale`` is the Python
number 0 they are not even traced.
The noise is computed in float32 and added in the dtype of ``v``.

Complex values (ours): an element ``a + ib`` is the pair ``(a, b)`` of real
coordinates, so norms are those of ``|z|`` (``||[3+4j]|| = 5``), the random directions
are uniform over the ``2n`` real coordinates, the bias is ``-scale * z`` and rounding
rounds the real and imaginary parts separately. The noise is computed in complex64.
Integer and boolean arrays are rejected.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optstab._checks import check_range, is_concrete_number
from optstab.lowprec import formats

MODES = ("absolute", "relative", "bias", "round")


class PerturbSpec(NamedTuple):
    """Static description of a perturbation (hashable: it is a ``custom_vjp`` static arg)."""

    mode: str = "relative"
    fmt: str = "float8_e4m3"
    rounding: str = "nearest"


def make_spec(mode: str = "relative", fmt: str = "float8_e4m3", rounding: str = "nearest"):
    """Validates a perturbation's static options; raises ``ValueError`` naming the bad one."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    formats.get_format(fmt)
    formats.check_rounding(rounding)
    return PerturbSpec(mode, fmt, rounding)


def perturbation(v: jax.Array, key: jax.Array, scale: jax.Array, spec: PerturbSpec) -> jax.Array:
    """The perturbation ``delta`` for the value ``v`` (shape of ``v``; float32, or
    complex64 for a complex ``v``, whose parts are perturbed as real coordinates)."""
    if jnp.iscomplexobj(v):
        pairs = jnp.stack([jnp.real(v), jnp.imag(v)], axis=-1)
        delta = perturbation(pairs, key, scale, spec)
        return jax.lax.complex(delta[..., 0], delta[..., 1])
    v32 = jnp.asarray(v, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    if spec.mode == "bias":
        return -scale * v32
    if spec.mode == "round":
        rounded = formats.round_to_format(v32, spec.fmt, spec.rounding, key)
        return scale * (rounded - v32)
    u = jax.random.normal(key, v32.shape, jnp.float32)
    direction = u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(jnp.float32).tiny)
    size = scale if spec.mode == "absolute" else scale * jnp.linalg.norm(v32)
    return size * direction


def apply_perturbation(v: jax.Array, key: jax.Array, scale: jax.Array, spec: PerturbSpec):
    """``v + delta`` in ``v``'s dtype, and exactly ``v`` where ``scale == 0``.

    A ``lax.cond`` skips the noise at run time when ``scale`` is 0 (under ``vmap`` it
    becomes a select and both sides are computed; the result is still exactly ``v``).
    """
    if not jnp.issubdtype(jnp.result_type(v), jnp.inexact):
        raise ValueError(f"a perturbed value must be a float or complex array, got {v.dtype}")
    scale = jnp.asarray(scale, jnp.float32)
    compute = jnp.complex64 if jnp.iscomplexobj(v) else jnp.float32

    def perturbed():
        return (v.astype(compute) + perturbation(v, key, scale, spec)).astype(v.dtype)

    return jax.lax.cond(scale == 0, lambda: v, perturbed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _forward(x, key, scale, spec):
    return apply_perturbation(x, key, scale, spec)


def _forward_fwd(x, key, scale, spec):
    return apply_perturbation(x, key, scale, spec), None


def _forward_bwd(spec, _, cotangent):
    return cotangent, None, None


_forward.defvjp(_forward_fwd, _forward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _backward(x, key, scale, spec):
    return x


def _backward_fwd(x, key, scale, spec):
    return x, (key, scale)


def _backward_bwd(spec, residuals, cotangent):
    key, scale = residuals
    return apply_perturbation(cotangent, key, scale, spec), None, None


_backward.defvjp(_backward_fwd, _backward_bwd)


def _perturbation_point(op, x, key, scale, mode, fmt, rounding) -> jax.Array:
    """Validates the options and applies ``op``; a Python 0 ``scale`` is not even traced."""
    check_range("scale", scale, lambda s: s >= 0, ">= 0")
    spec = make_spec(mode, fmt, rounding)
    if is_concrete_number(scale) and scale == 0:
        return x
    return op(x, key, scale, spec)


def forward(
    x: jax.Array,
    key: jax.Array,
    scale: jax.typing.ArrayLike,
    mode: str = "relative",
    *,
    fmt: str = "float8_e4m3",
    rounding: str = "nearest",
) -> jax.Array:
    """Perturbs the value of ``x``; the cotangent passes through unchanged.

    ``forward(x) = x + delta`` with ``delta`` set by ``mode`` (see the module docstring)
    and ``d forward / dx = I`` (straight-through): differentiating a model that calls
    ``forward`` gives the exact gradient of the perturbed forward computation.

    Args:
      x: float or complex array (see the module docstring for complex values).
      key: PRNG key for the random modes (ignored by ``"bias"`` and nearest rounding).
      scale: scalar perturbation size, ``>= 0``; may be a traced array. 0 is an exact
        identity.
      mode: ``"absolute"``, ``"relative"``, ``"bias"`` or ``"round"``.
      fmt: format of the ``"round"`` mode.
      rounding: ``"nearest"`` or ``"stochastic"`` for the ``"round"`` mode.

    Returns:
      The perturbed value, with the dtype and shape of ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from optstab import perturb
      >>> x = jnp.array([3.0, 4.0])
      >>> y = perturb.forward(x, jax.random.key(0), 0.1, mode="relative")
      >>> round(float(jnp.linalg.norm(y - x)), 4)
      0.5
      >>> jax.grad(lambda x: perturb.forward(x, jax.random.key(0), 0.1).sum())(x)
      Array([1., 1.], dtype=float32)
    """
    return _perturbation_point(_forward, x, key, scale, mode, fmt, rounding)


def backward(
    x: jax.Array,
    key: jax.Array,
    scale: jax.typing.ArrayLike,
    mode: str = "relative",
    *,
    fmt: str = "float8_e4m3",
    rounding: str = "nearest",
) -> jax.Array:
    """Returns ``x`` unchanged and perturbs the cotangent that flows back through it.

    The cotangent ``g`` arriving at this point becomes ``g + xi``, with ``xi`` set by
    ``mode`` relative to ``g`` (see the module docstring). Arguments are those of
    :func:`forward`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from optstab import perturb
      >>> f = lambda x: perturb.backward(x, jax.random.key(0), 0.5, mode="bias").sum()
      >>> jax.grad(f)(jnp.array([3.0, 4.0]))
      Array([0.5, 0.5], dtype=float32)
    """
    return _perturbation_point(_backward, x, key, scale, mode, fmt, rounding)
