"""What the per-sample-weighting studies share (``bilevel_cleaning``, ``bilevel_reweighting``).

The upper variable ``x`` holds one weight logit per training sample and the lower
variable ``y`` is trained on the weighted loss
(:func:`benchmarks.problems.cleaning.cleaning_problem`,
:func:`benchmarks.problems.vit.reweighting_problem`). Every method is trained on the
same minibatches (:func:`minibatch_plan`, :func:`batches_at`); the solvers
(:func:`solver`) are compared with SGD on ``y`` alone, ``x`` frozen
(:func:`frozen_weights_step`): on all samples and on the correctly labelled ones only
(the oracle). :func:`method_and_carry`, :func:`train_method` and
:func:`train_and_time` run them; :func:`summarize`, :func:`rank_goals` and
:func:`accuracy_and_bytes_panels` report them. A study brings its problem, its
evaluation and its statistics of the learned weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from benchmarks.harness import measure, parallel, reporting
from benchmarks.problems import cleaning, methods
from optstab import bilevel


def solver(name: str, config, problem: bilevel.BilevelProblem, seed: int):
    """``chain(bilevel solver, sgd(config.outer_lr))`` of method ``name``: every solver
    gets the config's step sizes (BROS through its default rank rule)."""
    transform = methods.bilevel_solver(
        name,
        problem,
        config.inner_lr,
        config.aux_lr,
        config.average,
        key=config.seed + seed,
        radius=config.radius,
    )
    return optax.chain(transform, optax.sgd(config.outer_lr))


def minibatch_plan(config, seed: int, data: Any) -> dict[str, np.ndarray]:
    """Minibatch indices of every step of seed ``seed``, drawn with replacement from
    ``default_rng([config.seed, seed])`` (int32 arrays).

    Returns ``inner`` (``num_steps x inner_batch``, training samples of ``data``),
    ``clean_inner`` (the same shape, drawn from the samples whose label is not
    corrupted: the oracle's batches) and ``outer`` (``num_steps x outer_batch``,
    validation samples).
    """
    rng = np.random.default_rng([config.seed, seed])
    steps, n_train, n_val = config.num_steps, data.x_train.shape[0], data.x_val.shape[0]
    clean = np.flatnonzero(~data.corrupted)
    return {
        "inner": rng.integers(0, n_train, (steps, config.inner_batch)).astype(np.int32),
        "clean_inner": clean[rng.integers(0, clean.size, (steps, config.inner_batch))].astype(
            np.int32
        ),
        "outer": rng.integers(0, n_val, (steps, config.outer_batch)).astype(np.int32),
    }


def batches_at(setup: dict, name: str, t: int, mesh=None) -> tuple:
    """``(inner_batch, outer_batch)`` of step ``t`` for method ``name``: ``(indices,
    inputs, labels)`` of the training split and ``(inputs, labels)`` of the validation
    split of ``setup["data"]`` by ``setup["plan"]`` (the method ``"oracle"`` draws from
    ``clean_inner``), sharded over the ``data`` axis of ``mesh`` (if any)."""
    data, plan = setup["data"], setup["plan"]
    idx = plan["clean_inner" if name == "oracle" else "inner"][t]
    out = plan["outer"][t]
    inner = (idx, data.x_train[idx], data.y_train[idx])
    return parallel.shard_batch((inner, (data.x_val[out], data.y_val[out])), mesh)


def frozen_weights_step(problem: bilevel.BilevelProblem, inner_lr: float):
    """``(x, y, inner_batch, outer_batch) -> (x, y)``: one SGD step on the inner loss
    with ``x`` frozen; the calling convention of
    :func:`benchmarks.problems.cleaning.bilevel_step` (the outer batch is not used)."""

    def step(x, y, inner_batch, outer_batch):
        del outer_batch
        grads = jax.grad(problem.inner_loss, argnums=1)(x, y, inner_batch)
        return x, jax.tree.map(lambda p, g: p - inner_lr * g, y, grads)

    return step


def train_and_time(
    context, trained: list[str], setups: list[dict], compiled: dict, carries: dict,
    fixed: dict, train_one: Callable[[str, dict], dict],
) -> tuple[dict, dict, dict, dict]:  # fmt: skip
    """Trains every method of ``trained`` on every seed's setup, one checkpointed stage
    each (``train_one(name, setup) -> {"final": ..., "curves": ...}``), then times one
    compiled step of every method of ``compiled`` round-robin.

    Returns ``per_seed`` and ``curves`` (name -> one entry per seed), ``times`` (name ->
    the timed steps, seconds) and ``cost`` (name -> ``peak_bytes``, ``step_time_s``,
    ``compile_s``).
    """
    per_seed: dict[str, list[dict]] = {name: [] for name in trained}
    curves: dict[str, list[dict]] = {name: [] for name in trained}
    runs = [(name, setup) for name in trained for setup in setups]
    for name, setup in context.each(runs, lambda run: f"{run[0]} seed {run[1]['seed']}"):
        out = context.stage(
            f"{name}-seed{setup['seed']}", lambda name=name, setup=setup: train_one(name, setup)
        )
        per_seed[name].append(out["final"])
        curves[name].append(out["curves"])
    config = context.config
    times = measure.time_compiled_steps(
        compiled, carries, fixed, config.step_repeats, config.warmup_rounds
    )
    cost = {
        name: {
            "peak_bytes": compiled[name].memory["total"],
            "step_time_s": measure.median(times[name]),
            "compile_s": compiled[name].compile_s,
        }
        for name in compiled
    }
    return per_seed, curves, times, cost


def accuracy_and_bytes_panels(axes, result: dict, trained: list[str], which: str = "") -> None:
    """The first two panels of a weighting study's figure: test accuracy over seeds of
    the ``trained`` methods (MA-SOBA's median and the goal's gap marked), and every
    method's compiled bytes of one donated update step."""
    s, raw, config = result["summary"], result["raw"], result["config"]
    ax = axes[0]
    accs = {m: [r["test_acc"] for r in raw["seeds"][m]] for m in trained}
    title = f"test accuracy, {which}{config['num_seeds']} seeds"
    reporting.seed_boxes(ax, trained, accs, "test accuracy of the final y (fraction)", title)
    if "ma_soba" in s["methods"]:
        reference = s["methods"]["ma_soba"]["test_acc"]
        ax.axhline(reference, color=reporting.color("ma_soba"), lw=0.8, ls=":",
                   label="ma_soba median")  # fmt: skip
        ax.axhline(reference - config["goal_accuracy_gap"], color="tab:red", lw=0.8,
                   ls="--", label="-1 pt")  # fmt: skip
        ax.legend(fontsize=7)
    names = reporting.ordered(s["methods"])
    mib = {m: s["methods"][m]["peak_bytes"] / 2**20 for m in names}
    reporting.method_bars(axes[1], names, {"compiled bytes": mib},
                          "MiB (argument + output + temp - alias)",
                          "compiled bytes of one donated update step")  # fmt: skip
    axes[1].set_ylim(0, None)


def method_and_carry(name: str, config, setup: dict, problem, baseline: bool, mesh, fsdp):
    """``(step, initial carry)`` of method ``name`` on the seed of ``setup``: SGD on
    ``y`` with ``x`` frozen for a ``baseline``, else the chained solver; ``x`` starts at
    ``config.init_logit`` for every sample. The carry is placed on ``mesh`` (if any)."""
    x0 = jnp.full((setup["data"].x_train.shape[0],), config.init_logit, jnp.float32)
    if baseline:
        carry = parallel.place_params((x0, setup["params"]), mesh, fsdp)
        return frozen_weights_step(problem, config.inner_lr), carry
    tx = solver(name, config, problem, setup["seed"])
    return cleaning.bilevel_step(tx), parallel.place_params((x0, tx.init(x0)), mesh, fsdp)


def lower_variable(carry: tuple, baseline: bool) -> Any:
    """The model parameters ``y`` held in a method's carry."""
    return carry[1] if baseline else bilevel.inner_params(carry[1])


def train_method(
    name: str, compiled, config, setup: dict, carry: tuple, baseline: bool,
    batches: Callable[[int], tuple], evaluate: Callable, weight_statistics: Callable,
) -> dict:  # fmt: skip
    """Runs ``config.num_steps`` updates of ``compiled`` from ``carry``; final metrics
    and curves of validation loss and accuracy (and the detection F1 of ``x``) every
    ``config.eval_every`` steps. ``batches(t)`` is step ``t``'s batches, ``evaluate(y,
    inputs, labels)`` the mean loss and accuracy, ``weight_statistics(logits, data)`` the
    solver's summary of ``x``. Returns plain Python values (a checkpointable stage)."""
    data = setup["data"]
    curves: dict[str, list] = {"step": [], "val_loss": [], "val_acc": []}
    if not baseline:
        curves["detect_f1"] = []

    def record(t, carry):
        loss, acc = evaluate(lower_variable(carry, baseline), data.x_val, data.y_val)
        curves["step"].append(t)
        curves["val_loss"].append(float(loss))
        curves["val_acc"].append(float(acc))
        if not baseline:
            curves["detect_f1"].append(cleaning.detection_f1(np.asarray(carry[0]), data.corrupted))

    record(0, carry)
    start = time.perf_counter()
    for t in tqdm(range(config.num_steps), desc=f"{name} seed {setup['seed']}", leave=False):
        carry = compiled.fn(*carry, *batches(t))
        if (t + 1) % config.eval_every == 0 or t + 1 == config.num_steps:
            record(t + 1, carry)
    jax.block_until_ready(carry)
    train_s = time.perf_counter() - start

    y = lower_variable(carry, baseline)
    test_loss, test_acc = evaluate(y, data.x_test, data.y_test)
    leaves = jax.tree.leaves((carry[0], y))
    final = {
        "test_acc": float(test_acc),
        "test_loss": float(test_loss),
        "val_acc": curves["val_acc"][-1],
        "val_loss": curves["val_loss"][-1],
        "finite": bool(all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)),
        "train_s": train_s,
    }
    if not baseline:
        final.update(weight_statistics(np.asarray(carry[0]), data))
        final["nonfinite_steps"] = int(bilevel.find_bilevel_state(carry[1]).nonfinite)
    return {"final": final, "curves": curves}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarize(per_seed: dict[str, list[dict]], cost: dict[str, dict], keys) -> dict:
    """name -> medians over seeds of the per-seed figures ``keys`` (``None`` where a
    method has none), the spread of test accuracy, the diverged seeds and the cost
    columns with their ratios to MA-SOBA's. A method measured but not trained (a
    memory-only variant) gets its cost only."""
    rows = {}
    for name in cost:
        records = per_seed.get(name)
        entry: dict[str, Any] = {}
        if records:
            entry = {key: _median([r.get(key) for r in records]) for key in keys}
            accs = [r["test_acc"] for r in records]
            entry["test_acc_min"], entry["test_acc_max"] = min(accs), max(accs)
            entry["diverged"] = sum(not r["finite"] for r in records)
            entry["trained"] = True
        else:
            entry.update(test_acc=None, detect_f1=None, trained=False)
        entry.update(cost[name])
        rows[name] = entry
    reference = rows.get("ma_soba")
    if reference is not None:
        for entry in rows.values():
            entry["peak_bytes_ratio"] = entry["peak_bytes"] / reference["peak_bytes"]
            entry["step_time_ratio"] = entry["step_time_s"] / reference["step_time_s"]
    return rows


def rank_goals(rows: dict, config) -> tuple[dict, float | None]:
    """The issue's goals for every trained BROS rank, and the memory reduction.

    A rank is within the accuracy goal when its median test accuracy is at most
    ``goal_accuracy_gap`` below MA-SOBA's (better also counts). The reduction is the
    largest ``1 - bytes(BROS) / bytes(MA-SOBA)`` among those ranks (``None`` if none).
    """
    goal: dict[str, Any] = {}
    reference = rows.get("ma_soba")
    if reference is None or reference["test_acc"] is None:
        return goal, None
    best = None
    for name, m in rows.items():
        if methods.bros_rank(name) is None or name.endswith("_naive") or not m["trained"]:
            continue
        gap = reference["test_acc"] - m["test_acc"]
        within = bool(gap <= config.goal_accuracy_gap + 1e-9)
        saved = 1.0 - m["peak_bytes_ratio"]
        goal[f"{name}_accuracy_gap"] = gap
        goal[f"{name}_within_1pt_of_ma_soba"] = within
        goal[f"{name}_bytes_saved"] = saved
        goal[f"{name}_time_ratio_ok"] = bool(m["step_time_ratio"] <= config.goal_time_ratio)
        if within:
            best = saved if best is None else max(best, saved)
    return goal, best
