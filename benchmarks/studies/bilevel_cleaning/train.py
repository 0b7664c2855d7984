"""Training of ``bilevel_cleaning``: per-seed data and batches, each method's donated
update step and initial carry, and the training loop with its validation curves."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from benchmarks.harness import measure, parallel
from benchmarks.problems import cleaning, models, weighting
from benchmarks.problems.weighting import solver
from optstab import bilevel

BASELINES = ("no_cleaning", "oracle")


def seed_setup(config: ml_collections.ConfigDict, seed: int) -> dict:
    """What every method shares within seed ``seed``: data, initial MLP, batch order."""
    data = cleaning.cleaning_data(config.seed + seed, config.corruption)
    sizes = (data.x_train.shape[1], *config.hidden, 10)
    params = models.mlp_init(jax.random.fold_in(jax.random.key(config.seed), seed), sizes)
    rng = np.random.default_rng([config.seed, seed])
    plan = weighting.minibatch_plan(
        rng,
        config.num_steps,
        data.x_train.shape[0],
        data.x_val.shape[0],
        np.flatnonzero(~data.corrupted),
        config.inner_batch,
        config.outer_batch,
    )
    return {"seed": seed, "data": data, "params": params, **plan}


def batches_at(setup: dict, name: str, t: int, mesh=None) -> tuple[tuple, tuple]:
    """``(inner_batch, outer_batch)`` of step ``t`` for method ``name``, sharded over
    the ``data`` axis of ``mesh`` (if any)."""
    return weighting.batches_at(setup["data"], setup, t, oracle=name == "oracle", mesh=mesh)


def make_method(name: str, config: ml_collections.ConfigDict, setup: dict, mesh=None, fsdp=False):
    """``(step, initial carry)`` of method ``name`` on the seed of ``setup``; the carry
    is placed on ``mesh`` (if any) by :func:`benchmarks.harness.parallel.place_params`."""
    problem = cleaning.cleaning_problem(setup["params"], config.l2)
    x0 = jnp.full((setup["data"].x_train.shape[0],), config.init_logit, jnp.float32)
    if name in BASELINES:
        carry = parallel.place_params((x0, setup["params"]), mesh, fsdp)
        return weighting.frozen_weights_step(problem, config.inner_lr), carry
    tx = solver(name, config, problem, setup["seed"])
    return cleaning.bilevel_step(tx), parallel.place_params((x0, tx.init(x0)), mesh, fsdp)


def lower_variable(name: str, carry: tuple) -> Any:
    """The MLP parameters ``y`` held in a method's carry."""
    return carry[1] if name in BASELINES else bilevel.inner_params(carry[1])


@jax.jit
def _evaluate(params, inputs, labels):
    loss = jnp.mean(cleaning.per_sample_loss(params, inputs, labels))
    return loss, models.accuracy(params, inputs, labels)


def train(
    name: str, compiled: measure.CompiledStep, config, setup: dict, mesh=None, fsdp=False
) -> dict:
    """Runs ``num_steps`` updates of ``name`` on one seed; final metrics and curves.

    Returns plain dicts, lists and Python scalars (a checkpointable stage).
    """
    data = setup["data"]
    _, carry = make_method(name, config, setup, mesh, fsdp)
    carry = measure.fresh_copy(carry)
    curves: dict[str, list] = {"step": [], "val_loss": [], "val_acc": [], "detect_f1": []}

    def record(t, carry):
        loss, acc = _evaluate(lower_variable(name, carry), data.x_val, data.y_val)
        curves["step"].append(t)
        curves["val_loss"].append(float(loss))
        curves["val_acc"].append(float(acc))
        if name not in BASELINES:
            curves["detect_f1"].append(cleaning.detection_f1(np.asarray(carry[0]), data.corrupted))

    record(0, carry)
    start = time.perf_counter()
    bar = tqdm(range(config.num_steps), desc=f"{name} seed {setup['seed']}", leave=False)
    for t in bar:
        carry = compiled.fn(*carry, *batches_at(setup, name, t, mesh))
        if (t + 1) % config.eval_every == 0 or t + 1 == config.num_steps:
            record(t + 1, carry)
    jax.block_until_ready(carry)
    train_s = time.perf_counter() - start

    y = lower_variable(name, carry)
    test_loss, test_acc = _evaluate(y, data.x_test, data.y_test)
    record_ = {
        "test_acc": float(test_acc),
        "test_loss": float(test_loss),
        "val_acc": curves["val_acc"][-1],
        "val_loss": curves["val_loss"][-1],
        "finite": bool(
            all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves((carry[0], y)))
        ),
        "train_s": train_s,
        "detect_f1": None,
        "clean_weight": None,
        "corrupted_weight": None,
    }
    if name not in BASELINES:
        logits = np.asarray(carry[0])
        weights = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid, overflow-free
        record_["detect_f1"] = cleaning.detection_f1(logits, data.corrupted)
        record_["clean_weight"] = float(weights[~data.corrupted].mean())
        record_["corrupted_weight"] = float(weights[data.corrupted].mean())
    if not curves["detect_f1"]:
        del curves["detect_f1"]
    return {"final": record_, "curves": curves}


def compile_method(
    name: str, config, setup: dict, mesh=None, fsdp=False
) -> tuple[measure.CompiledStep, tuple, tuple]:
    """The compiled donated step of ``name``, its initial carry and a fixed batch
    (placed on ``mesh``, if any, as the training places them)."""
    step, carry = make_method(name, config, setup, mesh, fsdp)
    batch = batches_at(setup, name, 0, mesh)
    return measure.compile_step(step, *carry, *batch, mesh=mesh), carry, batch
