"""Training of ``bilevel_reweighting``: per-seed data, ViT and batches, each method's
donated update step and initial carry, and the training loop with its curves."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks.harness import measure
from benchmarks.problems import cleaning, vit, weighting
from optstab import bilevel

BASELINES = ("no_reweighting", "oracle")
MODEL_FIELDS = ("patch", "width", "depth", "heads", "mlp_width")


def model_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    return {field: config[field] for field in MODEL_FIELDS}


def problem_of(config: ml_collections.ConfigDict, graphdef, params) -> bilevel.BilevelProblem:
    return vit.reweighting_problem(graphdef, params, config.l2)


def seed_setup(config: ml_collections.ConfigDict, seed: int) -> dict:
    """What every method shares within seed ``seed``: data, initial ViT, minibatches."""
    data = vit.reweighting_data(config.seed + seed, config.noise, config.imbalance)
    key = jax.random.fold_in(jax.random.key(config.seed), seed)
    graphdef, params = vit.init(key, **model_sizes(config))
    plan = weighting.minibatch_plan(config, seed, data)
    return {"seed": seed, "data": data, "graphdef": graphdef, "params": params, "plan": plan}


def make_method(name: str, config, setup: dict, mesh=None, fsdp=False):
    """``(step, initial carry)`` of method ``name`` on the seed of ``setup``."""
    problem = problem_of(config, setup["graphdef"], setup["params"])
    return weighting.method_and_carry(name, config, setup, problem, name in BASELINES, mesh, fsdp)


def compile_method(
    name: str, config, setup: dict, mesh=None, fsdp=False, reuse=None
) -> tuple[measure.CompiledStep, tuple, tuple]:
    """The compiled donated step of ``name``, its initial carry and a fixed batch.

    ``reuse``: an executable compiled for the same step and shapes (the two baselines
    run one step function), returned instead of compiling again.
    """
    step, carry = make_method(name, config, setup, mesh, fsdp)
    batch = weighting.batches_at(setup, name, 0, mesh)
    compiled = reuse or measure.compile_step(step, *carry, *batch, mesh=mesh)
    return compiled, carry, batch


@functools.partial(jax.jit, static_argnums=0)
def evaluate(graphdef, params, images, labels) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy of the ViT ``(graphdef, params)`` (compiled once
    per architecture and split size)."""
    scores = vit.logits(graphdef, params, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(scores, labels)
    return jnp.mean(loss), jnp.mean(jnp.argmax(scores, axis=-1) == labels)


def weight_statistics(logits: np.ndarray, data: vit.ReweightingData) -> dict:
    """Detection F1 of the corrupted labels (weight below 1/2), the mean weight of
    clean and corrupted samples, and of the clean samples of the rare and frequent
    halves of the classes (by their count in the kept training set)."""
    weights = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid, overflow-free
    clean = ~data.corrupted
    counts = np.bincount(data.true_train, minlength=vit.CLASSES)
    rare = np.argsort(counts, kind="stable")[: vit.CLASSES // 2]
    in_rare = np.isin(data.true_train, rare)
    return {
        "detect_f1": cleaning.detection_f1(logits, data.corrupted),
        "clean_weight": float(weights[clean].mean()),
        "corrupted_weight": float(weights[data.corrupted].mean()),
        "rare_class_weight": float(weights[clean & in_rare].mean()),
        "frequent_class_weight": float(weights[clean & ~in_rare].mean()),
    }


def train(
    name: str, compiled: measure.CompiledStep, config, setup: dict, mesh=None, fsdp=False
) -> dict:
    """Runs ``num_steps`` updates of ``name`` on one seed; final metrics and curves."""
    _, carry = make_method(name, config, setup, mesh, fsdp)
    graphdef = setup["graphdef"]
    return weighting.train_method(
        name, compiled, config, setup, measure.fresh_copy(carry), name in BASELINES,
        lambda t: weighting.batches_at(setup, name, t, mesh),
        lambda y, images, labels: evaluate(graphdef, y, images, labels), weight_statistics,
    )  # fmt: skip
