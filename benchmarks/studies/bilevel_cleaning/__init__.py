"""Hyper-data cleaning: does BROS clean labels as well as MA-SOBA, with less memory?

Setup. scikit-learn's digits with half of the training labels replaced by a wrong class
(:func:`benchmarks.problems.cleaning.cleaning_data`: 1077 train, 360 clean validation,
360 clean test samples). The lower variable ``y`` is an MLP (``config.hidden``) trained
on the training loss weighted per sample by ``sigmoid(x_i)``, with an l2 term; the upper
variable ``x`` holds one weight logit per training sample (initialised at 0) and
minimises the validation cross-entropy of ``y``
(:func:`benchmarks.problems.cleaning.cleaning_problem`). Every update draws an inner
minibatch of training samples and an outer minibatch of validation samples.

Methods (the summary names):

* ``soba``, ``ma_soba``, ``bros_r{rank}`` (factored BROS) from :mod:`optstab.bilevel`,
  chained with ``optax.sgd(outer_lr)`` on ``x``. Every solver gets MA-SOBA's step sizes
  (tuned on the validation split, see ``configs/bilevel_cleaning.py``); BROS adapts them
  to its rank by its default rank rule (``rank_scaled_steps``), with no per-rank search;
* ``no_cleaning``: SGD on ``y`` alone with ``x`` frozen at its initial value (every
  sample weighted ``sigmoid(0)``), the same inner step size and number of steps: the
  bilevel problem without the upper level;
* ``oracle``: the same, with inner minibatches drawn from the correctly labelled
  samples only (as if the corrupted ones had been found and removed);
* ``memory_only_methods`` (e.g. ``bros_r32_naive``, ``factored=False``) are compiled
  for the memory and time columns but not trained.

Per seed (the seed changes the corruption, the MLP initialisation, the probes and the
minibatch order; the split is fixed), each method runs ``num_steps`` updates, one
compiled call each in a Python loop. Reported, median over seeds: test accuracy of the
final ``y``; detection F1 of the final ``x`` (a sample is flagged corrupted when its
weight ``sigmoid(x_i) < 1/2``; ``None`` for ``no_cleaning`` and ``oracle``, which learn
no weights, the oracle's detection being perfect by construction); the mean weight of
clean and of corrupted samples; validation loss, accuracy and F1 every ``eval_every``
steps (curves); and, AlgoPerf-style, ``time_to_target``: the steps and seconds (steps
times the median step time) each method takes to reach MA-SOBA's final validation
accuracy minus ``goal_accuracy_gap`` (see :func:`report.time_to_target`). Every method
runs the same number of steps, so the accuracies are at equal steps.

Cost, per method, of the one update step that training runs (``x`` and the optimizer
state donated): compiled bytes (argument + output + temp - alias, from XLA's memory
analysis), compile time, and the median step time of ``step_repeats`` calls timed
round-robin over all methods in the same run, after training.

Stages and devices. Every method x seed training is one checkpointed stage; a resumed
run restores those and trains the rest (the compiled bytes and step times are measured
again: they take seconds). With a mesh (:mod:`benchmarks.harness.parallel`), the step is
compiled for minibatches sharded over the ``data`` axis (``inner_batch`` and
``outer_batch`` must divide by its size) and a replicated ``x``, optimizer state and MLP
(with ``fsdp``, large MLP leaves and their companions in the state are split); the
compiled bytes are then per device.

Modules: ``train.py`` (data, methods, the training loop), ``report.py`` (analysis,
table, figure).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from benchmarks.harness import Context, Study, parallel
from benchmarks.harness.study import check_positive
from benchmarks.problems import cleaning, methods, models, weighting
from benchmarks.studies.bilevel_cleaning import train
from benchmarks.studies.bilevel_cleaning.report import (
    goal_checks,
    plot,
    summarize,
    table,
    time_to_target,
)

__all__ = ["STUDY", "plot", "run", "table"]


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> list[str]:
    """Checks the config and builds every solver; returns every method's name (the
    trained ones, then those compiled for the cost columns only)."""
    trained = list(config.methods)
    names = trained + [n for n in config.memory_only_methods if n not in trained]
    methods.check_bilevel(names, train.BASELINES)
    check_positive(config, "hidden", "num_steps", "eval_every", "step_repeats")
    for field in ("inner_batch", "outer_batch"):
        check_positive(config, field)
        parallel.check_batch(config[field], mesh, field)
    sizes = (64, *config.hidden, 10)
    params = jax.eval_shape(lambda: models.mlp_init(jax.random.key(0), sizes))
    problem = cleaning.cleaning_problem(params, config.l2)
    for name in names:
        if name not in train.BASELINES:
            weighting.solver(name, config, problem, seed=0)
    return names


def measure_study(names: list[str], context: Context) -> dict:
    """Trains every method on every seed (one stage each), then times every step."""
    config, mesh, fsdp = context.config, context.mesh, context.fsdp
    trained = list(config.methods)
    setups = [train.seed_setup(config, s) for s in range(config.num_seeds)]
    compiled, carries, fixed = {}, {}, {}
    for name in context.each(names, desc="compile"):
        compiled[name], carries[name], fixed[name] = train.compile_method(
            name, config, setups[0], mesh, fsdp
        )
    per_seed, curves, times, cost = weighting.train_and_time(
        context, trained, setups, compiled, carries, fixed,
        lambda name, setup: train.train(name, compiled[name], config, setup, mesh, fsdp),
    )  # fmt: skip
    summaries = summarize(per_seed, cost)
    goal, reduction = goal_checks(summaries, config)
    target, to_target = time_to_target(curves, summaries, config)
    first = setups[0]
    summary = {
        "methods": summaries,
        "memory_reduction_vs_ma_soba": reduction,
        "goal": goal,
        "target_val_acc": target,
        "time_to_target": to_target,
        "num_params": models.num_params(first["params"]),
        "num_train": int(first["data"].x_train.shape[0]),
        "corrupted_fraction": float(np.mean(first["data"].corrupted)),
    }
    raw = {
        "seeds": per_seed,
        "curves": curves,
        "step_times_s": times,
        "memory_bytes": {name: compiled[name].memory for name in names},
    }
    return {"summary": summary, "raw": raw}


STUDY = Study("bilevel_cleaning", prepare, measure_study, table, plot)
run = STUDY.run
