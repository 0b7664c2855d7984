"""Bilevel memory: where does BROS's factored evaluation save memory over MA-SOBA?

Setup. The hyper-data-cleaning problem of ``bilevel_cleaning``
(:func:`benchmarks.problems.cleaning.cleaning_problem`: per-sample weight logits ``x``,
an MLP ``64 -> width -> width -> 10`` as the lower variable, l2 term in the inner
loss) on random standard-normal inputs and uniform labels, since only shapes matter
here. Two sweeps: the MLP width at ``batch_size``, and the batch (inner and outer
alike) at ``batch_width``.

Methods at every point: ``ma_soba``; ``bros_r{rank}`` (factored BROS) for each of
``ranks``; ``bros_r{rank}_naive`` (``factored=False``: the shifted weights formed
densely) for each of ``naive_ranks``. All are chained with ``optax.sgd`` on ``x``; the
step sizes do not change the cost.

Measured, per point and method, for one jitted update step
``(x, state, inner_batch, outer_batch) -> (x, state)`` with ``x`` and the state donated:
compiled bytes (argument + output + temp - alias, from XLA's memory analysis), compile
time, and the median step time of ``step_repeats`` calls timed round-robin over the
point's methods; ratios against ``ma_soba`` at the same point.

Where the saving comes from: BROS keeps ``a P`` (``batch x rank``) per layer instead
of the full weight gradient ``a^T dh`` (``width x width``) and the dense Hessian-vector
product. When activations (``batch x width``) outweigh the weights, or the width is
small, there is little to save, and the probes and factors add their own buffers.

Stages and devices. Every sweep point is one checkpointed stage; a resumed run measures
only the missing points. With a mesh (:mod:`benchmarks.harness.parallel`) each step is
compiled for what training on that mesh would pass it: the minibatches sharded over the
``data`` axis (every batch size must divide by its size, else ``ValueError``), ``x`` and
the optimizer state replicated (with ``fsdp``, large MLP leaves and their companions
split). The bytes are then what XLA's memory analysis reports for the SPMD program, i.e.
*per device* (``result["mesh"]["devices"]`` says over how many), and not comparable with
a run on one device."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from benchmarks.harness import Context, Study, measure, parallel, reporting
from benchmarks.harness.study import check_positive
from benchmarks.problems import cleaning, methods, models

# Per-method figures kept in the summary (the raw part keeps every repeat).
SUMMARY_KEYS = ("peak_bytes", "bytes_ratio", "reduction", "step_time_s", "time_ratio", "compile_s")


def method_names(config: ml_collections.ConfigDict) -> list[str]:
    """``ma_soba``, then the factored BROS ranks, then the naive ones."""
    return [
        "ma_soba",
        *methods.bros_names(config.ranks),
        *methods.bros_names(config.naive_ranks, naive=True),
    ]


def sweep_points(config: ml_collections.ConfigDict) -> list[dict]:
    """The (width, batch) points of both sweeps, each once, with the sweeps it is in."""
    points: dict[tuple[int, int], dict] = {}
    sweeps = [("width", w, config.batch_size) for w in config.widths]
    sweeps += [("batch", config.batch_width, b) for b in config.batches]
    for sweep, width, batch in sweeps:
        point = points.setdefault((width, batch), {"width": width, "batch": batch, "sweeps": []})
        point["sweeps"].append(sweep)
    return list(points.values())


def point_inputs(config: ml_collections.ConfigDict, width: int, batch: int) -> dict:
    """Initial MLP, upper variable and one fixed inner/outer batch of a point."""
    k_init, k_in, k_lab, k_out, k_out_lab = jax.random.split(jax.random.key(config.seed), 5)
    params = models.mlp_init(k_init, (config.num_features, width, width, config.num_classes))
    n = config.num_samples
    idx = jnp.arange(batch, dtype=jnp.int32) % n
    inner = (
        idx,
        jax.random.normal(k_in, (batch, config.num_features)),
        jax.random.randint(k_lab, (batch,), 0, config.num_classes),
    )
    outer = (
        jax.random.normal(k_out, (batch, config.num_features)),
        jax.random.randint(k_out_lab, (batch,), 0, config.num_classes),
    )
    return {
        "params": params,
        "x": jnp.zeros((n,), jnp.float32),
        "batch": (inner, outer),
        "num_params": models.num_params(params),
    }


def solver(name: str, config: ml_collections.ConfigDict, problem):
    """``chain(bilevel solver, sgd(outer_lr))``: the step sizes do not change the cost."""
    transform = methods.bilevel_solver(
        name, problem, config.inner_lr, config.aux_lr, config.average
    )
    return optax.chain(transform, optax.sgd(config.outer_lr))


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> list[dict]:
    """Checks the sweep (every batch must split over the mesh) and builds every solver;
    returns the sweep points."""
    check_positive(config, "widths", "batches", "batch_size", "batch_width", "step_repeats")
    for batch in (config.batch_size, *config.batches):
        parallel.check_batch(batch, mesh, "batch")
    sizes = (config.num_features, config.batch_width, config.batch_width, config.num_classes)
    params = jax.eval_shape(lambda: models.mlp_init(jax.random.key(0), sizes))
    problem = cleaning.cleaning_problem(params, config.l2)
    for name in method_names(config):
        solver(name, config, problem)
    return sweep_points(config)


def measure_sweep(points: list[dict], context: Context) -> dict:
    """Measures every point (one stage each); the summary and the raw repeats."""
    config = context.config
    measured = []
    for point in context.each(points, lambda p: f"width {p['width']}, batch {p['batch']}"):
        found = context.stage(
            f"w{point['width']}_b{point['batch']}",
            lambda point=point: measure_point(config, point, context.mesh, context.fsdp),
        )
        measured.append({**point, **found})
    # The largest configuration: the point where MA-SOBA needs the most bytes.
    largest = max(measured, key=lambda p: p["methods"]["ma_soba"]["peak_bytes"])
    bros = [n for n in method_names(config) if n != "ma_soba"]
    summary = {
        "points": [
            {
                "width": p["width"],
                "batch": p["batch"],
                "sweeps": p["sweeps"],
                "num_params": p["num_params"],
                "methods": {
                    name: {key: m[key] for key in SUMMARY_KEYS} for name, m in p["methods"].items()
                },
            }
            for p in measured
        ],
        "largest_config": {"width": largest["width"], "batch": largest["batch"]},
        "largest_config_reduction": {n: largest["methods"][n]["reduction"] for n in bros},
        "goal": goal_checks(largest, config),
    }
    raw = {
        f"w{p['width']}_b{p['batch']}": {
            name: {"memory": m["memory"], "step_times_s": m["step_times_s"]}
            for name, m in p["methods"].items()
        }
        for p in measured
    }
    return {"summary": summary, "raw": raw}


def measure_point(config: ml_collections.ConfigDict, point: dict, mesh=None, fsdp=False) -> dict:
    """Compiles and times every method at one point; bytes, seconds and ratios.

    Returns ``{"num_params": int, "methods": {name: figures}}`` in plain containers
    (a checkpointable stage); with a ``mesh``, for inputs placed on it.
    """
    inputs = point_inputs(config, point["width"], point["batch"])
    batch = parallel.shard_batch(inputs["batch"], mesh)
    problem = cleaning.cleaning_problem(inputs["params"], config.l2)
    names = method_names(config)
    compiled, carries, batches = {}, {}, {}
    label = f"width {point['width']}, batch {point['batch']}"
    for name in names:
        tx = solver(name, config, problem)
        carry = parallel.place_params((inputs["x"], tx.init(inputs["x"])), mesh, fsdp)
        step = cleaning.bilevel_step(tx)
        compiled[name] = measure.compile_step(step, *carry, *batch, mesh=mesh)
        carries[name] = carry
        batches[name] = batch
    timed = [n for n in names if config.time_naive or not n.endswith("_naive")]
    times = measure.time_compiled_steps(
        {name: compiled[name] for name in timed},
        carries,
        batches,
        config.step_repeats,
        config.warmup_rounds,
        desc=f"time ({label})",
    )
    rows = {
        name: {
            "peak_bytes": compiled[name].memory["total"],
            "memory": compiled[name].memory,
            "step_time_s": measure.median(times[name]) if name in times else None,
            "step_times_s": times.get(name),
            "compile_s": compiled[name].compile_s,
        }
        for name in names
    }
    reference = rows["ma_soba"]
    for m in rows.values():
        m["bytes_ratio"] = m["peak_bytes"] / reference["peak_bytes"]
        m["reduction"] = 1.0 - m["bytes_ratio"]
        timed_here = m["step_time_s"] is not None
        m["time_ratio"] = m["step_time_s"] / reference["step_time_s"] if timed_here else None
    return {"num_params": inputs["num_params"], "methods": rows}


def goal_checks(largest: dict, config: ml_collections.ConfigDict) -> dict:
    """The issue's goals, at the largest point, for every factored BROS rank."""
    goal: dict[str, Any] = {}
    for name in methods.bros_names(config.ranks):
        m = largest["methods"][name]
        goal[f"{name}_reduction"] = m["reduction"]
        goal[f"{name}_saves_{100 * config.goal_reduction:.0f}pct_at_largest"] = bool(
            m["reduction"] >= config.goal_reduction
        )
        goal[f"{name}_time_ratio"] = m["time_ratio"]
        goal[f"{name}_time_ratio_ok_at_largest"] = bool(m["time_ratio"] <= config.goal_time_ratio)
    return goal


# ---------------------------------------------------------------------------
# Table and plot


def table(result: dict) -> str:
    """One row per point and method, then the reduction at the largest point and goals."""
    s = result["summary"]
    config = result["config"]
    headers = ["width", "batch", "method", *reporting.COST_HEADERS]
    rows = [
        [
            p["width"],
            p["batch"],
            name,
            *reporting.cost_cells(
                m["peak_bytes"], m["bytes_ratio"], m["step_time_s"], m["time_ratio"], m["compile_s"]
            ),
        ]  # fmt: skip
        for p in s["points"]
        for name, m in ((n, p["methods"][n]) for n in reporting.ordered(p["methods"]))
    ]
    largest = s["largest_config"]
    reductions = ", ".join(
        f"{name} {100 * value:.1f}%" for name, value in s["largest_config_reduction"].items()
    )
    devices = result.get("mesh", {}).get("devices", 1)
    per_device = f"; bytes per device, data parallel over {devices}" if devices > 1 else ""
    return reporting.report(
        f"MLP 64-w-w-10, one donated update step; ratios vs ma_soba at the same point; median "
        f"of {config['step_repeats']} round-robin steps; on {result['environment']['device_kind']}"
        + per_device,
        headers,
        rows,
        f"reduction vs ma_soba at the largest config (width {largest['width']}, batch "
        f"{largest['batch']}): {reductions}",
        goal=s["goal"],
        goal_title=f"goals (BROS >= {100 * config['goal_reduction']:.0f}% fewer bytes, step time "
        f"<= {config['goal_time_ratio']}x, at the largest config):",
    )


def plot(result: dict, path) -> Any:
    """Bytes and time ratio against width and against batch, one line per method."""
    s, config = result["summary"], result["config"]
    names = reporting.ordered(s["points"][0]["methods"])
    fig, axes = reporting.figure(2, 2, (12, 8))
    for column, (sweep, key, fixed) in enumerate(
        (("width", "width", f"batch {config['batch_size']}"),
         ("batch", "batch", f"width {config['batch_width']}"))
    ):  # fmt: skip
        points = sorted((p for p in s["points"] if sweep in p["sweeps"]), key=lambda p: p[key])
        xs = [p[key] for p in points]
        untimed = 0
        for name in names:
            style = {"ls": "--"} if name.endswith("_naive") else {}
            mib = [p["methods"][name]["peak_bytes"] / 2**20 for p in points]
            ratio = [p["methods"][name]["time_ratio"] for p in points]
            style["color"] = reporting.color(name)
            axes[0, column].plot(xs, mib, marker="o", label=name, **style)
            if None not in ratio:  # methods measured for memory only have no time
                axes[1, column].plot(xs, ratio, marker="o", label=name, **style)
            untimed += None in ratio
        axes[0, column].set_yscale("log")
        axes[0, column].set_ylabel("MiB (argument + output + temp - alias)")
        axes[0, column].set_title(f"compiled bytes vs {sweep} ({fixed})")
        axes[1, column].axhline(config["goal_time_ratio"], color="tab:red", ls=":", lw=0.8,
                                label="goal")  # fmt: skip
        axes[1, column].set_ylabel("median step time / ma_soba (ratio)")
        subset = f"; {len(names) - untimed} of {len(names)} methods (timed)" if untimed else ""
        axes[1, column].set_title(f"step-time ratio vs {sweep} ({fixed}{subset})")
        for ax in axes[:, column]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("MLP width (units)" if sweep == "width" else "batch (examples)")
            ax.legend(fontsize=7)
    fig.suptitle(f"bilevel memory: one donated update step, {result['environment']['device_kind']}")
    return reporting.save_figure(fig, path)


STUDY = Study("bilevel_memory", prepare, measure_sweep, table, plot)
run = STUDY.run
