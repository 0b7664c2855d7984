"""Hyper-data cleaning: does BROS clean labels as well as MA-SOBA, with less memory?

Setup. scikit-learn's digits with half of the training labels replaced by a wrong class
(:func:`benchmarks.bilevel_problems.cleaning_data`: 1077 train, 360 clean validation,
360 clean test samples). The lower variable ``y`` is an MLP (``config.hidden``) trained
on the training loss weighted per sample by ``sigmoid(x_i)``, with an l2 term; the upper
variable ``x`` holds one weight logit per training sample (initialised at 0) and
minimises the validation cross-entropy of ``y``
(:func:`benchmarks.bilevel_problems.cleaning_problem`). Every update draws an inner
minibatch of training samples and an outer minibatch of validation samples.

Methods (the summary names):

* ``soba``, ``ma_soba``, ``bros_r{rank}`` (factored BROS) from :mod:`optstab.bilevel`,
  chained with ``optax.sgd(outer_lr)`` on ``x``; SOBA uses MA-SOBA's step sizes, each
  BROS rank its own (``method_steps``), all tuned on the validation split by one
  protocol (see ``configs/bilevel_cleaning.py``);
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
steps (curves).

Cost, per method, of the one update step that training runs (``x`` and the optimizer
state donated): compiled bytes (argument + output + temp - alias, from XLA's memory
analysis), compile time, and the median step time of ``step_repeats`` calls timed
round-robin over all methods in the same run, after training.

Resuming and devices. With a checkpoint directory every method x seed training is
saved when it finishes; a rerun with the same config restores those and trains the
rest (the compiled bytes and step times are measured again: they take seconds). With
a mesh (:mod:`benchmarks.parallel`), the step is compiled for minibatches sharded
over the ``data`` axis (``inner_batch`` and ``outer_batch`` must divide by its size)
and a replicated ``x``, optimizer state and MLP (with ``fsdp``, large MLP leaves and
their companions in the state are split); the compiled bytes are then per device.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from benchmarks import bilevel_problems as problems
from benchmarks import measure, models, parallel, reporting, resume
from optstab import bilevel

BASELINES = ("no_cleaning", "oracle")


# ---------------------------------------------------------------------------
# Per-seed data, initialisation and minibatches


def seed_setup(config: ml_collections.ConfigDict, seed: int) -> dict:
    """What every method shares within seed ``seed``: data, initial MLP, batch order."""
    data = problems.cleaning_data(config.seed + seed, config.corruption)
    sizes = (data.x_train.shape[1], *config.hidden, 10)
    params = models.mlp_init(jax.random.fold_in(jax.random.key(config.seed), seed), sizes)
    rng = np.random.default_rng([config.seed, seed])
    n_train, n_val = data.x_train.shape[0], data.x_val.shape[0]
    steps = config.num_steps
    clean = np.flatnonzero(~data.corrupted)
    return {
        "seed": seed,
        "data": data,
        "params": params,
        # minibatch indices of every step, drawn with replacement
        "inner": rng.integers(0, n_train, (steps, config.inner_batch)).astype(np.int32),
        "clean_inner": clean[rng.integers(0, clean.size, (steps, config.inner_batch))].astype(
            np.int32
        ),
        "outer": rng.integers(0, n_val, (steps, config.outer_batch)).astype(np.int32),
    }


def batches_at(setup: dict, name: str, t: int, mesh=None) -> tuple[tuple, tuple]:
    """``(inner_batch, outer_batch)`` of step ``t`` for method ``name``, sharded over
    the ``data`` axis of ``mesh`` (if any)."""
    data = setup["data"]
    idx = setup["clean_inner" if name == "oracle" else "inner"][t]
    out = setup["outer"][t]
    inner = (idx, data.x_train[idx], data.y_train[idx])
    return parallel.shard_batch((inner, (data.x_val[out], data.y_val[out])), mesh)


# ---------------------------------------------------------------------------
# Methods: the update step and its initial carry


def plain_step(problem: bilevel.BilevelProblem, inner_lr: float):
    """``(x, y, inner_batch, outer_batch) -> (x, y)``: one SGD step on ``y``, ``x`` frozen.

    Same calling convention as :func:`benchmarks.bilevel_problems.bilevel_step`, so
    the baselines run through the same loop (the outer batch is not used).
    """

    def step(x, y, inner_batch, outer_batch):
        del outer_batch
        grads = jax.grad(problem.inner_loss, argnums=1)(x, y, inner_batch)
        return x, jax.tree.map(lambda p, g: p - inner_lr * g, y, grads)

    return step


def make_method(name: str, config: ml_collections.ConfigDict, setup: dict, mesh=None, fsdp=False):
    """``(step, initial carry)`` of method ``name`` on the seed of ``setup``; the carry
    is placed on ``mesh`` (if any) by :func:`benchmarks.parallel.place_params`."""
    problem = problems.cleaning_problem(setup["params"], config.l2)
    x0 = jnp.full((setup["data"].x_train.shape[0],), config.init_logit, jnp.float32)
    if name in BASELINES:
        carry = parallel.place_params((x0, setup["params"]), mesh, fsdp)
        return plain_step(problem, config.inner_lr), carry
    steps = config.method_steps.get(name, {})
    tx = problems.make_solver(
        name,
        problem,
        steps.get("inner_lr", config.inner_lr),
        steps.get("aux_lr", config.aux_lr),
        config.average,
        config.outer_lr,
        key=config.seed + setup["seed"],
        radius=config.radius,
    )
    return problems.bilevel_step(tx), parallel.place_params((x0, tx.init(x0)), mesh, fsdp)


def lower_variable(name: str, carry: tuple) -> Any:
    """The MLP parameters ``y`` held in a method's carry."""
    return carry[1] if name in BASELINES else bilevel.inner_params(carry[1])


@jax.jit
def _evaluate(params, inputs, labels):
    loss = jnp.mean(problems.per_sample_loss(params, inputs, labels))
    return loss, models.accuracy(params, inputs, labels)


# ---------------------------------------------------------------------------
# Training


def train(
    name: str, compiled: problems.CompiledStep, config, setup: dict, mesh=None, fsdp=False
) -> dict:
    """Runs ``num_steps`` updates of ``name`` on one seed; final metrics and curves.

    Returns plain dicts, lists and Python scalars (a checkpointable stage).
    """
    data = setup["data"]
    _, carry = make_method(name, config, setup, mesh, fsdp)
    carry = problems.fresh_copy(carry)
    curves: dict[str, list] = {"step": [], "val_loss": [], "val_acc": [], "detect_f1": []}

    def record(t, carry):
        loss, acc = _evaluate(lower_variable(name, carry), data.x_val, data.y_val)
        curves["step"].append(t)
        curves["val_loss"].append(float(loss))
        curves["val_acc"].append(float(acc))
        if name not in BASELINES:
            curves["detect_f1"].append(problems.detection_f1(np.asarray(carry[0]), data.corrupted))

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
        record_["detect_f1"] = problems.detection_f1(logits, data.corrupted)
        record_["clean_weight"] = float(weights[~data.corrupted].mean())
        record_["corrupted_weight"] = float(weights[data.corrupted].mean())
    if not curves["detect_f1"]:
        del curves["detect_f1"]
    return {"final": record_, "curves": curves}


def compile_method(
    name: str, config, setup: dict, mesh=None, fsdp=False
) -> tuple[problems.CompiledStep, tuple, tuple]:
    """The compiled donated step of ``name``, its initial carry and a fixed batch
    (placed on ``mesh``, if any, as the training places them)."""
    step, carry = make_method(name, config, setup, mesh, fsdp)
    batch = batches_at(setup, name, 0, mesh)
    return problems.compile_step(step, *carry, *batch, mesh=mesh), carry, batch


# ---------------------------------------------------------------------------
# Summary


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarize(per_seed: dict[str, list[dict]], cost: dict[str, dict]) -> dict:
    """name -> medians over seeds of the per-seed records, and the cost columns."""
    methods = {}
    for name in cost:
        records = per_seed.get(name)
        entry: dict[str, Any] = {}
        if records:
            accs = [r["test_acc"] for r in records]
            for key in ("test_acc", "detect_f1", "test_loss", "val_acc", "val_loss"):
                entry[key] = _median([r[key] for r in records])
            for key in ("clean_weight", "corrupted_weight"):
                entry[key] = _median([r[key] for r in records])
            entry["test_acc_min"], entry["test_acc_max"] = min(accs), max(accs)
            entry["diverged"] = sum(not r["finite"] for r in records)
            entry["trained"] = True
        else:
            entry.update(test_acc=None, detect_f1=None, trained=False)
        entry.update(cost[name])
        methods[name] = entry
    reference = methods.get("ma_soba")
    if reference is not None:
        for entry in methods.values():
            entry["peak_bytes_ratio"] = entry["peak_bytes"] / reference["peak_bytes"]
            entry["step_time_ratio"] = entry["step_time_s"] / reference["step_time_s"]
    return methods


def goal_checks(methods: dict, config: ml_collections.ConfigDict) -> tuple[dict, float | None]:
    """The issue's goals for every trained BROS rank, and the memory reduction.

    A rank qualifies when its median test accuracy is at most ``goal_accuracy_gap``
    below MA-SOBA's (being better also qualifies). The reduction is the largest
    ``1 - bytes(BROS) / bytes(MA-SOBA)`` among qualifying ranks (``None`` if none).
    """
    goal: dict[str, Any] = {}
    reference = methods.get("ma_soba")
    if reference is None or reference["test_acc"] is None:
        return goal, None
    best = None
    for name, m in methods.items():
        if problems.bros_rank(name) is None or name.endswith("_naive") or not m["trained"]:
            continue
        gap = reference["test_acc"] - m["test_acc"]
        within = bool(gap <= config.goal_accuracy_gap + 1e-9)
        goal[f"{name}_accuracy_gap"] = gap
        goal[f"{name}_within_1pt_of_ma_soba"] = within
        goal[f"{name}_time_ratio_ok"] = bool(m["step_time_ratio"] <= config.goal_time_ratio)
        if within:
            saved = 1.0 - m["peak_bytes_ratio"]
            best = saved if best is None else max(best, saved)
    return goal, best


def run(
    config: ml_collections.ConfigDict,
    *,
    checkpoint_dir: Any = None,
    mesh: Any = "auto",
    fsdp: bool = False,
) -> dict:
    """Trains every method on every seed, then measures the cost of each update step.

    Args:
      config: ``configs/bilevel_cleaning.py``'s ``get_config(size)``.
      checkpoint_dir: None, a directory or a :class:`benchmarks.resume.Checkpointer`:
        each method x seed training is saved when it finishes, and a rerun with the
        same config trains only what is missing.
      mesh: see :mod:`benchmarks.parallel` (``"auto"``: data parallel over all
        devices when there are several). Minibatches are sharded over its ``data``
        axis, so ``inner_batch`` and ``outer_batch`` must divide by its size
        (``ValueError`` otherwise); compiled bytes are then per device.
      fsdp: with a mesh, split large MLP leaves (and their optimizer state) over its
        ``data`` axis.
    """
    checkpointer = resume.open_checkpointer(checkpoint_dir, "bilevel_cleaning", config)
    mesh = parallel.resolve_mesh(mesh)
    trained = list(config.methods)
    names = trained + [n for n in config.memory_only_methods if n not in trained]
    for name in names:
        if name not in BASELINES and not problems.is_bilevel(name):
            raise ValueError(f"unknown method {name!r}")
    setups = [seed_setup(config, s) for s in range(config.num_seeds)]

    compiled, carries, fixed = {}, {}, {}
    for name in tqdm(names, desc="compile"):
        compiled[name], carries[name], fixed[name] = compile_method(
            name, config, setups[0], mesh, fsdp
        )

    per_seed: dict[str, list[dict]] = {name: [] for name in trained}
    curves: dict[str, list[dict]] = {name: [] for name in trained}
    with tqdm(total=len(trained) * len(setups), desc="bilevel_cleaning") as bar:
        for name in trained:
            for setup in setups:
                out = checkpointer.stage(
                    f"{name}-seed{setup['seed']}",
                    lambda name=name, setup=setup: train(
                        name, compiled[name], config, setup, mesh, fsdp
                    ),
                )
                per_seed[name].append(out["final"])
                curves[name].append(out["curves"])
                bar.update()

    times = problems.time_compiled_steps(
        compiled, carries, fixed, config.step_repeats, config.warmup_rounds
    )
    cost = {
        name: {
            "peak_bytes": compiled[name].memory["total"],
            "step_time_s": measure.median(times[name]),
            "compile_s": compiled[name].compile_s,
        }
        for name in names
    }
    methods = summarize(per_seed, cost)
    goal, reduction = goal_checks(methods, config)
    first = setups[0]
    result = {
        "study": "bilevel_cleaning",
        "config": config,
        "environment": reporting.environment(),
        "summary": {
            "methods": methods,
            "memory_reduction_vs_ma_soba": reduction,
            "goal": goal,
            "num_params": models.num_params(first["params"]),
            "num_train": int(first["data"].x_train.shape[0]),
            "corrupted_fraction": float(np.mean(first["data"].corrupted)),
        },
        "raw": {
            "seeds": per_seed,
            "curves": curves,
            "step_times_s": times,
            "memory_bytes": {name: compiled[name].memory for name in names},
        },
        "mesh": parallel.describe(mesh),
    }
    checkpointer.finish()
    return reporting.to_jsonable(result)


# ---------------------------------------------------------------------------
# Table and plot


def table(result: dict) -> str:
    """One row per method, then the memory reduction and the goal checks."""
    s = result["summary"]
    config = result["config"]
    headers = [
        "method",
        "test_acc",
        "acc_min",
        "acc_max",
        "detect_f1",
        "diverged",
        "w_clean",
        "w_corrupt",
        "peak_MiB",
        "bytes_ratio",
        "step_ms",
        "time_ratio",
        "compile_s",
    ]
    rows = [
        [
            name,
            m["test_acc"],
            m.get("test_acc_min"),
            m.get("test_acc_max"),
            m["detect_f1"],
            f"{m['diverged']}/{config['num_seeds']}" if m["trained"] else None,
            m.get("clean_weight"),
            m.get("corrupted_weight"),
            m["peak_bytes"] / 2**20,
            m.get("peak_bytes_ratio"),
            1e3 * m["step_time_s"],
            m.get("step_time_ratio"),
            m["compile_s"],
        ]
        for name, m in s["methods"].items()
    ]
    hidden = "x".join(str(h) for h in config["hidden"])
    reduction = s["memory_reduction_vs_ma_soba"]
    lines = [
        f"MLP 64-{hidden}-10 ({s['num_params'] / 1e6:.2f}M params), {s['num_train']} train "
        f"samples, {100 * s['corrupted_fraction']:.0f}% corrupted; {config['num_steps']} steps, "
        f"batch {config['inner_batch']}/{config['outer_batch']}; median over "
        f"{config['num_seeds']} seeds; ratios vs ma_soba; on "
        f"{result['environment']['device_kind']}",
        reporting.format_table(headers, rows),
        "memory reduction vs ma_soba (best BROS rank within 1 pt): "
        + ("none qualifies" if reduction is None else f"{100 * reduction:.1f}%")
        + (" (more bytes than ma_soba)" if reduction is not None and reduction < 0 else ""),
        f"goals (BROS test acc within {100 * config['goal_accuracy_gap']:.0f} pt of ma_soba, "
        f"step time <= {config['goal_time_ratio']}x):",
        reporting.format_goals(s["goal"]),
    ]
    return "\n".join(lines)


def plot(result: dict, path) -> Any:
    """Test accuracy over seeds, compiled bytes, and validation-loss / F1 curves."""
    reporting.plot_style()
    import matplotlib.pyplot as plt

    s = result["summary"]
    raw = result["raw"]
    methods = list(s["methods"])
    trained = [m for m in methods if m in raw["seeds"]]
    colors = {m: f"C{i}" for i, m in enumerate(trained)}  # one colour per method throughout
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))

    ax = axes[0]
    accs = [[r["test_acc"] for r in raw["seeds"][m]] for m in trained]
    ax.boxplot(accs, showfliers=False)
    rng = np.random.default_rng(0)
    for i, values in enumerate(accs, start=1):
        jitter = rng.uniform(-0.15, 0.15, len(values))
        ax.scatter(i + jitter, values, s=10, zorder=3, color=colors[trained[i - 1]])
    if "ma_soba" in s["methods"]:
        reference = s["methods"]["ma_soba"]["test_acc"]
        ax.axhline(reference, color="tab:blue", lw=0.8, ls=":", label="ma_soba median")
        ax.axhline(reference - result["config"]["goal_accuracy_gap"], color="tab:red", lw=0.8,
                   ls="--", label="-1 pt")  # fmt: skip
        ax.legend(fontsize=7)
    ax.set_xticks(range(1, len(trained) + 1), trained, rotation=35, ha="right")
    ax.set_ylabel("test accuracy (final y)")
    ax.set_title(f"test accuracy over {result['config']['num_seeds']} seeds")

    ax = axes[1]
    x = np.arange(len(methods))
    ax.bar(x, [s["methods"][m]["peak_bytes"] / 2**20 for m in methods], 0.6, color="tab:green")
    ax.set_xticks(x, methods, rotation=35, ha="right")
    ax.set_ylabel("MiB (argument + output + temp - alias)")
    ax.set_title("compiled bytes of one donated update step")

    for ax, key, title in (
        (axes[2], "val_loss", "validation loss (median over seeds)"),
        (axes[3], "detect_f1", "detection F1 of x (median over seeds)"),
    ):
        for m in trained:
            runs = raw["curves"][m]
            if key not in runs[0]:
                continue
            values = np.median(np.asarray([r[key] for r in runs], dtype=float), axis=0)
            ax.plot(runs[0]["step"], values, label=m, lw=1.2, color=colors[m])
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    config = result["config"]
    fig.suptitle(
        f"hyper-data cleaning on digits ({100 * s['corrupted_fraction']:.0f}% corrupted labels), "
        f"MLP hidden {tuple(config['hidden'])}, {config['num_steps']} steps"
    )
    return reporting.save_figure(fig, path)
