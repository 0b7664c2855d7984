"""Overhead: what does each stability method add to a training step's time and memory?

Setup. A ~21M-parameter MLP (``config.sizes``) on a fixed batch of random inputs and
labels. For every method the study compiles one jitted train step (forward, backward,
optimizer update, ``params`` and optimizer state donated) and, as a secondary figure,
the optimizer update ``tx.update`` alone (optimizer state donated).

Methods (:mod:`benchmarks.problems.methods`): ``adamw`` (the reference),
``gnmr_chain`` = ``chain(optstab.gnmr(), adamw)`` and ``gnmr_wrap`` =
``optstab.gnmr_wrap(adamw)`` at the library defaults, and the peers
``clip_by_global_norm``, ``zclip``, ``spam``, ``adagc`` and ``skip_step``.

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

Stages: the round-robin step timings and the update timings are one stage each;
compilation (and so compile time and memory) is redone on a resumed run.

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

from benchmarks.harness import Context, Study, measure, parallel, reporting
from benchmarks.problems import methods, models


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> dict:
    """Every method's optimizer (unknown names and bad settings raise here)."""
    if "adamw" not in config.methods:
        raise ValueError("the overhead study needs 'adamw' as its reference method")
    parallel.check_batch(config.batch_size, mesh, "batch_size")
    return {name: methods.optimizer(name, config).transform for name in config.methods}


def make_batch(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """A fixed batch of standard-normal inputs and uniform labels."""
    kx, ky = jax.random.split(jax.random.key(config.seed + 1))
    x = jax.random.normal(kx, (config.batch_size, config.sizes[0]))
    y = jax.random.randint(ky, (config.batch_size,), 0, config.sizes[-1])
    return x, y


_init_params = jax.jit(models.mlp_init, static_argnums=1)


def make_params(config: ml_collections.ConfigDict, mesh=None, fsdp: bool = False) -> Any:
    """Fresh initial parameters (a new buffer each call, since steps donate them)."""
    params = _init_params(jax.random.key(config.seed), tuple(config.sizes))
    return parallel.place_params(params, mesh, fsdp)


def train_step_fn(tx: optax.GradientTransformation, state_shardings: Any = None):
    """``(params, opt_state, x, y) -> (params, opt_state, loss)``; the new state keeps
    ``state_shardings`` (:func:`benchmarks.harness.parallel.shardings_of`)."""

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(models.cross_entropy)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        state = (optax.apply_updates(params, updates), opt_state)
        return *parallel.constrain(state, state_shardings), loss

    return step


def update_fn(tx: optax.GradientTransformation, state_shardings: Any = None):
    """``tx.update``; the new optimizer state keeps ``state_shardings`` (as above)."""

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return updates, parallel.constrain(opt_state, state_shardings)

    return update


def init_fn(tx: optax.GradientTransformation, mesh, fsdp: bool):
    """Jitted ``tx.init``. With a mesh, the state is placed by the parameters' rule
    (``parallel.place_params``): replicated, or with ``fsdp`` its large leaves split,
    as moments shaped like the parameters should be (XLA would replicate them)."""
    init = jax.jit(tx.init)
    if mesh is None:
        return init
    return lambda params: parallel.place_params(init(params), mesh, fsdp)


def compile_method(tx, config, batch, grads, mesh, fsdp) -> dict:
    """Compiles the train step and the update of one optimizer: executables, seconds,
    bytes. The executables take the shardings of their example arguments."""
    init = init_fn(tx, mesh, fsdp)
    params = make_params(config, mesh, fsdp)
    opt_state = init(params)
    step, step_compile_s = measure.compile_timed(
        train_step_fn(tx, parallel.shardings_of((params, opt_state), mesh)),
        params,
        opt_state,
        *batch,
        donate_argnums=(0, 1),
    )
    update, update_compile_s = measure.compile_timed(
        update_fn(tx, parallel.shardings_of(opt_state, mesh)),
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


def measure_all(optimizers: dict, context: Context) -> dict:
    """Compiles every method, then times the steps and the updates round-robin."""
    config, mesh, fsdp = context.config, context.mesh, context.fsdp
    names = list(optimizers)
    batch = parallel.shard_batch(make_batch(config), mesh)
    params = make_params(config, mesh, fsdp)
    grads = jax.jit(jax.grad(models.cross_entropy))(params, *batch)
    compiled = {
        name: compile_method(optimizers[name], config, batch, grads, mesh, fsdp)
        for name in context.each(names, desc="compile")
    }

    def fresh_state(name):
        own_params = make_params(config, mesh, fsdp)  # the step donates its params
        return own_params, compiled[name]["init"](own_params)

    def step_runner(name):
        return lambda state: compiled[name]["step"](*state, *batch)[:2]

    def update_runner(name):
        return lambda opt_state: compiled[name]["update"](grads, opt_state, params)[1]

    def timing_pass(runner, state, repeats, desc):
        def compute():
            times, _ = measure.interleaved_times(
                {name: runner(name) for name in names},
                {name: state(name) for name in names},
                repeats=repeats,
                warmup=config.warmup_rounds,
                desc=desc,
            )
            return {name: np.asarray(t) for name, t in times.items()}

        return compute

    # All methods are timed together, round-robin: each pass is one stage.
    step_times = context.stage(
        "step_times", timing_pass(step_runner, fresh_state, config.step_repeats, "train step")
    )
    update_times = context.stage(
        "update_times",
        timing_pass(
            update_runner, lambda name: fresh_state(name)[1], config.update_repeats, "update only"
        ),
    )
    return {
        "compiled": compiled,
        "step_times": step_times,
        "update_times": update_times,
        "params": models.num_params(params),
    }


def summarize(measured: dict, config: ml_collections.ConfigDict) -> dict:
    """Medians, ratios against ``adamw`` and the goal checks."""
    compiled, step_times = measured["compiled"], measured["step_times"]
    names = list(compiled)
    step_median = {name: measure.median(step_times[name]) for name in names}
    step_min = {name: float(min(step_times[name])) for name in names}
    update_median = {name: measure.median(measured["update_times"][name]) for name in names}
    step_bytes = {name: compiled[name]["step_memory"]["total"] for name in names}
    update_bytes = {name: compiled[name]["update_memory"]["total"] for name in names}
    time_ratio, memory_ratio = ratios(step_median), ratios(step_bytes)
    goal: dict[str, Any] = {}
    for name in filter(methods.uses_gnmr, names):
        goal[f"{name}_time_ratio_ok"] = time_ratio[name] <= config.goal_time_ratio
        goal[f"{name}_memory_ratio_ok"] = memory_ratio[name] <= config.goal_memory_ratio
    return {
        "time_ratio": time_ratio,
        # Secondary: ratio of the fastest repeats, less sensitive to load from other
        # processes than the median.
        "time_ratio_min": ratios(step_min),
        "memory_ratio": memory_ratio,
        "update_time_ratio": ratios(update_median),
        "update_memory_ratio": ratios(update_bytes),
        "step_time_s": step_median,
        "step_time_min_s": step_min,
        "update_time_s": update_median,
        "memory_bytes": step_bytes,
        "compile_time_s": {name: compiled[name]["step_compile_s"] for name in names},
        "update_compile_time_s": {name: compiled[name]["update_compile_s"] for name in names},
        "params": measured["params"],
        "goal": goal,
    }


def measure_study(optimizers: dict, context: Context) -> dict:
    measured = measure_all(optimizers, context)
    compiled = measured["compiled"]
    return {
        "summary": summarize(measured, context.config),
        "raw": {
            "step_times_s": measured["step_times"],
            "update_times_s": measured["update_times"],
            "step_memory_bytes": {name: c["step_memory"] for name, c in compiled.items()},
            "update_memory_bytes": {name: c["update_memory"] for name, c in compiled.items()},
        },
    }


# ---------------------------------------------------------------------------
# Table and plot


def table(result: dict) -> str:
    """The one-screen summary: one row per method, then the goal checks."""
    s = result["summary"]
    headers = ["method", "step_ms", "time_ratio", "ratio_of_min", "update_ms", "update_ratio",
               "memory_MiB", "memory_ratio", "compile_s"]  # fmt: skip
    rows = [
        [name, 1e3 * s["step_time_s"][name], s["time_ratio"][name], s["time_ratio_min"][name],
         1e3 * s["update_time_s"][name], s["update_time_ratio"][name],
         s["memory_bytes"][name] / 2**20, s["memory_ratio"][name], s["compile_time_s"][name]]
        for name in reporting.ordered(s["time_ratio"])
    ]  # fmt: skip
    config = result["config"]
    return reporting.report(
        f"{s['params'] / 1e6:.1f}M params, batch {config['batch_size']}, "
        f"median of {config['step_repeats']} steps / {config['update_repeats']} updates, "
        f"on {result['environment']['device_kind']}",
        headers,
        rows,
        goal=s["goal"],
        goal_title="goals (GNMR time ratio <= "
        f"{config['goal_time_ratio']}, memory ratio <= {config['goal_memory_ratio']}):",
    )


def plot(result: dict, path) -> Any:
    """Bar charts of the time ratios (step and update alone) and the memory ratios."""
    s, config = result["summary"], result["config"]
    names = reporting.ordered(s["time_ratio"])
    fig, axes = reporting.figure(1, 2, (12, 4.2))
    reporting.method_bars(
        axes[0],
        names,
        {"train step": s["time_ratio"], "update alone (hatched)": s["update_time_ratio"]},
        ylabel="median time / adamw (ratio)",
        title="time ratio vs adamw",
    )
    reporting.method_bars(
        axes[1],
        names,
        {"train step": s["memory_ratio"]},
        ylabel="compiled bytes / adamw (ratio)",
        title="train-step memory ratio (arg + out + temp - alias)",
    )
    for ax, goal in zip(
        axes, (config["goal_time_ratio"], config["goal_memory_ratio"]), strict=True
    ):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(goal, color="tab:red", ls="--", lw=0.8, label="goal (GNMR)")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"overhead: {s['params'] / 1e6:.1f}M-param MLP, batch {config['batch_size']}, "
        f"{result['environment']['device_kind']}"
    )
    return reporting.save_figure(fig, path)


STUDY = Study("overhead", prepare, measure_study, table, plot)
run = STUDY.run
