"""A plain-JAX MLP with dict parameters.

Parameters are ``{"layer0": {"w": (d_in, d_out), "b": (d_out,)}, "layer1": ...}``, so
optstab's default units (one per leaf) are named ``"layer0/w"``, ``"layer0/b"``, ...
Hidden layers use ReLU; the last layer returns logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

Params = dict[str, dict[str, jax.Array]]


def mlp_init(key: jax.Array, sizes: Sequence[int], dtype=jnp.float32) -> Params:
    """He-normal weights and zero biases for layer widths ``sizes = (d_in, ..., d_out)``."""
    keys = jax.random.split(key, len(sizes) - 1)
    params = {}
    for i, (k, d_in, d_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        scale = jnp.sqrt(2.0 / d_in)
        params[f"layer{i}"] = {
            "w": (scale * jax.random.normal(k, (d_in, d_out))).astype(dtype),
            "b": jnp.zeros((d_out,), dtype),
        }
    return params


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    """Logits of the MLP for a batch ``x`` of shape ``(batch, d_in)``."""
    num_layers = len(params)
    for i in range(num_layers):
        layer = params[f"layer{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < num_layers - 1:
            x = jax.nn.relu(x)
    return x


def cross_entropy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the MLP on integer labels ``y``."""
    logits = mlp_apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of ``x`` classified as ``y``."""
    return jnp.mean(jnp.argmax(mlp_apply(params, x), axis=-1) == y)


def num_params(params: Params) -> int:
    """Total number of scalars in ``params``."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))
