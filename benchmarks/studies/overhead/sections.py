"""The four sections of ``overhead``, each one checkpointed stage: the optimizer step,
the train step, and GNMR's cost over model size and over the number of units.

Each returns plain containers: per method its compiled memory
(:func:`benchmarks.harness.measure.memory_bytes`), its optimizer state's bytes, its
compile seconds and its per-round step times (``times_s``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np

import optstab
from benchmarks.harness import parallel
from benchmarks.problems import models
from benchmarks.studies.overhead import steps


def optimizer_step(optimizers: dict, config: ml_collections.ConfigDict, mesh, fsdp) -> dict:
    """One donated optimizer step of the ``step_sizes`` MLP, gradients given."""
    grads = steps.random_like(
        steps.mlp_params(config.step_sizes, config.seed), config.seed + 2, config.grad_scale,
        mesh, fsdp,
    )  # fmt: skip

    def carry(name):
        params = steps.mlp_params(config.step_sizes, config.seed, mesh, fsdp)
        return params, steps.init_state(optimizers[name], params, mesh, fsdp)

    measured = steps.compile_and_time(
        {name: steps.optimizer_step(tx) for name, tx in optimizers.items()},
        carry,
        (grads,),
        config.step_repeats,
        config.warmup_rounds,
        mesh,
        "optimizer step",
    )
    return {"params": models.num_params(grads), "methods": measured}


def make_batch(config: ml_collections.ConfigDict, mesh) -> tuple[jax.Array, jax.Array]:
    """A fixed batch of standard-normal inputs and uniform labels, split over the mesh."""
    kx, ky = jax.random.split(jax.random.key(config.seed + 1))
    x = jax.random.normal(kx, (config.batch_size, config.sizes[0]))
    y = jax.random.randint(ky, (config.batch_size,), 0, config.sizes[-1])
    return parallel.shard_batch((x, y), mesh)


def train_step(optimizers: dict, config: ml_collections.ConfigDict, mesh, fsdp) -> dict:
    """One donated train step (forward, backward, update) of the ``sizes`` MLP."""

    def carry(name):
        params = steps.mlp_params(config.sizes, config.seed, mesh, fsdp)
        return params, steps.init_state(optimizers[name], params, mesh, fsdp)

    measured = steps.compile_and_time(
        {name: steps.train_step(tx) for name, tx in optimizers.items()},
        carry,
        make_batch(config, mesh),
        config.train_repeats,
        config.warmup_rounds,
        mesh,
        "train step",
    )
    params = steps.mlp_params(config.sizes, config.seed)
    return {"params": models.num_params(params), "methods": measured}


def repeats_for(num_params: int, config: ml_collections.ConfigDict) -> int:
    """Timed rounds at a point of ``num_params`` parameters: ``scaling_repeats`` at
    ``scaling_reference_params`` and more for smaller models (a step of a tenth of the
    size is about ten times shorter), at most ``8 * scaling_repeats``."""
    scaled = math.ceil(config.scaling_repeats * config.scaling_reference_params / num_params)
    return int(min(max(scaled, config.scaling_repeats), 8 * config.scaling_repeats))


def scaling_size(config: ml_collections.ConfigDict, mesh, fsdp) -> dict:
    """The optimizer step of square MLPs of every width in ``scaling_widths``
    (``scaling_depth`` layers: about ``depth * width^2`` parameters), one unit per leaf."""
    optimizers = {name: steps.build(name, config) for name in config.scaling_methods}
    points = []
    for width in config.scaling_widths:
        sizes = (width,) * (config.scaling_depth + 1)
        grads = steps.random_like(
            steps.mlp_params(sizes, config.seed), config.seed + 2, config.grad_scale, mesh, fsdp
        )

        def carry(name, sizes=sizes):
            params = steps.mlp_params(sizes, config.seed, mesh, fsdp)
            return params, steps.init_state(optimizers[name], params, mesh, fsdp)

        num_params = models.num_params(grads)
        repeats = repeats_for(num_params, config)
        measured = steps.compile_and_time(
            {name: steps.optimizer_step(tx) for name, tx in optimizers.items()},
            carry,
            (grads,),
            repeats,
            config.warmup_rounds,
            mesh,
            f"size {num_params / 1e6:.1f}M",
        )
        points.append({"params": num_params, "repeats": repeats, "methods": measured})
        del grads
    return {"points": points}


def row_params(config: ml_collections.ConfigDict, mesh=None, fsdp=False) -> dict:
    """The fixed model of the units sweep: ``unit_leaves`` matrices whose rows add up to
    ``unit_rows``, each row ``unit_cols`` wide (like the rows of embedding tables)."""
    rows = config.unit_rows // config.unit_leaves
    keys = jax.random.split(jax.random.key(config.seed), config.unit_leaves)
    draw = jax.jit(lambda k: jax.random.normal(k, (rows, config.unit_cols)), inline=True)
    params = {f"table{i}": draw(k) for i, k in enumerate(keys)}
    return parallel.place_params(params, mesh, fsdp)


def row_units(params: dict, num_units: int) -> Any:
    """Units of consecutive rows (``optstab.units.named``): row ``r`` of all the rows in
    leaf order belongs to unit ``floor(r * num_units / rows)``; with as many units as
    rows, one unit per row."""
    total = sum(leaf.shape[0] for leaf in params.values())
    labels, start = {}, 0
    for name in sorted(params):
        rows = np.arange(start, start + params[name].shape[0])
        labels[name] = tuple(f"u{u:07d}" for u in rows * num_units // total)
        start += len(rows)
    return optstab.units.named(labels)


def scaling_units(config: ml_collections.ConfigDict, mesh, fsdp) -> dict:
    """The optimizer step of the fixed :func:`row_params` model with every number of
    units in ``unit_counts``; AdamW (which has no units) is compiled once."""
    template = row_params(config)
    grads = steps.random_like(template, config.seed + 2, config.grad_scale, mesh, fsdp)
    num_params = models.num_params(grads)
    repeats = repeats_for(num_params, config)
    adamw = steps.build("adamw", config)
    cache, points = {}, []
    for num_units in config.unit_counts:
        units = row_units(template, num_units)
        optimizers = {
            name: adamw if name == "adamw" else steps.build(name, config, units=units)
            for name in config.unit_methods
        }

        def carry(name, optimizers=optimizers):
            params = row_params(config, mesh, fsdp)
            return params, steps.init_state(optimizers[name], params, mesh, fsdp)

        measured = steps.compile_and_time(
            {name: steps.optimizer_step(tx) for name, tx in optimizers.items()},
            carry,
            (grads,),
            repeats,
            config.warmup_rounds,
            mesh,
            f"{num_units} units",
            cache=cache,
        )
        cache = {name: cache[name] for name in ("adamw",) if name in cache}
        points.append({"units": num_units, "methods": measured})
    return {"params": num_params, "repeats": repeats, "points": points}
