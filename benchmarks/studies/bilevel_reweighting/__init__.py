"""ViT sample reweighting: does BROS learn per-sample weights as well as MA-SOBA, with
less memory? (BROS's fourth task, at digits' scale.)

Setup. scikit-learn's digits, the training split made long-tailed and noisy
(:func:`benchmarks.problems.vit.reweighting_data`: class frequencies decay
geometrically down to ``1 / config.imbalance``, then ``config.noise`` of the labels are
replaced by a wrong class), clean balanced validation (360) and test (360) splits. The
lower variable ``y`` is a small ViT (:class:`benchmarks.problems.vit.ViT`: conv patch
embedding, ``depth`` pre-norm blocks whose attention and MLP projections are einsums of
2-D kernels, a linear head) trained on the training loss weighted per sample by
``sigmoid(x_i)``, plus ``l2/2 ||y||^2``; the upper variable ``x`` holds one weight logit
per training sample (initialised at ``init_logit``) and minimises the validation
cross-entropy of ``y`` (:func:`benchmarks.problems.vit.reweighting_problem`). Every
update draws an inner minibatch of training samples and an outer minibatch of
validation samples.

The bilevel theory asks for a lower problem strongly convex in ``y``. What holds: the
l2 term makes ``g`` strongly convex wherever the weighted loss's Hessian is positive
semidefinite, and the loss is smooth (GELU, softmax, LayerNorm with its epsilon). What
does not: a ViT's loss is not convex in its weights, so ``g``'s Hessian may have
negative eigenvalues larger than ``l2`` and ``y*(x)`` need not be unique; the solvers
then track a local minimiser, and the auxiliary variable ``z`` solves a possibly
indefinite system (as in every bilevel deep-learning benchmark).

Methods (the summary names):

* ``soba``, ``ma_soba`` and ``bros_r{rank}`` (factored BROS) from :mod:`optstab.bilevel`,
  chained with ``optax.sgd(outer_lr)`` on ``x``, all with the same step sizes:
  MA-SOBA's, chosen on the validation split (``configs/bilevel_reweighting.py``);
  BROS applies them through its default rank rule (``rank_scaled_steps``), untuned;
* ``no_reweighting``: SGD on ``y`` alone with ``x`` frozen at ``init_logit`` (every
  sample weighted alike), MA-SOBA's inner step size and the same number of steps;
* ``oracle``: the same, with inner minibatches drawn from the correctly labelled
  samples only (the long tail is kept).

Per seed (the seed changes the tail, the noise, the ViT initialisation, the probes and
the minibatch order; the split is fixed), each method runs ``num_steps`` updates, one
compiled call each. Reported, median over seeds: test accuracy of the final ``y``;
detection F1 of the noisy labels (weight below 1/2); the mean weight of clean and of
noisy samples, and of the clean samples of the rare and frequent halves of the
classes; validation curves every ``eval_every`` steps.

Cost, per method, of the one update step that training runs (``x`` and the optimizer
state donated): compiled bytes (argument + output + temp - alias, XLA's memory
analysis), compile time (the two baselines share one executable, so one compile
time), and the median step time of ``step_repeats`` calls timed round-robin over all
methods after training.

Factored leaves (summary ``factored``, per BROS rank): the ViT leaves BROS projects
(2-D with more than ``rank`` rows), the kinds of product they enter, and the number of
values of the traced outer and inner passes that depend on the subspace coordinates
and have a projected leaf's shape, evaluated factored (0: no dense ``m x n`` product of
a projected leaf) and densely (``factored=False``, the control), on one image
(:mod:`benchmarks.studies.bilevel_reweighting.factored`).

Stages and devices as in ``bilevel_cleaning``: every method x seed training is one
checkpointed stage; with a mesh the minibatches are sharded over the ``data`` axis and
``x``, the state and the ViT replicated (or split with ``fsdp``); bytes are then per
device.

Modules: ``train.py`` (data, methods, the training loop), ``factored.py`` (the
jaxpr check), ``report.py`` (analysis, table, figure).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.harness import Context, Study, parallel
from benchmarks.harness.study import check_positive
from benchmarks.problems import methods, models, vit, weighting
from benchmarks.studies.bilevel_reweighting import factored, train
from benchmarks.studies.bilevel_reweighting.report import goal_checks, plot, summarize, table

__all__ = ["STUDY", "plot", "run", "table"]

# Which product a projected leaf enters, by its layer's name.
KINDS = {
    "query": "einsum",
    "key": "einsum",
    "value": "einsum",
    "out": "einsum (columns)",
    "up": "einsum",
    "down": "einsum",
    "head": "dot_general",
}


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> list[str]:
    """Checks the config and builds every solver; returns the method names."""
    names = list(config.methods)
    methods.check_bilevel(names, train.BASELINES)
    check_positive(config, *train.MODEL_FIELDS, "num_steps", "eval_every", "step_repeats")
    check_positive(config, "imbalance", "l2")
    for field in ("inner_batch", "outer_batch"):
        check_positive(config, field)
        parallel.check_batch(config[field], mesh, field)
    if not 0.0 <= config.noise < 1.0:
        raise ValueError(f"config.noise must be in [0, 1), got {config.noise!r}")
    graphdef, params = jax.eval_shape(
        lambda: vit.init(jax.random.key(0), **train.model_sizes(config))
    )  # raises for a patch that does not divide 8 or heads that do not divide the width
    problem = train.problem_of(config, graphdef, params)
    for name in names:
        if name not in train.BASELINES:
            weighting.solver(name, config, problem, seed=0)
    return names


def factored_evidence(config: ml_collections.ConfigDict, setup: dict, names: list[str]) -> dict:
    """Per BROS rank: projected leaves, their kinds, and the jaxpr counts (factored and
    dense) of coordinate-dependent values shaped like a projected leaf."""
    data, params = setup["data"], setup["params"]
    problem = train.problem_of(config, setup["graphdef"], params)
    x = jnp.zeros((data.x_train.shape[0],), jnp.float32)
    one = np.zeros((1,), np.int32)
    inner = (one, data.x_train[:1], data.y_train[:1])
    outer = (data.x_val[:1], data.y_val[:1])
    out = {}
    for name in names:
        rank = methods.bros_rank(name)
        if rank is None:
            continue
        counts = {
            mode: factored.weight_shaped_values(
                problem, params, x, inner, outer, rank, factored=mode
            )
            for mode in (True, False)
        }
        projected = vit.projected_leaves(params, rank)
        layers = sorted({path.split("/")[-2] for path in projected})
        out[name] = {
            "projected": projected,
            "kinds": sorted({f"{KINDS.get(layer, layer)}" for layer in layers}),
            "weight_shaped": counts[True]["outer"] + counts[True]["inner"],
            "weight_shaped_dense": counts[False]["outer"] + counts[False]["inner"],
            "unchecked_shapes": [list(shape) for shape in counts[True]["unchecked"]],
        }
    return out


def measure_study(names: list[str], context: Context) -> dict:
    """Trains every method on every seed (one stage each), then times every step."""
    config, mesh, fsdp = context.config, context.mesh, context.fsdp
    setups = [train.seed_setup(config, s) for s in range(config.num_seeds)]
    evidence = factored_evidence(config, setups[0], names)  # tracing only: seconds
    compiled, carries, fixed = {}, {}, {}
    frozen = None  # the baselines' one executable: the same step on the same shapes
    for name in context.each(names, desc="compile"):
        reuse = frozen if name in train.BASELINES else None
        compiled[name], carries[name], fixed[name] = train.compile_method(
            name, config, setups[0], mesh, fsdp, reuse
        )
        if name in train.BASELINES:
            frozen = compiled[name]
    per_seed, curves, times, cost = weighting.train_and_time(
        context, names, setups, compiled, carries, fixed,
        lambda name, setup: train.train(name, compiled[name], config, setup, mesh, fsdp),
    )  # fmt: skip
    summaries = summarize(per_seed, cost)
    goal, reduction = goal_checks(summaries, config)
    first = setups[0]["data"]
    summary = {
        "methods": summaries,
        "memory_reduction_vs_ma_soba": reduction,
        "goal": goal,
        "factored": evidence,
        "num_params": models.num_params(setups[0]["params"]),
        "num_train": int(first.x_train.shape[0]),
        "corrupted_fraction": float(np.mean(first.corrupted)),
        "class_counts": np.bincount(first.true_train, minlength=vit.CLASSES).tolist(),
    }
    raw = {
        "seeds": per_seed,
        "curves": curves,
        "step_times_s": times,
        "memory_bytes": {name: compiled[name].memory for name in names},
    }
    return {"summary": summary, "raw": raw}


STUDY = Study("bilevel_reweighting", prepare, measure_study, table, plot)
run = STUDY.run
