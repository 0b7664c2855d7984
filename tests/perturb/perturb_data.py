"""Data shared by the perturbation tests."""

import jax.numpy as jnp
import numpy as np


def logistic_data(n=64, seed=0):
    """A noisy linear rule in 3-D (not separable: logistic regression has an optimum)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = x @ np.array([1.5, -1.0, 0.5]) + 0.5 * rng.standard_normal(n) > 0
    return jnp.asarray(x), jnp.asarray(y.astype(np.int32))
