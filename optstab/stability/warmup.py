"""Step-size ramp after an optimizer-state reset, shared by SPAM and GNMR's ``reset``.

Zeroing Adam's moments while its bias correction keeps counting global steps makes
the next few hundred normalised steps several times too large. SPAM (Huang et al.,
ICLR 2025, https://arxiv.org/abs/2501.06842) ramps the step size back up along a
half cosine, from 1% to 100% over ``warmup_steps`` steps; this is that ramp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The ramp starts at 1 - RAMP_DEPTH of the full step size.
RAMP_DEPTH = 0.99


def reset_ramp(steps_since_reset: jax.Array, warmup_steps: jax.typing.ArrayLike) -> jax.Array:
    """Float32 factor ``1 - 0.99 * (1 + cos(pi * s / (N + 1))) / 2`` for ``s < N``, else 1.

    Args:
      steps_since_reset: ``s``, int array of any shape (0 on the reset step).
      warmup_steps: ``N``, the ramp length (0 disables the ramp).

    Returns:
      The step-size factor, float32 with the shape of ``steps_since_reset``.
    """
    since = jnp.asarray(steps_since_reset).astype(jnp.float32)
    warmup = jnp.asarray(warmup_steps, jnp.float32)
    ramp = 1.0 - RAMP_DEPTH * 0.5 * (1.0 + jnp.cos(jnp.pi * since / (warmup + 1.0)))
    return jnp.where(since < warmup, ramp, 1.0).astype(jnp.float32)
