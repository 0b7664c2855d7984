"""Training of ``bilevel_reweighting``: per-seed data, ViT and batches, each method's
donated update step and initial carry, and the training loop with its curves."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from benchmarks.harness import measure, parallel
from benchmarks.problems import cleaning, vit, weighting
from benchmarks.problems.weighting import solver
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
    plan = weighting.minibatch_plan(
        np.random.default_rng([config.seed, seed]),
        config.num_steps,
        data.x_train.shape[0],
        data.x_val.shape[0],
        np.flatnonzero(~data.corrupted),
        config.inner_batch,
        config.outer_batch,
    )
    return {"seed": seed, "data": data, "graphdef": graphdef, "params": params, "plan": plan}


def batches_at(setup: dict, name: str, t: int, mesh=None) -> tuple[tuple, tuple]:
    """``(inner_batch, outer_batch)`` of step ``t`` for ``name`` (sharded on ``mesh``)."""
    return weighting.batches_at(setup["data"], setup["plan"], t, name == "oracle", mesh)


def make_method(name: str, config, setup: dict, mesh=None, fsdp=False):
    """``(step, initial carry)`` of method ``name`` on the seed of ``setup``."""
    problem = problem_of(config, setup["graphdef"], setup["params"])
    x0 = jnp.full((setup["data"].x_train.shape[0],), config.init_logit, jnp.float32)
    if name in BASELINES:
        carry = parallel.place_params((x0, setup["params"]), mesh, fsdp)
        return weighting.frozen_weights_step(problem, config.inner_lr), carry
    tx = solver(name, config, problem, setup["seed"])
    return cleaning.bilevel_step(tx), parallel.place_params((x0, tx.init(x0)), mesh, fsdp)


def lower_variable(name: str, carry: tuple) -> Any:
    """The ViT parameters ``y`` held in a method's carry."""
    return carry[1] if name in BASELINES else bilevel.inner_params(carry[1])


def compile_method(
    name: str, config, setup: dict, mesh=None, fsdp=False, reuse=None
) -> tuple[measure.CompiledStep, tuple, tuple]:
    """The compiled donated step of ``name``, its initial carry and a fixed batch.

    ``reuse``: an executable compiled for the same step and shapes (the two baselines
    run one step function), returned instead of compiling again.
    """
    step, carry = make_method(name, config, setup, mesh, fsdp)
    batch = batches_at(setup, name, 0, mesh)
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
    """Runs ``num_steps`` updates of ``name`` on one seed; final metrics and curves.

    Returns plain dicts, lists and Python scalars (a checkpointable stage).
    """
    data = setup["data"]
    graphdef = setup["graphdef"]
    _, carry = make_method(name, config, setup, mesh, fsdp)
    carry = measure.fresh_copy(carry)
    solver_run = name not in BASELINES
    curves: dict[str, list] = {"step": [], "val_loss": [], "val_acc": []}
    if solver_run:
        curves["detect_f1"] = []

    def record(t, carry):
        loss, acc = evaluate(graphdef, lower_variable(name, carry), data.x_val, data.y_val)
        curves["step"].append(t)
        curves["val_loss"].append(float(loss))
        curves["val_acc"].append(float(acc))
        if solver_run:
            curves["detect_f1"].append(cleaning.detection_f1(np.asarray(carry[0]), data.corrupted))

    record(0, carry)
    start = time.perf_counter()
    for t in tqdm(range(config.num_steps), desc=f"{name} seed {setup['seed']}", leave=False):
        carry = compiled.fn(*carry, *batches_at(setup, name, t, mesh))
        if (t + 1) % config.eval_every == 0 or t + 1 == config.num_steps:
            record(t + 1, carry)
    jax.block_until_ready(carry)
    train_s = time.perf_counter() - start

    y = lower_variable(name, carry)
    test_loss, test_acc = evaluate(graphdef, y, data.x_test, data.y_test)
    final = {
        "test_acc": float(test_acc),
        "test_loss": float(test_loss),
        "val_acc": curves["val_acc"][-1],
        "val_loss": curves["val_loss"][-1],
        "finite": bool(
            all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves((carry[0], y)))
        ),
        "train_s": train_s,
    }
    if solver_run:
        final.update(weight_statistics(np.asarray(carry[0]), data))
        final["nonfinite_steps"] = int(bilevel.find_bilevel_state(carry[1]).nonfinite)
    return {"final": final, "curves": curves}
