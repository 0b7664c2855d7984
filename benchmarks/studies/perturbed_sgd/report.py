"""Table and figure of ``perturbed_sgd``."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.harness import reporting
from benchmarks.studies.perturbed_sgd.problems import PROBLEMS


def _short(value: Any) -> str:
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                continue
            parts.append(f"{k}={reporting.format_value(v)}")
        return ", ".join(parts)
    return reporting.format_value(value)


def table(result: dict) -> str:
    """One row per statement: id, pass/fail, measured (scalars), expected."""
    rows = [
        [s["id"], "pass" if s["passed"] else "FAIL", _short(s["measured"]), s["expected"]]
        for s in result["summary"]["statements"]
    ]
    notes = [f"{result['summary']['passed']}/{result['summary']['total']} statements pass"]
    for s in result["summary"]["statements"]:
        if s["id"] != 4:
            continue
        for kind, ratios in s["measured"]["median_ratio_fwd_over_bwd"].items():
            cells = " ".join(f"{v:.3g}" for v in ratios)
            notes.append(f"statement 4, {kind}: fwd/bwd ratio per operator 1..N: {cells}")
    config = result["config"]
    heading = (
        f"measured statements, {config['num_seeds']} seeds, {config['num_operators']} operators"
    )
    return reporting.report(heading, ["id", "result", "measured", "expected"], rows, *notes)


def plot(result: dict, path) -> Any:
    """Four panels: loss curves with spikes, depth sensitivity, recovery vs log S, sweep.

    A panel stays empty when its sections did not run (``config.sections``).
    """
    raw = result["raw"]
    fig, axes = reporting.figure(2, 2, (12, 8))

    ax = axes[0, 0]
    if "example" in raw or "recovery" in raw:
        if "example" in raw:
            example = raw["example"]
            first = example["output_operator"]
            steps = np.arange(len(first["loss"]))
            ax.plot(steps, first["clean"], label="tanh chain, clean", lw=1.0)
            for name, run in example.items():
                ax.plot(
                    steps,
                    run["loss"],
                    lw=1.0,
                    label=f"spikes at {name.replace('_', ' ')}: {run['outcome']}",
                )
            for t in steps[np.asarray(first["spike"], bool)]:
                ax.axvline(t, color="tab:red", alpha=0.15, lw=0.8)
        if "recovery" in raw:
            rec = raw["recovery"]
            t0 = result["config"]["spike_t0"]
            for size, loss in zip(rec["curves"]["sizes"], rec["curves"]["loss"], strict=True):
                ax.plot(
                    np.arange(len(loss)), loss, lw=0.8, ls="--", label=f"convex, spike S={size:g}"
                )
            ax.axvline(t0, color="k", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats)")
        ax.set_title("loss, clean vs perturbed (red: spike steps; dotted: convex spike t0)")
        ax.legend(fontsize=7)

    ax = axes[0, 1]
    if "depth" in raw["per_seed"][0]:
        seeds = raw["per_seed"]
        for kind, color in zip(PROBLEMS, ("tab:blue", "tab:orange"), strict=True):
            fwd = np.median([s["depth"][kind]["forward_relative_error"] for s in seeds], axis=0)
            bwd = np.median([s["depth"][kind]["backward_relative_error"] for s in seeds], axis=0)
            ops = np.arange(1, len(fwd) + 1)
            ax.plot(ops, fwd, "o-", color=color, label=f"{kind}: forward")
            ax.plot(ops, bwd, "s--", color=color, label=f"{kind}: backward")
        ax.set_yscale("log")
        ax.set_xlabel("perturbed operator k (N = output)")
        ax.set_ylabel("||dg|| / ||g|| at relative size " + f"{result['config']['probe_size']:g}")
        ax.set_title("sensitivity vs depth (statements 2 and 4)")
        ax.legend(fontsize=7)

    ax = axes[1, 0]
    if "recovery" in raw:
        rec = raw["recovery"]
        sizes = np.asarray(rec["sizes"])
        times = np.asarray(rec["recovery_time"], float)
        ok = times >= 0
        ax.plot(np.log(sizes[ok]), times[ok], "o", label="measured")
        grid = np.linspace(np.log(sizes.min()), np.log(sizes.max()), 50)
        ax.plot(
            grid,
            rec["fitted_intercept"] + rec["fitted_slope"] * grid,
            "-",
            label=f"fit: slope {rec['fitted_slope']:.1f}, R^2 {rec['r2']:.3f}",
        )
        ax.plot(
            grid,
            rec["fitted_intercept"] + rec["predicted_slope"] * grid,
            ":",
            label=f"predicted slope 1/-log(1-eta mu) = {rec['predicted_slope']:.1f}",
        )
        ax.set_xlabel("log S")
        ax.set_ylabel("recovery time (steps)")
        ax.set_title("recovery time of a one-off spike (statement 6)")
        ax.legend(fontsize=7)

    ax = axes[1, 1]
    if "threshold" in raw:
        thr = raw["threshold"]
        curves = (("systematic", "relative_error", "o-", "systematic (7a, median)"),
                  ("random", "relative_error", "s-", "random (median)"),
                  ("random", "rms_relative_error", "s--", "random (7b, rms)"))  # fmt: skip
        for kind, field, style, label in curves:
            err = np.asarray(thr[kind][field], float)
            progress = np.clip(np.asarray(thr[kind]["progress"], float), -0.5, 1.5)
            ax.plot(err, progress, style, label=label)
        ax.axvline(1.0, color="k", lw=0.6, ls=":")
        if "prediction" in thr:
            eps_star = thr["prediction"]["predicted_error"]
            ax.axvline(eps_star, color="tab:green", lw=0.8, ls="--",
                       label=f"7b prediction eps* = {eps_star:.2f}")  # fmt: skip
        ax.axhline(result["config"]["stall_fraction"], color="tab:red", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("relative gradient error ||g_hat - g|| / ||g|| over steps")
        ax.set_ylabel("progress (1 = clean run's loss decrease)")
        ax.set_title("persistent perturbation sweep (statement 7)")
        ax.legend(fontsize=7)
    return reporting.save_figure(fig, path)
