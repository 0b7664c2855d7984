"""Analysis and report of ``spike_injection``: per-seed figures, medians, the goal
checks, the table and the figure (see the package docstring)."""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from benchmarks.harness import reporting
from benchmarks.problems import methods
from benchmarks.problems.spike_training import COUNTER_FIELDS

# The loss-curve panels show these (the others would hide each other).
CURVE_METHODS = ("clean", "none", "gnmr_clip", "gnmr_skip", "gnmr_clip_budget2")


def per_seed(out: dict, config: ml_collections.ConfigDict) -> dict:
    """Per-seed scalars of one method."""

    def curve_sum(key):
        return out["curves"][key].sum(axis=1) if key in out["curves"] else None

    def curve_sum_before(key, step):
        return out["curves"][key][:, :step].sum(axis=1) if key in out["curves"] else None

    diverged = ~out["finite"] | ~(
        out["test_loss"] <= config.divergence_factor * out["init_test_loss"]
    )
    seeds = {
        "test_acc": out["test_acc"],
        "test_loss": out["test_loss"],
        "init_test_loss": out["init_test_loss"],
        "diverged": diverged,
        "spikes_injected": out["event"].sum(axis=1),
        "spikes_caught": curve_sum("caught"),
        "acted_unit_steps": curve_sum("acted"),
        "false_triggers": curve_sum("false_triggers"),
        "false_triggers_before_spikes": curve_sum_before("false_triggers", config.spike_start),
        "capped_steps": curve_sum("capped"),
        "caught_when_capped": curve_sum("caught_when_capped"),
    }
    for key, value in out["counters"].items():
        seeds["recovered_unit_steps" if key == "recovered_steps" else key] = value
    return reporting.to_jsonable(seeds)


def summarize_method(seeds: dict) -> dict:
    """Medians over seeds (counts for diverged; totals for spike counts)."""

    def med(key):
        values = seeds.get(key)
        if values is None:
            return None
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    def total(key):
        values = seeds.get(key)
        return None if values is None else int(np.sum(values))

    summary = {
        "test_acc": med("test_acc"),
        "test_loss": med("test_loss"),
        "diverged": int(np.sum(seeds["diverged"])),
        "spikes_injected": total("spikes_injected"),
        "spikes_caught": total("spikes_caught"),
        "acted_unit_steps": total("acted_unit_steps"),
        "false_triggers": total("false_triggers"),
        "false_triggers_before_spikes": total("false_triggers_before_spikes"),
        "capped_steps": total("capped_steps"),
        "caught_when_capped": total("caught_when_capped"),
    }
    for key in ("recovered_unit_steps", "triggers", "denied", "nonfinite", *COUNTER_FIELDS[4:]):
        summary[key] = total(key)
    return summary


def goal_checks(summaries: dict, config: ml_collections.ConfigDict) -> dict:
    """The issue's goals: GNMR within 1 point of clean, no divergence; none worse."""
    goal: dict[str, Any] = {}
    clean = summaries.get("clean")
    if clean is None:
        return goal
    for name in filter(methods.uses_gnmr, summaries):
        gap = clean["test_acc"] - summaries[name]["test_acc"]
        goal[f"{name}_accuracy_gap"] = gap
        goal[f"{name}_within_1pt_of_clean"] = bool(gap <= config.goal_accuracy_gap + 1e-9)
        goal[f"{name}_no_divergence"] = summaries[name]["diverged"] == 0
    if "none" in summaries:
        gap = clean["test_acc"] - summaries["none"]["test_acc"]
        goal["none_accuracy_gap"] = gap
        half = summaries["none"]["diverged"] * 2 >= config.num_seeds
        goal["none_visibly_worse"] = bool(gap >= config.visible_gap or half)
    return goal


def clip_norm_from_clean(out: dict, config: ml_collections.ConfigDict) -> float:
    """``clip_factor`` x the median global gradient norm of the clean runs."""
    return float(config.clip_factor * np.median(out["curves"]["grad_norm"]))


# ---------------------------------------------------------------------------
# Table and plot


def table(result: dict) -> str:
    """The one-screen summary: one row per method, notes, then the goal checks."""
    summary, config = result["summary"], result["config"]
    num_seeds = config["num_seeds"]
    headers = ["method", "test_acc", "test_loss", "diverged", "injected", "caught", "acted_u_steps",
               "recovered_u_steps", "triggers", "false_trig", "fp_pre", "denied",
               "preempted"]  # fmt: skip
    rows = [
        [name, m["test_acc"], m["test_loss"], f"{m['diverged']}/{num_seeds}",
         m["spikes_injected"], m["spikes_caught"], m["acted_unit_steps"],
         m["recovered_unit_steps"], m["triggers"], m["false_triggers"],
         m.get("false_triggers_before_spikes"), m["denied"], m.get("preempted")]
        for name, m in ((n, summary["methods"][n]) for n in reporting.ordered(summary["methods"]))
    ]  # fmt: skip
    gnmr = dict(config["gnmr"])
    if gnmr.get("lock_steps") is None:
        gnmr["lock_steps"] = "None (1 for clip and skip)"
    notes = [
        "GNMR rows at the library defaults (threshold {threshold:g}, delta_threshold "
        "{delta_threshold:g}, delta_gate {delta_gate:g}, max_recover {max_recover}, "
        "lock_steps {lock_steps}); fp_pre: false triggers before spike_start".format(**gnmr)
    ]
    budget2 = [name for name in summary["methods"] if name.endswith("_budget2")]
    if budget2:
        extra = config.get("gnmr_budget2", {})
        notes.append(
            f"{', '.join(budget2)}: NOT defaults, a budget sized to the stress "
            f"({', '.join(f'{k} {v}' for k, v in extra.items())})"
        )
    for name, m in summary["methods"].items():
        if m.get("capped_steps") is not None:
            notes.append(
                f"{name}: its max_norm cap set the bound on {m['capped_steps']} steps (acted "
                f"counts them); {m['caught_when_capped']} of its {m['spikes_caught']} caught "
                "spikes were caught on such a step"
            )
    return reporting.report(
        f"median over {num_seeds} seeds; spike counts summed over seeds; "
        f"clip_by_global_norm c = {reporting.format_value(summary['clip_norm'])}",
        headers,
        rows,
        *notes,
        goal=summary["goal"],
    )


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def _accuracy_panel(ax, result: dict, names: list[str]) -> None:
    config, summary = result["config"], result["summary"]
    accs = {name: result["raw"][name]["seeds"]["test_acc"] for name in names}
    reporting.seed_boxes(ax, names, accs, "test accuracy (fraction correct)",
                         f"test accuracy, every method, {config['num_seeds']} seeds")  # fmt: skip
    if "clean" in summary["methods"]:
        clean = summary["methods"]["clean"]["test_acc"]
        goal = clean - config["goal_accuracy_gap"]
        ax.axhline(clean, color=reporting.color("clean"), lw=0.8, ls=":")
        ax.axhline(goal, color="tab:red", lw=0.8, ls="--")
        at_right = ax.get_yaxis_transform()  # x in axes fraction, y in data
        ax.text(1.01, clean, "clean\nmedian", fontsize=7, transform=at_right)
        ax.text(1.01, goal, "-1 pt", color="tab:red", fontsize=7, va="top", transform=at_right)


def _spike_marks(ax, result: dict, seed: int) -> None:
    config, schedule = result["config"], result["spike_schedule"]
    lo, hi = math.log(config["spike_min"]), math.log(config["spike_max"])
    size = (np.log(schedule["magnitude"][seed]) - lo) / max(hi - lo, 1e-12)
    ax.vlines(schedule["step"][seed], 0.0, 0.03 + 0.17 * size, color="k", alpha=0.35, lw=0.7,
              transform=ax.get_xaxis_transform(), label="spike (height ~ log S)")  # fmt: skip


def plot(result: dict, path) -> Any:
    """Test accuracy per method over seeds, and train-loss curves with spike times."""
    config, raw = result["config"], result["raw"]
    names = reporting.ordered(raw)
    shown = [name for name in names if name in CURVE_METHODS]
    fig, axes = reporting.figure(1, 3, (15, 4.2))
    _accuracy_panel(axes[0], result, names)
    stride = config["curve_stride"]
    window = max(1, config["smooth_window"] // stride)
    subset = f"{len(shown)} of {len(names)} methods"
    for ax, seed in ((axes[1], None), (axes[2], 0)):
        for name in shown:
            curves = np.asarray(raw[name]["train_loss"], dtype=float)
            values = np.nanmedian(curves, axis=0) if seed is None else curves[seed]
            smoothed = _smooth(values, window)
            steps = (np.arange(len(smoothed)) + (window - 1)) * stride
            ax.plot(steps, smoothed, label=name, lw=1.2, color=reporting.color(name))
        if seed is None:
            ax.axvspan(config["spike_start"], config["num_steps"], color="k", alpha=0.06,
                       label="spikes on")  # fmt: skip
            ax.set_title(f"median train loss over seeds, {subset}")
        else:
            _spike_marks(ax, result, seed)
            ax.set_title(f"seed 0 train loss and its spike events, {subset}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"train loss (nats, moving average of {config['smooth_window']} steps)")
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(
        f"spike injection: p={config['spike_prob']} per step, S in "
        f"[{config['spike_min']:g}, {config['spike_max']:g}], kind {config['spike_kind']}"
    )
    return reporting.save_figure(fig, path)
