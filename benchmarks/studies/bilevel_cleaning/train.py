"""Training of ``bilevel_cleaning``: per-seed data and batches, each method's donated
update step and initial carry, and the training loop with its validation curves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.harness import measure
from benchmarks.problems import cleaning, models, weighting

BASELINES = ("no_cleaning", "oracle")


def seed_setup(config: ml_collections.ConfigDict, seed: int) -> dict:
    """What every method shares within seed ``seed``: data, initial MLP, batch order."""
    data = cleaning.cleaning_data(config.seed + seed, config.corruption)
    sizes = (data.x_train.shape[1], *config.hidden, 10)
    params = models.mlp_init(jax.random.fold_in(jax.random.key(config.seed), seed), sizes)
    plan = weighting.minibatch_plan(config, seed, data)
    return {"seed": seed, "data": data, "params": params, "plan": plan}


def make_method(name: str, config: ml_collections.ConfigDict, setup: dict, mesh=None, fsdp=False):
    """``(step, initial carry)`` of method ``name`` on the seed of ``setup``."""
    problem = cleaning.cleaning_problem(setup["params"], config.l2)
    return weighting.method_and_carry(name, config, setup, problem, name in BASELINES, mesh, fsdp)


@jax.jit
def _evaluate(params, inputs, labels):
    loss = jnp.mean(cleaning.per_sample_loss(params, inputs, labels))
    return loss, models.accuracy(params, inputs, labels)


def weight_statistics(logits: np.ndarray, data) -> dict:
    """Detection F1 of the corrupted labels (weight below 1/2) and the mean weight of
    clean and of corrupted samples."""
    weights = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid, overflow-free
    return {
        "detect_f1": cleaning.detection_f1(logits, data.corrupted),
        "clean_weight": float(weights[~data.corrupted].mean()),
        "corrupted_weight": float(weights[data.corrupted].mean()),
    }


def train(
    name: str, compiled: measure.CompiledStep, config, setup: dict, mesh=None, fsdp=False
) -> dict:
    """Runs ``num_steps`` updates of ``name`` on one seed; final metrics and curves."""
    _, carry = make_method(name, config, setup, mesh, fsdp)
    baseline = name in BASELINES
    out = weighting.train_method(
        name, compiled, config, setup, measure.fresh_copy(carry), baseline,
        lambda t: weighting.batches_at(setup, name, t, mesh), _evaluate, weight_statistics,
    )  # fmt: skip
    if baseline:  # the summary's columns exist for every method
        out["final"].update(detect_f1=None, clean_weight=None, corrupted_weight=None)
    return out


def compile_method(
    name: str, config, setup: dict, mesh=None, fsdp=False
) -> tuple[measure.CompiledStep, tuple, tuple]:
    """The compiled donated step of ``name``, its initial carry and a fixed batch
    (placed on ``mesh``, if any, as the training places them)."""
    step, carry = make_method(name, config, setup, mesh, fsdp)
    batch = weighting.batches_at(setup, name, 0, mesh)
    return measure.compile_step(step, *carry, *batch, mesh=mesh), carry, batch
