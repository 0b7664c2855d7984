"""Gradient spikes as a stress: a seeded schedule of spikes, and their injection between
backpropagation and the optimizer (``spike_injection``'s stress; see its docstring)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

POOL_FACTOR = 4  # the garbage-direction pool holds 4 x the largest leaf's size
KINDS = ("random", "scale")


def spike_schedule(
    key: jax.Array, leaf_sizes: list[int], config: ml_collections.ConfigDict
) -> dict:
    """The seeded spike schedule of one seed.

    Returns a dict of (T,) arrays, T = ``num_steps``: ``event`` (bool), ``unit`` (int32,
    leaf index in flattening order), ``magnitude`` (float32 S) and ``offset`` (int32),
    plus ``pool``, a Gaussian vector of ``POOL_FACTOR`` x the largest leaf size. The
    garbage direction of step t is the window of ``pool`` (read cyclically) that starts
    at ``offset[t]``: a fresh, near-orthogonal direction for every event, without a
    random-number draw of a whole leaf inside the training loop.
    """
    k_event, k_unit, k_mag, k_offset, k_pool = jax.random.split(key, 5)
    num_steps = config.num_steps
    event = (jax.random.uniform(k_event, (num_steps,)) < config.spike_prob) & (
        jnp.arange(num_steps) >= config.spike_start
    )
    log_mag = jax.random.uniform(
        k_mag, (num_steps,), minval=math.log(config.spike_min), maxval=math.log(config.spike_max)
    )
    pool_size = POOL_FACTOR * max(leaf_sizes)
    return {
        "event": event,
        "unit": jax.random.randint(k_unit, (num_steps,), 0, len(leaf_sizes)),
        "magnitude": jnp.exp(log_mag),
        "offset": jax.random.randint(k_offset, (num_steps,), 0, pool_size),
        "pool": jax.random.normal(k_pool, (pool_size,)),
    }


def inject(grads: Any, step: jax.Array, schedule: dict, kind: str) -> Any:
    """Adds this step's spike (if any) to the hit leaf of ``grads``."""
    if kind not in KINDS:
        raise ValueError(f"spike_kind must be 'random' or 'scale', got {kind!r}")
    leaves, treedef = jax.tree.flatten(grads)
    magnitude = schedule["magnitude"][step]
    if kind == "random":
        pool = schedule["pool"]
        cyclic = jnp.concatenate([pool, pool])
        width = max(leaf.size for leaf in leaves)
        noise = jax.lax.dynamic_slice(cyclic, (schedule["offset"][step],), (width,))
    out = []
    for i, g in enumerate(leaves):
        hit = schedule["event"][step] & (schedule["unit"][step] == i)
        if kind == "random":
            u = noise[: g.size].reshape(g.shape).astype(g.dtype)
            u = u / jnp.linalg.norm(u.ravel())
            spiked = g + magnitude * jnp.linalg.norm(g.ravel()) * u
        else:
            spiked = magnitude * g
        out.append(jnp.where(hit, spiked, g))
    return jax.tree.unflatten(treedef, out)


def schedule_record(schedule: dict, units: list[str]) -> dict:
    """Per seed: the steps, hit units and magnitudes of the injected spike events."""
    event = np.asarray(schedule["event"])
    unit = np.asarray(schedule["unit"])
    magnitude = np.asarray(schedule["magnitude"])
    return {
        "step": [np.flatnonzero(e).tolist() for e in event],
        "unit": [[units[i] for i in u[e]] for u, e in zip(unit, event, strict=True)],
        "magnitude": [
            [float(f"{x:.4g}") for x in m[e]] for m, e in zip(magnitude, event, strict=True)
        ],
    }
