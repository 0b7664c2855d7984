"""Analysis and report of ``gnmr_calibration``: the rule's pick, false triggers on the
held-out seeds, the table and the figure (see the package docstring)."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from benchmarks.harness import reporting
from benchmarks.studies.gnmr_calibration import rule, train
from benchmarks.studies.gnmr_calibration.train import BARS

SETTINGS = ("old_defaults", "new_defaults")
SETTING_COLORS = {"old_defaults": "#7f7f7f", "new_defaults": "#1f77b4", "calibrated": "#2ca02c"}
SURVIVAL_POINTS = np.geomspace(0.1, 30.0, 50)  # score values of the plotted survival curves


# ----------------------------------------------------------------------------- analysis


def _at(ratios: rule.Ratios, grid, bars: dict, qs) -> dict | None:
    """Rate, objective and quantiles of ``bars`` on one problem's calibration data (None
    when its threshold is off the grid, where no watcher ran)."""
    grid = [float(t) for t in grid]
    if float(bars["threshold"]) not in grid:
        return None
    i = grid.index(float(bars["threshold"]))
    g, d = ratios.gnmr[i], ratios.delta_gnmr[i]
    values = [bars[key] for key in BARS]
    score = rule.scores(g, d, *values)
    return {
        "rate_per_1000": 1000.0 * float(np.mean(score > np.float32(1.0))),
        "objective": rule.geometric_mean(rule.smallest_spike(g, d, *values)),
        "quantiles": rule.quantiles(ratios, i, bars, qs),
        "survival_per_1000": reporting.to_jsonable(rule.survival(score, SURVIVAL_POINTS), 4),
    }


def _held_out(runs: dict, num_units: int, updates: int) -> dict:
    """False triggers of one problem at one setting, pooled over its methods."""
    rows = {}
    for name, run in runs.items():
        counters = {key: int(np.sum(value)) for key, value in run["counters"].items()}
        seeds = len(np.atleast_1d(run["counters"]["triggers"]))
        unit_updates = seeds * num_units * updates
        quality = "test_acc" if "test_acc" in run else "val_loss"
        rows[name] = {
            "false_triggers_per_1000": 1000.0 * counters["triggers"] / unit_updates,
            "triggers": counters["triggers"],
            "unit_updates": unit_updates,
            "denied": counters["denied"],
            "preempted": counters["preempted"],
            "recovered_unit_steps": counters["recovered_steps"],
            "triggers_per_seed": np.asarray(run["counters"]["triggers"]).tolist(),
            quality: float(np.median(run[quality])),
        }
    total = lambda key: int(sum(row[key] for row in rows.values()))
    pooled = {key: total(key) for key in ("triggers", "unit_updates", "denied", "preempted")}
    pooled["false_triggers_per_1000"] = 1000.0 * pooled["triggers"] / pooled["unit_updates"]
    return {**pooled, "methods": rows}


def analyse(config: ml_collections.ConfigDict, watched: dict, acting: dict, settings: dict):
    """The study's summary and raw parts from its stages."""
    warmup = train.library_defaults()["warmup_steps"]
    grid = config.rule.threshold_grid
    old = settings["old_defaults"]
    ratios = {p: rule.pooled(run["records"], warmup) for p, run in watched.items()}
    chosen = rule.choose(rule.evaluate(ratios, config.rule), config.rule.budget_per_1000)
    calibrated = {key: chosen[key] for key in BARS}
    calibration, raw = {}, {}
    for problem, r in ratios.items():
        entry = {
            "unit_updates": int(r.gnmr.shape[1]),
            "replay_max_abs_diff": rule.replay_error(
                r, grid, old["delta_threshold"], old["delta_gate"]
            ),
            "threshold_only_rate_per_1000": {
                str(t): 1000.0 * float(np.mean(r.gnmr[i] / np.float32(t) > np.float32(1.0)))
                for i, t in enumerate(grid)
            },
        }
        for label, bars in (*settings.items(), ("calibrated", calibrated)):
            entry[label] = _at(r, grid, bars, config.quantiles)
        calibration[problem] = entry
        quality = "test_acc" if "test_acc" in watched[problem] else "val_loss"
        raw[problem] = {f"watched_{quality}": reporting.to_jsonable(watched[problem][quality], 5)}

    problems = {}
    for problem in watched:
        steps = (config.mlp if problem == "mlp" else config.lm).num_steps - warmup
        num_units = ratios[problem].gnmr.shape[1] // (config.num_seeds * steps)
        runs = {name: out for (p, name), out in acting.items() if p == problem}
        problems[problem] = {
            setting: _held_out({n: out[setting] for n, out in runs.items()}, num_units, steps)
            for setting in SETTINGS
        }
        problems[problem]["units"] = num_units
    library = settings["new_defaults"]
    goal = {
        f"{p}_new_defaults_at_most_{config.goal_per_1000:g}_per_1000": bool(
            problems[p]["new_defaults"]["false_triggers_per_1000"] <= config.goal_per_1000
        )
        for p in problems
    }
    goal["library_defaults_are_the_rules_output"] = all(
        abs(library[k] - calibrated[k]) < 1e-9 for k in BARS
    )
    summary = {
        "problems": problems,
        "calibrated": calibrated,
        "rule_pick": chosen,
        "library_defaults": library,
        "old_defaults": dict(old),
        "library_locks": {name: train.library_lock(name) for _, name in acting},
        "calibration": calibration,
        "warmup_steps": warmup,
        "quantiles": list(config.quantiles),
        "goal": goal,
    }
    return {"summary": summary, "raw": raw}


# ----------------------------------------------------------------------------- report


def _bars_text(bars: dict) -> str:
    return "/".join(f"{bars[key]:g}" for key in BARS)


def table(result: dict) -> str:
    """False triggers per problem and setting on the held-out seeds, and the rule's pick."""
    summary = result["summary"]
    headers = ["problem", "setting", "bars", "false_trig", "unit_updates", "per_1000", "denied",
               "preempted", "calib_per_1000"]  # fmt: skip
    rows = []
    for problem, entry in summary["problems"].items():
        for setting in SETTINGS:
            bars = summary[setting] if setting == "old_defaults" else summary["library_defaults"]
            held = entry[setting]
            calib = summary["calibration"][problem][setting]
            calib_rate = None if calib is None else calib["rate_per_1000"]
            rows.append([problem, setting, _bars_text(bars), held["triggers"],
                         held["unit_updates"], held["false_triggers_per_1000"], held["denied"],
                         held["preempted"], calib_rate])  # fmt: skip
    pick = summary["rule_pick"]
    config = result["config"]
    notes = [
        f"bars = threshold/delta_threshold/delta_gate; held-out seeds: {config['num_held_out']}, "
        f"calibration seeds: {config['num_seeds']}; calib_per_1000: at-risk rate of a GNMR "
        "that cannot act, on the calibration seeds",
        f"rule's pick: {_bars_text(summary['calibrated'])} ({pick['num_feasible']} of "
        f"{pick['num_candidates']} candidates feasible at <= {config['rule']['budget_per_1000']} "
        "per 1000); worst geometric-mean smallest caught spike "
        f"{max(pick['objective'].values()):.3g}x",
        "locks: old_defaults {}; new_defaults the library's for the action ({})".format(
            config["old_defaults"]["lock_steps"],
            ", ".join(f"{n} {lock}" for n, lock in summary["library_locks"].items()),
        ),
        "score replay vs the controller's own (max abs diff): "
        + ", ".join(f"{p} {c['replay_max_abs_diff']:g}" for p, c in summary["calibration"].items()),
    ]
    return reporting.report(
        "GNMR false triggers per 1000 unit-updates on clean training (held-out seeds)",
        headers,
        rows,
        *notes,
        goal=summary["goal"],
    )


def plot(result: dict, path) -> Any:
    """Survival of the controller's score on the calibration runs (old and new bars, the
    bar at 1 marked), and the held-out false triggers per 1000."""
    summary = result["summary"]
    problems = list(summary["calibration"])
    fig, axes = reporting.figure(1, len(problems) + 1, (4.2 * (len(problems) + 1), 3.8))
    budget = result["config"]["rule"]["budget_per_1000"]
    goal = result["config"]["goal_per_1000"]
    for ax, problem in zip(axes[:-1], problems, strict=True):
        entry = summary["calibration"][problem]
        for setting in (*SETTINGS, "calibrated"):
            at = entry.get(setting)
            if at is None:
                continue
            bars = summary[setting] if setting != "new_defaults" else summary["library_defaults"]
            rate = np.maximum(np.asarray(at["survival_per_1000"], float), 1e-3)
            ax.step(SURVIVAL_POINTS, rate, where="post", color=SETTING_COLORS[setting],
                    ls="--" if setting == "calibrated" else "-",
                    label=f"{setting} ({_bars_text(bars)})")  # fmt: skip
        ax.axvline(1.0, color="k", lw=0.8, ls=":", label="bar (score 1)")
        ax.axhline(budget, color="tab:red", lw=0.8, ls="--", label=f"rule budget {budget:g}")
        ax.axhline(goal, color="tab:red", lw=0.8, ls=":", label=f"goal {goal:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(1e-2 if entry["unit_updates"] < 1e5 else 1e-3, 1.5e3)
        ax.set_xlabel("GNMR score (> 1: at risk)")
        ax.set_ylabel("unit-updates above, per 1000")
        ax.set_title(f"{problem}: score survival, {entry['unit_updates']} calibration unit-updates")
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    x = np.arange(len(problems))
    for k, setting in enumerate(SETTINGS):
        heights = [summary["problems"][p][setting]["false_triggers_per_1000"] for p in problems]
        ax.bar(x + (k - 0.5) * 0.38, heights, 0.38, color=SETTING_COLORS[setting], label=setting)
    ax.axhline(goal, color="tab:red", lw=0.8, ls=":", label=f"goal {goal:g}")
    ax.set_xticks(x, problems)
    ax.set_ylabel("false triggers per 1000 unit-updates")
    ax.set_title("held-out clean runs, GNMR acting")
    ax.legend(fontsize=7)
    fig.suptitle("GNMR calibration on clean training: old bars vs the library's defaults")
    return reporting.save_figure(fig, path)
