"""Summary (ratios against AdamW and the goal checks), table and figure of ``overhead``."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from benchmarks.harness import measure, reporting
from benchmarks.studies.overhead import steps

REFERENCE = "adamw"


def ratios(values: dict[str, float]) -> dict[str, float]:
    """``values[name] / values["adamw"]`` for every name."""
    return {name: value / values[REFERENCE] for name, value in values.items()}


def method_summary(section: dict) -> dict:
    """Medians, fastest repeats, compiled bytes and their ratios to AdamW."""
    found = section["methods"]
    median = {name: measure.median(m["times_s"]) for name, m in found.items()}
    fastest = {name: float(np.min(m["times_s"])) for name, m in found.items()}
    memory = {name: m["memory"]["total"] for name, m in found.items()}
    return {
        "step_time_s": median,
        "step_time_min_s": fastest,
        "time_ratio": ratios(median),
        # Secondary: the ratio of the fastest repeats, less sensitive to other processes.
        "time_ratio_min": ratios(fastest),
        "memory_bytes": memory,
        "memory_ratio": ratios(memory),
        "state_bytes": {name: m["state_bytes"] for name, m in found.items()},
        "compile_time_s": {name: m["compile_s"] for name, m in found.items()},
    }


def sweep_summary(points: list[dict], key: str) -> dict:
    """Per method, the time and memory ratios to AdamW at every point of a sweep."""
    per_point = [method_summary(point) for point in points]
    names = list(points[0]["methods"])
    return {
        key: [point[key] for point in points],
        "time_ratio": {n: [s["time_ratio"][n] for s in per_point] for n in names},
        "time_ratio_min": {n: [s["time_ratio_min"][n] for s in per_point] for n in names},
        "memory_ratio": {n: [s["memory_ratio"][n] for s in per_point] for n in names},
        "adamw_step_time_s": [s["step_time_s"][REFERENCE] for s in per_point],
    }


def cheapest(summary: dict, names: list[str], field: str) -> str | None:
    """The peer of ``names`` with the lowest ``summary[field]`` (None if none ran)."""
    return min(names, key=lambda n: summary[field][n]) if names else None


def train_goals(train: dict, summary: dict, config: ml_collections.ConfigDict) -> dict:
    """The train-step goals: GNMR's precision action within ``goal_precision_memory_ratio``
    of AdamW's memory, and the default actions no dearer than the cheapest global-norm
    peer in the run.

    Memory: the ratio to AdamW at most the peer's plus ``goal_same_memory`` (the
    controllers' own per-unit vectors differ by a few hundred bytes; the goal is about
    the step's buffers). Time: the round-by-round ratio to that peer, whose median's 95%
    interval must reach 1 (not measurably dearer)."""
    goal: dict[str, Any] = {}
    names = list(summary["memory_ratio"])
    if "gnmr_precision" in names:
        goal["precision_train_memory_ratio_ok"] = (
            summary["memory_ratio"]["gnmr_precision"] <= config.goal_precision_memory_ratio
        )
    peers = [n for n in steps.GLOBAL_NORM_PEERS if n in names]
    if "gnmr_chain" not in names or not peers:
        return goal
    by_memory = cheapest(summary, peers, "memory_ratio")
    by_time = cheapest(summary, peers, "time_ratio")
    paired = steps.paired_ratio(
        {n: m["times_s"] for n, m in train["methods"].items()}, "gnmr_chain", by_time
    )
    memory = summary["memory_ratio"]
    goal["cheapest_peer_memory"] = by_memory
    goal["chain_train_memory_vs_cheapest_ok"] = (
        memory["gnmr_chain"] <= memory[by_memory] + config.goal_same_memory
    )
    goal["cheapest_time_ratio_peer"] = by_time
    goal["chain_over_cheapest_time_ratio"] = paired
    goal["chain_train_time_ratio_vs_cheapest_ok"] = paired["low"] <= 1.0
    return goal


def summarize(raw: dict, config: ml_collections.ConfigDict) -> dict:
    """Every section's ratios to AdamW, and the goals of the sections that ran."""
    summary: dict[str, Any] = {}
    goal: dict[str, Any] = {}
    if "optimizer_step" in raw:
        section = raw["optimizer_step"]
        s = summary["optimizer_step"] = {"params": section["params"], **method_summary(section)}
        if "gnmr_wrap" in s["time_ratio"]:
            time_ratio, memory_ratio = s["time_ratio"]["gnmr_wrap"], s["memory_ratio"]["gnmr_wrap"]
            goal["wrap_step_time_ratio_ok"] = time_ratio <= config.goal_wrap_time_ratio
            goal["wrap_step_memory_ratio_ok"] = memory_ratio <= config.goal_wrap_memory_ratio
    if "train_step" in raw:
        section = raw["train_step"]
        s = summary["train_step"] = {"params": section["params"], **method_summary(section)}
        goal.update(train_goals(section, s, config))
    if "scaling_size" in raw:
        summary["scaling_size"] = sweep_summary(raw["scaling_size"]["points"], "params")
    if "scaling_units" in raw:
        units = raw["scaling_units"]
        summary["scaling_units"] = {
            "params": units["params"],
            **sweep_summary(units["points"], "units"),
        }
    summary["goal"] = goal
    return summary


# ---------------------------------------------------------------------------
# Table and plot


def _step_table(s: dict) -> str:
    headers = ["method", "step_ms", "time_ratio", "ratio_of_min", "memory_MiB", "memory_ratio",
               "compile_s"]  # fmt: skip
    rows = [
        [name, 1e3 * s["step_time_s"][name], s["time_ratio"][name], s["time_ratio_min"][name],
         s["memory_bytes"][name] / 2**20, s["memory_ratio"][name], s["compile_time_s"][name]]
        for name in reporting.ordered(s["time_ratio"])
    ]  # fmt: skip
    return reporting.format_table(headers, rows)


def _sweep_table(s: dict, key: str, label) -> str:
    names = [n for n in reporting.ordered(s["time_ratio"]) if n != REFERENCE]
    headers = [key, "adamw_ms"] + [f"{n} t/m" for n in names]
    rows = []
    for i, point in enumerate(s[key]):
        cells = [f"{s['time_ratio'][n][i]:.3f}/{s['memory_ratio'][n][i]:.4f}" for n in names]
        rows.append([label(point), 1e3 * s["adamw_step_time_s"][i], *cells])
    return reporting.format_table(headers, rows)


def table(result: dict) -> str:
    """The optimizer-step and train-step tables, the two sweeps, then the goals."""
    s, config = result["summary"], result["config"]
    device = result["environment"]["device_kind"]
    parts = [f"overhead on {device}: ratios against adamw in the same run (median time)"]
    if "optimizer_step" in s:
        parts += [
            f"\noptimizer step: {s['optimizer_step']['params'] / 1e6:.3g}M params, gradients "
            f"given, median of {config['step_repeats']} rounds",
            _step_table(s["optimizer_step"]),
        ]
    if "train_step" in s:
        parts += [
            f"\ntrain step: {s['train_step']['params'] / 1e6:.3g}M params, batch "
            f"{config['batch_size']}, median of {config['train_repeats']} rounds",
            _step_table(s["train_step"]),
        ]
    if "scaling_size" in s:
        parts += [
            "\nGNMR over model size (optimizer step, one unit per leaf): time/memory ratio",
            _sweep_table(s["scaling_size"], "params", lambda p: f"{p / 1e6:.3g}M"),
        ]
    if "scaling_units" in s:
        units = s["scaling_units"]
        parts += [
            f"\nGNMR over the number of units (optimizer step, {units['params'] / 1e6:.1f}M "
            "params in rows; units of consecutive rows): time/memory ratio",
            _sweep_table(units, "units", str),
        ]
    goal = s["goal"]
    if "chain_over_cheapest_time_ratio" in goal:
        paired = goal["chain_over_cheapest_time_ratio"]
        parts.append(
            f"\ntrain step, gnmr_chain / {goal['cheapest_time_ratio_peer']} round by round: "
            f"median {paired['median']:.3f}, 95% interval [{paired['low']:.3f}, "
            f"{paired['high']:.3f}]"
        )
    parts += [
        f"goals (optimizer step: gnmr_wrap time <= {config['goal_wrap_time_ratio']}, memory <= "
        f"{config['goal_wrap_memory_ratio']}; train step: gnmr_precision memory <= "
        f"{config['goal_precision_memory_ratio']}, gnmr_chain no dearer than the cheapest "
        "global-norm peer):",
        reporting.format_goals(goal),
    ]
    return "\n".join(parts)


def _ratio_bars(ax, s: dict, title: str, goal: float | None = None) -> None:
    names = reporting.ordered(s["time_ratio"])
    reporting.method_bars(
        ax,
        names,
        {"median time": s["time_ratio"], "compiled memory (hatched)": s["memory_ratio"]},
        ylabel="ratio to adamw",
        title=title,
    )
    ax.axhline(1.0, color="k", lw=0.8)
    if goal is not None:
        ax.axhline(goal, color="tab:red", ls="--", lw=0.8, label=f"gnmr_wrap time goal {goal}")
    ax.legend(fontsize=7)


def _sweep_lines(ax, s: dict, key: str, xlabel: str, title: str) -> None:
    x = np.asarray(s[key], float)
    names = [n for n in reporting.ordered(s["time_ratio"]) if n != REFERENCE]
    # One marker per method: GNMR's variants share a palette colour.
    for name, marker in zip(names, "o^Dvsp", strict=False):
        color = reporting.color(name)
        ax.plot(x, s["time_ratio"][name], marker + "-", color=color, label=f"{name}: time")
        ax.plot(x, s["memory_ratio"][name], marker + "--", color=color, lw=0.8, mfc="none",
                label=f"{name}: memory")  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ratio to adamw (optimizer step)")
    ax.set_title(title)
    ax.legend(fontsize=6)


def plot(result: dict, path) -> Any:
    """Four panels: optimizer step and train step (time and memory ratios per method),
    GNMR over model size and over the number of units (log x)."""
    s, config = result["summary"], result["config"]
    fig, axes = reporting.figure(2, 2, (13, 9))
    if "optimizer_step" in s:
        _ratio_bars(
            axes[0, 0],
            s["optimizer_step"],
            f"optimizer step, {s['optimizer_step']['params'] / 1e6:.1f}M params",
            config["goal_wrap_time_ratio"],
        )
    if "train_step" in s:
        _ratio_bars(
            axes[0, 1],
            s["train_step"],
            f"train step, {s['train_step']['params'] / 1e6:.1f}M params, "
            f"batch {config['batch_size']}",
        )
    if "scaling_size" in s:
        _sweep_lines(
            axes[1, 0], s["scaling_size"], "params", "parameters (count)",
            "GNMR over model size (one unit per leaf)",
        )  # fmt: skip
    if "scaling_units" in s:
        units = s["scaling_units"]
        _sweep_lines(
            axes[1, 1], units, "units", "units (count, rows grouped)",
            f"GNMR over units ({units['params'] / 1e6:.1f}M params)",
        )  # fmt: skip
    fig.suptitle(f"overhead against adamw on {result['environment']['device_kind']}")
    return reporting.save_figure(fig, path)
