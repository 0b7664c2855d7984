"""PRNG-key handling shared by every transform that keeps a key in its state."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_key(key: jax.Array | int) -> jax.Array:
    """A typed PRNG key from an int seed, a raw ``uint32[2]`` key or a typed key.

    The seed may also be a scalar integer array (``optax.inject_hyperparams`` turns an
    int ``key`` argument into one).
    """
    if isinstance(key, int):
        return jax.random.key(key)
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.ndim == 0 and jnp.issubdtype(key.dtype, jnp.integer):
        return jax.random.key(key)
    return jax.random.wrap_key_data(key)
