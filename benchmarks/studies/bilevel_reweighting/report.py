"""Analysis and report of ``bilevel_reweighting``: medians over seeds, cost ratios
against MA-SOBA, the goal checks, the table and the figure."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from benchmarks.harness import reporting
from benchmarks.problems import weighting

# Per-seed figures summarised by their median (None where a method has none).
MEDIAN_KEYS = (
    "test_acc",
    "test_loss",
    "val_acc",
    "val_loss",
    "detect_f1",
    "clean_weight",
    "corrupted_weight",
    "rare_class_weight",
    "frequent_class_weight",
)


def summarize(per_seed: dict[str, list[dict]], cost: dict[str, dict]) -> dict:
    """name -> medians over seeds of the per-seed records, the cost columns and their
    ratios to MA-SOBA's."""
    return weighting.summarize(per_seed, cost, MEDIAN_KEYS)


def goal_checks(rows: dict, config: ml_collections.ConfigDict) -> tuple[dict, float | None]:
    """The issue's goal for every BROS rank (:func:`benchmarks.problems.weighting.rank_goals`)
    and the memory reduction. ``met``: some rank is within the accuracy goal, saves at
    least ``goal_reduction`` of the bytes and takes at most ``goal_time_ratio`` of
    MA-SOBA's step time."""
    goal, best = weighting.rank_goals(rows, config)
    if "ma_soba" not in rows:
        return goal, best
    goal["met"] = any(
        goal[f"{name}_within_1pt_of_ma_soba"]
        and goal[f"{name}_time_ratio_ok"]
        and goal[f"{name}_bytes_saved"] >= config.goal_reduction
        for name in rows
        if f"{name}_within_1pt_of_ma_soba" in goal
    )
    return goal, best


def table(result: dict) -> str:
    """One row per method, then the projected leaves, the reduction and the goals."""
    s, config = result["summary"], result["config"]
    headers = [
        "method",
        "test_acc",
        "acc_min",
        "acc_max",
        "detect_f1",
        "diverged",
        "w_clean",
        "w_corrupt",
        "w_rare",
        "w_frequent",
        *reporting.COST_HEADERS,
    ]
    rows = [
        [
            name,
            m["test_acc"],
            m["test_acc_min"],
            m["test_acc_max"],
            m["detect_f1"],
            f"{m['diverged']}/{config['num_seeds']}",
            m["clean_weight"],
            m["corrupted_weight"],
            m["rare_class_weight"],
            m["frequent_class_weight"],
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
    factored = [
        f"{name}: {len(f['projected'])} leaves projected ({', '.join(f['kinds'])}); "
        f"coordinate-dependent weight-shaped values {f['weight_shaped']} factored, "
        f"{f['weight_shaped_dense']} dense"
        + (
            f" (shapes shared with coordinates, not checked: {f['unchecked_shapes']})"
            if f["unchecked_shapes"]
            else ""
        )  # fmt: skip
        for name, f in s["factored"].items()
    ]
    reduction = s["memory_reduction_vs_ma_soba"]
    return reporting.report(
        f"ViT {config['patch']}x{config['patch']} patches, width {config['width']}, depth "
        f"{config['depth']}, {config['heads']} heads ({s['num_params'] / 1e3:.0f}k params); "
        f"{s['num_train']} train samples (imbalance {config['imbalance']:g}, "
        f"{100 * s['corrupted_fraction']:.0f}% noisy labels); {config['num_steps']} steps, "
        f"batch {config['inner_batch']}/{config['outer_batch']}; median over "
        f"{config['num_seeds']} seeds; ratios vs ma_soba; on "
        f"{result['environment']['device_kind']}",
        headers,
        rows,
        "\n".join(factored)
        + "\nmemory reduction vs ma_soba (best BROS rank within 1 pt): "
        + ("none qualifies" if reduction is None else f"{100 * reduction:.1f}%"),
        goal=s["goal"],
        goal_title=f"goals (BROS test acc within {100 * config['goal_accuracy_gap']:.0f} pt of "
        f"ma_soba, >= {100 * config['goal_reduction']:.0f}% fewer bytes, step time <= "
        f"{config['goal_time_ratio']}x):",
    )


def plot(result: dict, path) -> Any:
    """Test accuracy over seeds, compiled bytes, validation accuracy and mean weights."""
    s, raw, config = result["summary"], result["raw"], result["config"]
    names = reporting.ordered(s["methods"])
    fig, axes = reporting.figure(1, 4, (18, 4.2))

    weighting.accuracy_and_bytes_panels(axes[:2], result, names)

    ax = axes[2]
    for m in names:
        runs = raw["curves"][m]
        values = np.median(np.asarray([r["val_acc"] for r in runs], dtype=float), axis=0)
        ax.plot(runs[0]["step"], values, label=m, lw=1.2, color=reporting.color(m))
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy (fraction)")
    ax.set_title("validation accuracy (median over seeds)")
    ax.legend(fontsize=7)

    solvers = [m for m in names if s["methods"][m]["clean_weight"] is not None]
    groups = {
        "clean": "clean_weight",
        "noisy": "corrupted_weight",
        "clean, rare classes": "rare_class_weight",
        "clean, frequent classes": "frequent_class_weight",
    }
    series = {label: {m: s["methods"][m][key] for m in solvers} for label, key in groups.items()}
    subset = "" if len(solvers) == len(names) else f", {len(solvers)} of {len(names)} methods"
    reporting.method_bars(axes[3], solvers, series, "mean sigmoid(x_i)",
                          "learned sample weights (median over seeds)" + subset)  # fmt: skip
    axes[3].set_ylim(0, None)
    axes[3].legend(fontsize=7)
    fig.suptitle(
        f"ViT sample reweighting on digits (imbalance {config['imbalance']:g}, "
        f"{100 * s['corrupted_fraction']:.0f}% noisy labels), {config['num_steps']} steps"
    )
    return reporting.save_figure(fig, path)
