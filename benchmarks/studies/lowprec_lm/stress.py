"""The stress of ``lowprec_lm``: seeded activation-outlier bursts, the per-step outlier
vectors, the oracle's disturbed-layer mask, and the per-seed inputs of a regime (see the
package docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.harness import parallel
from benchmarks.problems import lm


class Bursts(NamedTuple):
    """Per-step outlier schedule of one seed (numpy, T = num_steps)."""

    layer: np.ndarray  # (T,) int32: index into lm.layer_paths, -1 when no burst
    channels: np.ndarray  # (T, burst_channels) int32: input channels hit
    alpha: np.ndarray  # (T,) float32: multiplier of those channels (1 when no burst)


def no_bursts(config: ml_collections.ConfigDict) -> Bursts:
    steps, k = config.num_steps, config.burst_channels
    return Bursts(np.full(steps, -1, np.int32), np.zeros((steps, k), np.int32),
                  np.ones(steps, np.float32))  # fmt: skip


def burst_schedule(config: ml_collections.ConfigDict, seed: int, layers: Sequence[str]) -> Bursts:
    """Seeded bursts on the layer types ``layers`` (``"qkv"``, ``"proj"``, ``"up"``,
    ``"down"``; see the package docstring); every method of a seed sees the same ones."""
    if not layers:
        return no_bursts(config)
    rng = np.random.default_rng([seed, 1])
    steps, k = config.num_steps, config.burst_channels
    paths = lm.layer_paths(config.depth)
    widths = lm.layer_input_widths(config.width, config.mlp_width)
    layer, channels, alpha = no_bursts(config)
    candidates = [i for i, p in enumerate(paths) if p.split("/")[-1] in layers]
    t = config.burst_start
    while t < steps:
        if rng.random() >= config.burst_prob:
            t += 1
            continue
        length = int(rng.integers(config.burst_length[0], config.burst_length[1] + 1))
        hit = int(rng.choice(candidates))
        width = widths[paths[hit].split("/")[-1]]
        size = math.exp(rng.uniform(math.log(config.alpha_min), math.log(config.alpha_max)))
        end = min(t + length, steps)
        layer[t:end] = hit
        channels[t:end] = rng.choice(width, size=k, replace=False)
        alpha[t:end] = size
        t = end
    return Bursts(layer, channels, alpha)


def outlier_vectors(config: ml_collections.ConfigDict, layer, channels, alpha) -> dict:
    """This step's ``{layer_path: (width,) multipliers}`` (traced; ones off the burst)."""
    widths = lm.layer_input_widths(config.width, config.mlp_width)
    out = {}
    for i, path in enumerate(lm.layer_paths(config.depth)):
        width = widths[path.split("/")[-1]]
        hit = jnp.zeros((width,), bool).at[channels].set(True) & (layer == i)
        out[path] = jnp.where(hit, alpha, 1.0).astype(jnp.float32)
    return out


def oracle_mask(layer: np.ndarray, num_layers: int, lag: int) -> np.ndarray:
    """(T, num_layers) bool: at step t, the layers that had a burst at some step in
    ``[t - lag, t - 1]``. With delayed scaling (``lag`` = the amax history length) a
    burst keeps inflating its layer's scale for ``history`` steps after it ends, so
    this is what a perfect detector acting one step late would hold in float32."""
    hit = np.zeros((len(layer), num_layers), bool)
    for t in range(1, len(layer)):
        recent = layer[max(0, t - lag) : t]
        hit[t, recent[recent >= 0]] = True
    return hit


def make_inputs(
    config: ml_collections.ConfigDict, corpus: lm.Corpus, layers: Sequence[str], real: bool
) -> dict:
    """Per-seed batches and burst schedules on the layer types ``layers`` (none when
    empty), stacked over seeds (numpy). ``real``: the outliers are in the function (on
    ``config.model_outliers.positions``), else only the quantizers see them."""
    seeds = range(config.num_seeds)
    shape = (config.num_steps, config.batch_size)
    windows = [
        lm.sample_windows(corpus.train, np.random.default_rng([s, 0]), shape, config.context + 1)
        for s in seeds
    ]
    schedules = [burst_schedule(config, s, tuple(layers)) for s in seeds]
    layer = np.stack([b.layer for b in schedules])
    lag = config.quant.history if config.quant.scale_mode == "delayed" else 1
    num_layers = len(lm.layer_paths(config.depth))
    return {
        "windows": np.stack(windows),
        "layer": layer,
        "channels": np.stack([b.channels for b in schedules]),
        "alpha": np.stack([b.alpha for b in schedules]),
        "real": np.full(layer.shape, real),
        "oracle": np.stack([oracle_mask(b.layer, num_layers, lag) for b in schedules]),
    }


# What a training chunk takes, per seed and step: the inputs above (less the oracle) and
# the layers whose float32 switch is forced on (set per method by the training).
INPUT_ORDER = ("windows", "layer", "channels", "alpha", "real", "forced")


def shard_inputs(chunk_inputs: list[np.ndarray], mesh) -> list[jax.Array]:
    """Puts a chunk's inputs on the devices: the batch axis of the windows (seeds,
    steps, batch, context) is sharded, the rest replicated."""
    if mesh is None:
        return [jnp.asarray(x) for x in chunk_inputs]
    windows, *rest = chunk_inputs
    return [parallel.shard_batch(windows, mesh, axis=2), *parallel.replicate(rest, mesh)]
