"""Analysis of the decentralized study: transient iterations, fits, table and figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import reporting

BYTES_PER_FLOAT = 4


def smoothed_log(curve: np.ndarray, window: int) -> np.ndarray:
    """Running mean of ``log(curve)`` over the last ``window`` evaluations (a running
    geometric mean: the stochastic hypergradient norm fluctuates over decades)."""
    logs = np.log(np.maximum(np.asarray(curve, np.float64), 1e-30))
    cumulative = np.concatenate([[0.0], np.cumsum(logs)])
    ends = np.arange(1, logs.size + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def geometric_mean(curves: np.ndarray) -> np.ndarray:
    """The geometric mean over seeds (axis 0) of positive curves."""
    return np.exp(np.mean(np.log(np.maximum(np.asarray(curves, np.float64), 1e-30)), axis=0))


def transient_step(run_curve, reference_curve, eval_every: int, factor: float, window: int):
    """The first evaluated step after which ``run`` stays within ``factor`` times
    ``reference`` (smoothed); ``None`` if it is still outside at the last evaluation."""
    gap = smoothed_log(run_curve, window) - smoothed_log(reference_curve, window)
    outside = np.flatnonzero(gap > math.log(factor))
    if outside.size == 0:
        return eval_every
    if outside[-1] == gap.size - 1:
        return None
    return int((outside[-1] + 2) * eval_every)


def power_fit(xs: list[float], ys: list[float | None]) -> dict[str, Any]:
    """Least-squares fit of ``log y = a + b log x`` over the uncensored points: the
    exponent ``b``, its ``r2`` and the number of points."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0]
    if len(pairs) < 2:
        return {"exponent": None, "r2": None, "points": len(pairs)}
    lx, ly = (np.log(np.asarray(v, np.float64)) for v in zip(*pairs, strict=True))
    if np.ptp(lx) == 0:
        return {"exponent": None, "r2": None, "points": len(pairs)}
    slope, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (intercept + slope * lx)
    total = np.sum((ly - ly.mean()) ** 2)
    r2 = 1.0 - np.sum(residual**2) / total if total > 0 else None  # equal ys: undefined
    return {"exponent": float(slope), "r2": r2 and float(r2), "points": len(pairs)}


def bytes_per_node_step(graph, x_size: int, y_size: int) -> float:
    """Bytes a node sends per step, averaged over nodes: ``y`` and ``z`` after the adapt
    step and ``x`` in the gossip, to each out-neighbour."""
    degree = np.mean([len(out) for out in graph.out_neighbors])
    return float(degree * BYTES_PER_FLOAT * (x_size + 2 * y_size))


def table(result: dict) -> str:
    summary, factors = result["summary"], list(result["summary"]["fits"])
    rows = [
        [name, row["spectral_gap"], row["zeta_sq"], row["test_acc"], row["consensus_x"],
         row["final_hypergradient_sq"]]
        + [row["transient_steps"] and row["transient_steps"][f] for f in factors]
        + [row["bytes_per_node_step"]]
        for name, row in summary["runs"].items()
    ]  # fmt: skip
    headers = ["run", "gap", "zeta^2", "test acc", "consensus x", "|grad F|^2"]
    headers += [f"transient {f}x" for f in factors] + ["B/node/step"]
    lines = [
        f"fits at {f}x: "
        + ", ".join(
            f"~ {label}^{_fit_text(fit)}"
            for label, fit in zip(
                ("1/gap", "n", "zeta^2"), summary["fits"][f].values(), strict=True
            )
        )
        for f in factors
    ]
    eval_every = result["config"]["eval_every"]
    heading = (
        "bilevel_decentralized (median over seeds; transient: steps until the curve stays within "
        f"a factor of centralized; {eval_every}: from the first evaluation; null: censored)"
    )
    return reporting.report(heading, headers, rows, *lines)


def _rounded(value):
    return None if value is None else round(value, 2)


def _fit_text(fit: dict) -> str:
    return f"{_rounded(fit['exponent'])} (R^2 {_rounded(fit['r2'])}, {fit['points']} points)"


def plot(result: dict, path: str | Path) -> Path:
    config, summary, raw = result["config"], result["summary"], result["raw"]
    fig, axes = reporting.figure(1, 3, (15, 4.2))
    steps = config["eval_every"] * (1 + np.arange(config["num_steps"] // config["eval_every"]))
    sweep = summary["topology_sweep"]
    runs, factors = summary["runs"], list(summary["fits"])
    ax = axes[0]
    shown = dict.fromkeys(sweep["runs"] + summary["node_sweep"]["runs"])
    for name in (n for n in shown if runs[n]["graph"] != "complete"):
        reference = f"centralized-n{runs[name]['nodes']}-h{runs[name]['heterogeneity']:g}"
        ratio = smoothed_log(
            geometric_mean(raw[name]["curves"]["node_hypergradient_sq"]), config["smooth_evals"]
        ) - smoothed_log(
            geometric_mean(raw[reference]["curves"]["node_hypergradient_sq"]),
            config["smooth_evals"],
        )
        ax.plot(
            steps,
            np.exp(ratio),
            label=f"{runs[name]['graph']} n={runs[name]['nodes']}",
            color=reporting.color(runs[name]["graph"]),
            alpha=0.4 + 0.6 * (runs[name]["nodes"] == config["num_nodes"]),
        )
    for f in factors:
        ax.axhline(float(f), color="grey", lw=0.5, ls=":")
    ax.set(
        xscale="log",
        xlabel="step",
        ylabel="|grad F|^2: run / centralized (smoothed)",
        title=f"h = {config['sweep_heterogeneity']} (geometric mean of seeds); dotted: factors",
    )
    ax.legend(fontsize=7)
    gap_runs = [n for n in dict.fromkeys(sweep["runs"] + summary["node_sweep"]["runs"])]
    panels = (
        (axes[1], gap_runs, lambda n: 1.0 / runs[n]["spectral_gap"], "inverse_gap", "1 / gap"),
        (axes[2], summary["heterogeneity_sweep"]["runs"], lambda n: runs[n]["zeta_sq"],
         "heterogeneity", "heterogeneity zeta^2"),
    )  # fmt: skip
    for ax, names, x_of, fit_key, xlabel in panels:
        names = [n for n in names if runs[n]["graph"] != "complete"]
        for f, marker in zip(factors, "os^D", strict=False):
            ys = [runs[n]["transient_steps"][f] for n in names]
            shown = [y if y is not None else config["num_steps"] for y in ys]
            fit = summary["fits"][f][fit_key]
            ax.plot(
                [x_of(n) for n in names], shown, marker, linestyle="none",
                label=f"{f}x: exponent {_fit_text(fit)}",
            )  # fmt: skip
        ax.axhline(config["num_steps"], color="grey", lw=0.5, ls=":")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=xlabel,
            ylabel="transient iterations",
            title="dotted: censored (never within)",
        )
        ax.legend(fontsize=7)
    return reporting.save_figure(fig, path)
