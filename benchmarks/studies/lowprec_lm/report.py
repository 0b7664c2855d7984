"""Table and figure of ``lowprec_lm``."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.harness import reporting


def _fmt_gap(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table(result: dict) -> str:
    """Bursts table (one row per method), persistent table, goal checks."""
    summary = result["summary"]
    headers = ["method", "val_loss", "gap_closed", "recovery_rate", "spikes", "diverged",
               "step_time_ratio", "compile_s", "coverage"]  # fmt: skip

    def rows(methods: dict) -> list:
        out = []
        for name, m in ((n, methods[n]) for n in reporting.ordered(methods)):
            coverage = m.get("detection", {}).get("coverage")
            out.append([
                name, f"{m['val_loss']:.4f}", _fmt_gap(m["gap_closed"]),
                f"{100 * m['recovery_rate']:.1f}%", m["spikes"], m["diverged"],
                f"{m['step_time_ratio']:.2f}", f"{m['compile_s']:.1f}",
                "-" if coverage is None else f"{100 * coverage:.0f}%",
            ])  # fmt: skip
        return out

    config = result["config"]
    quant = config["quant"]
    lines = [
        f"bursts regime: {quant['fmt']} {quant['scaling']} {quant['scale_mode']} scaling, "
        f"{quant['rounding']} rounding; median over {config['num_seeds']} seeds; val loss in "
        f"nats/byte (float32, no outliers); bursts on "
        f"{100 * result['bursts']['fraction_of_steps']:.0f}% of steps",
        reporting.format_table(headers, rows(summary["methods"])),
    ]
    if "persistent" in summary:
        pq = config["persistent_quant"]
        lines += [
            f"persistent regime (no bursts): {pq['fmt']} {pq['scaling']} {pq['scale_mode']}",
            reporting.format_table(headers, rows(summary["persistent"]["methods"])),
        ]
    lines += ["goals:", reporting.format_goals(summary["goal"])]
    lines.append(
        f"  stress gap (none - reference) / reference: {_fmt_gap(summary['goal']['stress_gap'])}"
    )
    return "\n".join(lines)


def plot(result: dict, path) -> Any:
    """Validation curves, seed-0 train loss, the unit x step heat map, final losses."""
    config = result["config"]
    summary = result["summary"]
    raw = result["raw"]["bursts"]
    names = reporting.ordered(summary["methods"])
    evals = np.arange(config["num_steps"] // config["eval_every"] + 1) * config["eval_every"]
    layer = np.asarray(result["bursts"]["layer"][0])
    paths = result["layers"]
    fig, axes = reporting.figure(2, 2, (14, 8.5))

    ax = axes[0, 0]
    for name in names:
        curve = np.median(np.asarray(raw[name]["val_curve"], dtype=float), axis=0)
        ax.plot(evals, curve, color=reporting.color(name), label=name,
                lw=2 if name.startswith("gnmr") else 1.1)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte, median of seeds)")
    ax.set_title("validation loss under outlier bursts, every method")
    lo = min(np.nanmin(np.asarray(raw[n]["val_curve"], dtype=float)) for n in names)
    ax.set_ylim(lo - 0.05, lo + 1.0)
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    stride = config["curve_stride"]
    steps = np.arange(0, config["num_steps"], stride)
    shown = [n for n in ("reference", "none", "gnmr_precision", "oracle_precision") if n in raw]
    for name in shown:
        loss = np.asarray(raw[name]["train_loss"], dtype=float)[0]
        ax.plot(steps[: len(loss)], loss, color=reporting.color(name), lw=0.8, label=name)
    bursting = layer >= 0
    ax.fill_between(np.arange(len(layer)), 0, 1, where=bursting, color="0.85",
                    transform=ax.get_xaxis_transform(), label="burst")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("train loss, seed 0 (nats/byte, as trained)")
    ax.set_title(f"seed 0 train loss, {len(shown)} of {len(names)} methods; grey = a burst is on")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    shown = [m for m in ("gnmr_precision", "gnmr_amax_precision") if m in raw] or names[-1:]
    grid = np.zeros((len(shown) * len(paths), config["num_steps"]))
    labels = []
    for k, method in enumerate(shown):
        for step, unit in raw[method]["high_precision_seed0"]:
            grid[k * len(paths) + unit, step] = 1
        labels += [f"{method.replace('_precision', '')}: {p}" for p in paths]
    ax.imshow(grid, aspect="auto", cmap="Blues", interpolation="nearest", vmin=0, vmax=1.5)
    hit = np.nonzero(bursting)[0]
    for k in range(len(shown)):
        ax.scatter(hit, k * len(paths) + layer[hit], s=2, color="tab:red", marker="s",
                   label="burst on this layer" if k == 0 else None)  # fmt: skip
        if k:
            ax.axhline(k * len(paths) - 0.5, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel("step")
    ax.set_title(
        f"seed 0: float32 layers (blue), bursts (red); {len(shown)} of {len(names)} methods"
    )
    ax.legend(fontsize=7, loc="upper right")

    ax = axes[1, 1]
    for i, name in enumerate(names):
        values = np.asarray(summary["methods"][name]["val_loss_per_seed"], dtype=float)
        ax.scatter(np.full(len(values), i), values, color=reporting.color(name), s=14)
        ax.hlines(summary["methods"][name]["val_loss"], i - 0.3, i + 0.3,
                  color=reporting.color(name))  # fmt: skip
    ax.axhline(summary["reference_val_loss"], color="k", lw=0.6, ls=":")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("final validation loss (nats/byte; bar = median)")
    ax.set_title("final validation loss (dotted: reference)")
    fig.suptitle("low-precision LM under activation-outlier bursts")
    return reporting.save_figure(fig, path)
