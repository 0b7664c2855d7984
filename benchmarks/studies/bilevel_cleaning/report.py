"""Analysis and report of ``bilevel_cleaning``: medians over seeds, cost ratios against
MA-SOBA, the goal checks, the table and the figure."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from benchmarks.harness import reporting
from benchmarks.problems import weighting

# Per-seed figures summarised by their median (None where a method has none).
MEDIAN_KEYS = (
    "test_acc", "detect_f1", "test_loss", "val_acc", "val_loss",
    "clean_weight", "corrupted_weight",
)  # fmt: skip


def summarize(per_seed: dict[str, list[dict]], cost: dict[str, dict]) -> dict:
    """name -> medians over seeds of the per-seed records, and the cost columns."""
    return weighting.summarize(per_seed, cost, MEDIAN_KEYS)


def time_to_target(
    curves: dict[str, list[dict]], rows: dict, config: ml_collections.ConfigDict
) -> tuple[float | None, dict]:
    """AlgoPerf-style time to a target validation accuracy, for every trained method.

    The target is MA-SOBA's final validation accuracy (median over seeds) minus
    ``goal_accuracy_gap``. Per seed, ``steps`` is the first evaluated step whose
    validation accuracy reaches it (so its resolution is ``eval_every``); a method's
    ``steps`` is the median over seeds, counting a seed that never reaches it as
    infinitely slow (``None`` when half or more never do). ``seconds`` is ``steps`` times
    the method's median step time, so that a cheaper step counts.

    Returns ``(target, {name: {"steps", "seconds"}})``; ``(None, {})`` without MA-SOBA.
    """
    reference = rows.get("ma_soba")
    if reference is None or reference.get("val_acc") is None:
        return None, {}
    target = reference["val_acc"] - config.goal_accuracy_gap
    found = {}
    for name, runs in curves.items():
        hits = []
        for run in runs:
            pairs = zip(run["step"], run["val_acc"], strict=True)
            reached = [step for step, acc in pairs if acc >= target]
            hits.append(reached[0] if reached else np.inf)
        steps = float(np.median(hits))
        steps = None if not np.isfinite(steps) else steps
        seconds = None if steps is None else steps * rows[name]["step_time_s"]
        found[name] = {"steps": steps, "seconds": seconds}
    return target, found


def goal_checks(rows: dict, config: ml_collections.ConfigDict) -> tuple[dict, float | None]:
    """The issue's goals for every trained BROS rank, and the memory reduction
    (:func:`benchmarks.problems.weighting.rank_goals`)."""
    return weighting.rank_goals(rows, config)


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
        "val_acc",
        "steps_to_tgt",
        "s_to_tgt",
        "diverged",
        "w_clean",
        "w_corrupt",
        *reporting.COST_HEADERS,
    ]
    rows = [
        [
            name,
            m["test_acc"],
            m.get("test_acc_min"),
            m.get("test_acc_max"),
            m["detect_f1"],
            m.get("val_acc"),
            s["time_to_target"].get(name, {}).get("steps"),
            s["time_to_target"].get(name, {}).get("seconds"),
            f"{m['diverged']}/{config['num_seeds']}" if m["trained"] else None,
            m.get("clean_weight"),
            m.get("corrupted_weight"),
            *reporting.cost_cells(
                m["peak_bytes"],
                m.get("peak_bytes_ratio"),
                m["step_time_s"],
                m.get("step_time_ratio"),
                m["compile_s"],
            ),
        ]  # fmt: skip
        for name, m in ((n, s["methods"][n]) for n in reporting.ordered(s["methods"]))
    ]
    hidden = "x".join(str(h) for h in config["hidden"])
    reduction = s["memory_reduction_vs_ma_soba"]
    return reporting.report(
        f"MLP 64-{hidden}-10 ({s['num_params'] / 1e6:.2f}M params), {s['num_train']} train "
        f"samples, {100 * s['corrupted_fraction']:.0f}% corrupted; {config['num_steps']} steps, "
        f"batch {config['inner_batch']}/{config['outer_batch']}; median over "
        f"{config['num_seeds']} seeds; ratios vs ma_soba; on "
        f"{result['environment']['device_kind']}",
        headers,
        rows,
        "memory reduction vs ma_soba (best BROS rank within 1 pt): "
        + ("none qualifies" if reduction is None else f"{100 * reduction:.1f}%")
        + (" (more bytes than ma_soba)" if reduction is not None and reduction < 0 else "")
        + (
            ""
            if s["target_val_acc"] is None
            else f"\ntime to target: first evaluated step with validation accuracy >= "
            f"{s['target_val_acc']:.3f} (ma_soba's final minus "
            f"{100 * config['goal_accuracy_gap']:.0f} pt), median over seeds (None: not "
            f"reached by half); seconds = steps x median step time"
        ),
        goal=s["goal"],
        goal_title=f"goals (BROS test acc within {100 * config['goal_accuracy_gap']:.0f} pt of "
        f"ma_soba, step time <= {config['goal_time_ratio']}x):",
    )


def plot(result: dict, path) -> Any:
    """Test accuracy over seeds, compiled bytes, and validation-loss / F1 curves."""
    s, raw, config = result["summary"], result["raw"], result["config"]
    names = reporting.ordered(s["methods"])
    trained = [m for m in names if m in raw["seeds"]]
    fig, axes = reporting.figure(1, 4, (18, 4.2))

    weighting.accuracy_and_bytes_panels(axes[:2], result, trained, "trained methods, ")

    for ax, key, title, ylabel in (
        (axes[2], "val_loss", "validation loss (median over seeds)", "cross-entropy (nats)"),
        (axes[3], "detect_f1", "detection F1 of x (median over seeds)", "F1 (fraction)"),
    ):
        shown = [m for m in trained if key in raw["curves"][m][0]]  # F1: solvers only
        for m in shown:
            runs = raw["curves"][m]
            values = np.median(np.asarray([r[key] for r in runs], dtype=float), axis=0)
            ax.plot(runs[0]["step"], values, label=m, lw=1.2, color=reporting.color(m))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        subset = "" if len(shown) == len(trained) else f", {len(shown)} of {len(trained)} methods"
        ax.set_title(title + subset)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.suptitle(
        f"hyper-data cleaning on digits ({100 * s['corrupted_fraction']:.0f}% corrupted labels), "
        f"MLP hidden {tuple(config['hidden'])}, {config['num_steps']} steps"
    )
    return reporting.save_figure(fig, path)
