"""Overhead: what does each stability method add to a training step's time and memory?

Setup. A ~21M-parameter MLP (``config.sizes``) on a fixed batch of random inputs and
labels. For every method the study compiles one jitted train step (forward, backward,
optimizer update, ``params`` and optimizer state donated) and, as a secondary figure,
the optimizer update ``tx.update`` alone (optimizer state donated).

Methods: ``adamw`` (the reference), ``gnmr_chain`` = ``chain(optstab.gnmr(), adamw)``
and ``gnmr_wrap`` = ``optstab.gnmr_wrap(adamw)`` at the library defaults, and the
baselines ``clip_by_global_norm``, ``zclip``, ``spam``, ``adagc`` and ``skip_step``.

Measured, per method:

* compile time (lower + compile), apart from step time;
* compiled memory from XLA's memory analysis: argument + output + temp - alias bytes;
* step time: the median of ``step_repeats`` calls after ``warmup_rounds`` untimed
  ones. The methods are timed round-robin (rotated order each round) so that load
  from other processes on the machine spreads over all of them;
* ratios against ``adamw`` from the same run (and, as a secondary figure less
  sensitive to other processes' load, the ratio of the fastest repeats).

The optimizer update costs the same whatever the batch, while forward and backward
grow with it, so time ratios depend on ``batch_size``; on a CPU the update is a large
share of the step.

Resume: the round-robin step timings and the update timings are each one checkpointed
stage; compilation (and so compile time and memory) is redone on a resumed run.

Mesh: with a device mesh the batch is split over its ``data`` axis, parameters and
optimizer state are replicated (or, with ``fsdp``, their large leaves split), and the
compiled memory is that of one device's program.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

import optstab
from benchmarks import measure, models, parallel, reporting, resume
from optstab.stability import baselines

GNMR_METHODS = ("gnmr_chain", "gnmr_wrap")


def make_optimizer(name: str, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimizer of method ``name`` (see the module docstring)."""

    def adamw() -> optax.GradientTransformation:
        return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)

    factories = {
        "adamw": adamw,
        "gnmr_chain": lambda: optax.chain(optstab.gnmr(), adamw()),
        "gnmr_wrap": lambda: optstab.gnmr_wrap(adamw()),
        "clip_by_global_norm": lambda: optax.chain(
            optax.clip_by_global_norm(config.clip_norm), adamw()
        ),
        "zclip": lambda: optax.chain(baselines.zclip(), adamw()),
        "spam": lambda: baselines.spam(config.learning_rate, weight_decay=config.weight_decay),
        "adagc": lambda: optax.chain(baselines.adagc(), adamw()),
        "skip_step": lambda: baselines.skip_step(adamw()),
    }
    if name not in factories:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(factories)}")
    return factories[name]()


def make_batch(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """A fixed batch of standard-normal inputs and uniform labels."""
    kx, ky = jax.random.split(jax.random.key(config.seed + 1))
    x = jax.random.normal(kx, (config.batch_size, config.sizes[0]))
    y = jax.random.randint(ky, (config.batch_size,), 0, config.sizes[-1])
    return x, y


_init_params = jax.jit(models.mlp_init, static_argnums=1)


def make_params(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, fsdp: bool = False
) -> Any:
    """Fresh initial parameters (a new buffer each call, since steps donate them)."""
    params = _init_params(jax.random.key(config.seed), tuple(config.sizes))
    return parallel.place_params(params, mesh, fsdp)


def train_step_fn(tx: optax.GradientTransformation, state_shardings: Any = None):
    """``(params, opt_state, x, y) -> (params, opt_state, loss)``.

    With ``state_shardings`` (those of ``(params, opt_state)``) the new state keeps
    them, so that the compiled step accepts its own output.
    """

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(models.cross_entropy)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        state = (optax.apply_updates(params, updates), opt_state)
        if state_shardings is not None:
            state = jax.lax.with_sharding_constraint(state, state_shardings)
        return *state, loss

    return step


def update_fn(tx: optax.GradientTransformation, state_shardings: Any = None):
    """``tx.update``; with ``state_shardings`` the new state keeps them (as above)."""
    if state_shardings is None:
        return tx.update

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return updates, jax.lax.with_sharding_constraint(opt_state, state_shardings)

    return update


def init_fn(tx: optax.GradientTransformation, mesh: jax.sharding.Mesh | None, fsdp: bool):
    """Jitted ``tx.init``. With a mesh, the state is placed by the parameters' rule
    (``parallel.place_params``): replicated, or with ``fsdp`` its large leaves split,
    as moments shaped like the parameters should be (XLA would replicate them)."""
    init = jax.jit(tx.init)
    if mesh is None:
        return init
    return lambda params: parallel.place_params(init(params), mesh, fsdp)


def shardings_of(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """The shardings of ``tree``'s arrays, or None without a mesh."""
    return None if mesh is None else jax.tree.map(lambda leaf: leaf.sharding, tree)


def prepare(name: str, config: ml_collections.ConfigDict, batch, grads, mesh, fsdp) -> dict:
    """Compiles the train step and the update of ``name``: executables, times, memory.

    The executables take the shardings of their example arguments: ``batch`` as the
    caller placed it, parameters (and so the optimizer state) by ``mesh`` and ``fsdp``.
    """
    tx = make_optimizer(name, config)
    init = init_fn(tx, mesh, fsdp)
    params = make_params(config, mesh, fsdp)
    opt_state = init(params)
    step, step_compile_s = measure.compile_timed(
        train_step_fn(tx, shardings_of((params, opt_state), mesh)),
        params,
        opt_state,
        *batch,
        donate_argnums=(0, 1),
    )
    update, update_compile_s = measure.compile_timed(
        update_fn(tx, shardings_of(opt_state, mesh)),
        grads,
        opt_state,
        params,
        donate_argnums=(1,),
    )
    return {
        "init": init,
        "step": step,
        "update": update,
        "step_compile_s": step_compile_s,
        "update_compile_s": update_compile_s,
        "step_memory": measure.memory_bytes(step),
        "update_memory": measure.memory_bytes(update),
    }


def ratios(values: dict[str, float], reference: str = "adamw") -> dict[str, float]:
    """``values[name] / values[reference]`` for every name."""
    return {name: value / values[reference] for name, value in values.items()}


def run(
    config: ml_collections.ConfigDict,
    *,
    checkpoint_dir: Any = None,
    mesh: Any = "auto",
    fsdp: bool = False,
) -> dict:
    """Compiles and times every method of ``config.methods``; returns the JSON-ready result.

    Args:
      config: ``configs/overhead.py``'s ``get_config(size)``.
      checkpoint_dir: None, a directory or a :class:`benchmarks.resume.Checkpointer`:
        the step timings and the update timings are saved when each pass finishes; a
        rerun with the same config recompiles every method (compile time and memory
        are measured again) and reuses the saved timings.
      mesh: see :mod:`benchmarks.parallel` (``"auto"``: data parallel over all
        devices when there are several). ``config.batch_size`` must be divisible by
        the number of devices on the ``data`` axis (else a ValueError).
      fsdp: with a mesh, split large parameter and optimizer-state leaves over its
        ``data`` axis.
    """
    checkpointer = resume.open_checkpointer(checkpoint_dir, "overhead", config)
    mesh = parallel.resolve_mesh(mesh)
    methods = list(config.methods)
    if "adamw" not in methods:
        raise ValueError("the overhead study needs 'adamw' as its reference method")
    batch = parallel.shard_batch(make_batch(config), mesh)
    params = make_params(config, mesh, fsdp)
    grads = jax.jit(jax.grad(models.cross_entropy))(params, *batch)
    num_params = models.num_params(params)

    prepared = {}
    for name in tqdm(methods, desc="compile"):
        prepared[name] = prepare(name, config, batch, grads, mesh, fsdp)

    def step_runner(name):
        compiled = prepared[name]["step"]

        def run_step(state):
            params, opt_state, _ = compiled(*state, *batch)
            return params, opt_state

        return run_step

    def update_runner(name):
        compiled = prepared[name]["update"]
        return lambda opt_state: compiled(grads, opt_state, params)[1]

    def fresh_state(name):
        own_params = make_params(config, mesh, fsdp)  # the step donates its params
        return own_params, prepared[name]["init"](own_params)

    def timing_pass(runner, state, repeats, desc):
        def compute():
            times, _ = measure.interleaved_times(
                {name: runner(name) for name in methods},
                {name: state(name) for name in methods},
                repeats=repeats,
                warmup=config.warmup_rounds,
                desc=desc,
            )
            return {name: np.asarray(t) for name, t in times.items()}

        return compute

    # All methods are timed together, round-robin: each pass is one stage.
    step_times = checkpointer.stage(
        "step_times", timing_pass(step_runner, fresh_state, config.step_repeats, "train step")
    )
    update_times = checkpointer.stage(
        "update_times",
        timing_pass(
            update_runner, lambda name: fresh_state(name)[1], config.update_repeats, "update only"
        ),
    )

    step_median = {name: measure.median(step_times[name]) for name in methods}
    step_min = {name: float(min(step_times[name])) for name in methods}
    update_median = {name: measure.median(update_times[name]) for name in methods}
    step_memory = {name: prepared[name]["step_memory"] for name in methods}
    update_memory = {name: prepared[name]["update_memory"] for name in methods}
    time_ratio = ratios(step_median)
    memory_ratio = ratios({name: m["total"] for name, m in step_memory.items()})
    goal: dict[str, Any] = {}
    for name in GNMR_METHODS:
        if name in methods:
            goal[f"{name}_time_ratio_ok"] = time_ratio[name] <= config.goal_time_ratio
            goal[f"{name}_memory_ratio_ok"] = memory_ratio[name] <= config.goal_memory_ratio
    summary = {
        "time_ratio": time_ratio,
        # Secondary: ratio of the fastest repeats, less sensitive to load from other
        # processes than the median.
        "time_ratio_min": ratios(step_min),
        "memory_ratio": memory_ratio,
        "update_time_ratio": ratios(update_median),
        "update_memory_ratio": ratios({name: m["total"] for name, m in update_memory.items()}),
        "step_time_s": step_median,
        "step_time_min_s": step_min,
        "update_time_s": update_median,
        "memory_bytes": {name: m["total"] for name, m in step_memory.items()},
        "compile_time_s": {name: prepared[name]["step_compile_s"] for name in methods},
        "update_compile_time_s": {name: prepared[name]["update_compile_s"] for name in methods},
        "params": num_params,
        "goal": goal,
    }
    result = {
        "study": "overhead",
        "config": config,
        "environment": reporting.environment(),
        "mesh": parallel.describe(mesh),
        "summary": summary,
        "raw": {
            "step_times_s": step_times,
            "update_times_s": update_times,
            "step_memory_bytes": step_memory,
            "update_memory_bytes": update_memory,
        },
    }
    checkpointer.finish()
    return reporting.to_jsonable(result)


def table(result: dict) -> str:
    """The one-screen summary: one row per method, then the goal checks."""
    s = result["summary"]
    headers = [
        "method",
        "step_ms",
        "time_ratio",
        "ratio_of_min",
        "update_ms",
        "update_ratio",
        "memory_MiB",
        "memory_ratio",
        "compile_s",
    ]
    rows = [
        [
            name,
            1e3 * s["step_time_s"][name],
            s["time_ratio"][name],
            s["time_ratio_min"][name],
            1e3 * s["update_time_s"][name],
            s["update_time_ratio"][name],
            s["memory_bytes"][name] / 2**20,
            s["memory_ratio"][name],
            s["compile_time_s"][name],
        ]
        for name in s["time_ratio"]
    ]
    config = result["config"]
    lines = [
        f"{s['params'] / 1e6:.1f}M params, batch {config['batch_size']}, "
        f"median of {config['step_repeats']} steps / {config['update_repeats']} updates, "
        f"on {result['environment']['device_kind']}",
        reporting.format_table(headers, rows),
        "goals (GNMR time ratio <= "
        f"{config['goal_time_ratio']}, memory ratio <= {config['goal_memory_ratio']}):",
        reporting.format_goals(s["goal"]),
    ]
    return "\n".join(lines)


def plot(result: dict, path) -> Any:
    """Bar charts of the time ratios (step and update alone) and the memory ratios."""
    reporting.plot_style()
    import matplotlib.pyplot as plt

    s = result["summary"]
    config = result["config"]
    names = list(s["time_ratio"])
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))

    ax = axes[0]
    width = 0.4
    ax.bar(x - width / 2, [s["time_ratio"][n] for n in names], width, label="train step")
    ax.bar(x + width / 2, [s["update_time_ratio"][n] for n in names], width, label="update alone")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(config["goal_time_ratio"], color="tab:red", ls="--", lw=0.8, label="goal (GNMR)")
    ax.set_ylabel("median time / adamw")
    ax.set_title("time ratio vs adamw")
    ax.legend()

    ax = axes[1]
    ax.bar(x, [s["memory_ratio"][n] for n in names], 0.6, color="tab:green")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(config["goal_memory_ratio"], color="tab:red", ls="--", lw=0.8, label="goal (GNMR)")
    ax.set_ylabel("compiled bytes / adamw")
    ax.set_title("train-step memory ratio (arg + out + temp - alias)")
    ax.legend()
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, ha="right")
        low = min(min(p.get_height() for p in ax.patches), 1.0)
        ax.set_ylim(max(0.0, low - 0.1), None)
    fig.suptitle(
        f"overhead: {s['params'] / 1e6:.1f}M-param MLP, batch {config['batch_size']}, "
        f"{result['environment']['device_kind']}"
    )
    return reporting.save_figure(fig, path)
