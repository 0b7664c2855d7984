"""Table and figure of ``lowprec_lm``: one table and one row of panels per regime."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.harness import reporting

HEADERS = ["method", "val_loss", "gap_closed", "recovery_rate", "hp_flops", "spikes", "diverged",
           "step_time_ratio", "compile_s", "coverage"]  # fmt: skip
SHOWN_MAPS = ("gnmr", "gnmr_amax", "gnmr_both", "oracle_precision")


def _pct(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def method_rows(rows: dict) -> list:
    out = []
    for name in reporting.ordered(rows):
        m = rows[name]
        coverage = m.get("detection", {}).get("coverage")
        out.append([
            name, f"{m['val_loss']:.4f}", _pct(m.get("gap_closed")),
            _pct(m["recovery_rate"], 1), _pct(m["high_precision_flop_share"], 1), m["spikes"],
            m["diverged"], f"{m.get('step_time_ratio', float('nan')):.2f}",
            f"{m['compile_s']:.1f}", _pct(coverage),
        ])  # fmt: skip
    return out


def split_table(part: dict) -> str:
    headers = ["hit layer", "reference", "vs clean", "kept", "none", "gap", "oracle_closed",
               "grad_ratio"]  # fmt: skip
    rows = []
    for kind, s in part["by_layer_type"].items():
        oracle = s["methods"].get("oracle_precision", {}).get("gap_closed")
        ratio = s["burst_gradient_ratio_hit_layer"]
        rows.append([kind, f"{s['reference_val_loss']:.4f}", _pct(s["reference_change"], 1),
                     s["kept"], f"{s['none_val_loss']:.4f}", _pct(s["gap"], 1), _pct(oracle),
                     "-" if ratio is None else f"{ratio:.2f}x"])  # fmt: skip
    return reporting.format_table(headers, rows)


def cost_lines(rows: dict) -> list[str]:
    lines = []
    for name in ("current_scaling", "fine_grained"):
        cost = rows.get(name, {}).get("recipe_cost")
        if cost:
            lines.append(
                f"  {name}: {cost['scales']} scales ({cost['scale_bytes']} B) and "
                f"{cost['rescale_madds']:.3g} rescaling multiply-adds per step, every layer "
                f"({cost['rescale_madds'] / cost['matmul_flops']:.2%} of the matmul FLOPs)"
            )
    return lines


def detection_lines(rows: dict) -> list[str]:
    lines = []
    for name in reporting.ordered(rows):
        found = rows[name].get("detection")
        if found and "missed" in found:
            missed = found["missed"]
            lines.append(
                f"  {name}: float32 on {_pct(found['coverage'])} of the disturbed layer-steps "
                f"({_pct(found['precision'])} of its float32 layer-steps were disturbed); missed "
                f"while another layer held float32 {_pct(missed['slot_taken'])}, after release "
                f"{_pct(missed['released'])}, never detected {_pct(missed['not_detected'])}"
            )
    return lines


def goal_lines(goal: dict) -> list[str]:
    lines = [reporting.format_goals(goal)]
    lines.append(f"  stress gap (none - reference) / reference: {_pct(goal.get('stress_gap'), 1)}")
    if "best_gnmr" in goal:
        lines.append(f"  best GNMR row: {goal['best_gnmr']}")
    if "best_gnmr_minus_fine_grained_val_loss" in goal:
        diff = goal["best_gnmr_minus_fine_grained_val_loss"]
        lines.append(f"  best GNMR val_loss - fine_grained val_loss: {diff:+.4f}")
    return lines


def table(result: dict) -> str:
    """Per regime: its heading, the methods, the recipes' costs, the goals; the split by
    layer type of ``model_outliers``."""
    summary, config = result["summary"], result["config"]
    quant = config["quant"]
    lines = [
        f"recipe: {quant['fmt']} {quant['scaling']} {quant['scale_mode']} scaling (history "
        f"{quant['history']}), {quant['rounding']} rounding; median over {config['num_seeds']} "
        "seeds; val loss in nats/byte (float32, no outliers); hp_flops: share of the "
        "quantized matmul FLOPs run in float32",
    ]
    if "fine_grained_tiles" in result:
        tiles = "; ".join(f"{k}: {v}" for k, v in result["fine_grained_tiles"].items())
        lines.append(f"fine_grained at these widths: {tiles}")
    for regime, part in summary["regimes"].items():
        bursts = result["bursts"].get(regime)
        share = "" if not bursts else f"; bursts on {_pct(bursts['fraction_of_steps'])} of steps"
        if regime == "model_outliers":
            lines += [
                f"\nmodel_outliers, split by layer type (bursts on one type at a time; rule: "
                f"reference within {_pct(part['reference_tolerance'])} of the clean "
                f"{part['clean_reference_val_loss']:.4f})",
                split_table(part),
            ]
            if "skipped" in part:
                lines.append(f"model_outliers: {part['skipped']}")
                continue
            share += (f"; layers {', '.join(part['layers'])}; reference "
                      f"{_pct(part['reference_change'], 1)} vs clean")  # fmt: skip
        if regime == "persistent":
            pq = config["persistent_quant"]
            share = f": no bursts, {pq['fmt']} {pq['scaling']} {pq['scale_mode']} everywhere"
        table_text = reporting.format_table(HEADERS, method_rows(part["methods"]))
        lines += [f"\n{regime}{share}", table_text]
        lines += cost_lines(part["methods"])
        if regime != "persistent":
            lines += detection_lines(part["methods"])
        if "goal" in part:
            lines += [f"goals ({regime}):", *goal_lines(part["goal"])]
    return "\n".join(lines)


def _val_curves(ax, part: dict, raw: dict, config: dict, regime: str) -> None:
    names = reporting.ordered(part["methods"])
    evals = np.arange(config["num_steps"] // config["eval_every"] + 1) * config["eval_every"]
    for name in names:
        curve = np.median(np.asarray(raw[name]["val_curve"], dtype=float), axis=0)
        ax.plot(evals, curve, color=reporting.color(name), label=name,
                lw=2 if name.startswith("gnmr") else 1.1)  # fmt: skip
    lo = min(np.nanmin(np.asarray(raw[n]["val_curve"], dtype=float)) for n in names)
    ax.set_ylim(lo - 0.05, lo + 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte, median of seeds)")
    ax.set_title(f"{regime}: validation loss, every method")
    ax.legend(fontsize=6, ncol=2)


def _recovery_map(ax, raw: dict, result: dict, regime: str, total: int) -> None:
    config, paths = result["config"], result["layers"]
    shown = [m for m in SHOWN_MAPS if m in raw]
    layer = np.asarray(result["bursts"][regime]["layer"][0]) if regime in result["bursts"] else None
    grid = np.zeros((max(len(shown), 1) * len(paths), config["num_steps"]))
    labels = []
    for k, method in enumerate(shown):
        for step, unit in raw[method]["high_precision_seed0"]:
            grid[k * len(paths) + unit, step] = 1
        labels += [f"{method}: {p}" for p in paths]
        if k:
            ax.axhline(k * len(paths) - 0.5, color="k", lw=0.8)
    ax.imshow(grid, aspect="auto", cmap="Blues", interpolation="nearest", vmin=0, vmax=1.5)
    if layer is not None:
        hit = np.nonzero(layer >= 0)[0]
        for k in range(len(shown)):
            ax.scatter(hit, k * len(paths) + layer[hit], s=2, color="tab:red", marker="s",
                       label="burst on this layer" if k == 0 else None)  # fmt: skip
        ax.legend(fontsize=7, loc="upper right")
    ax.set_yticks(range(len(labels)), labels, fontsize=5)
    ax.set_xlabel("step")
    ax.set_title(f"{regime}, seed 0: float32 layers (blue), bursts (red); "
                 f"{len(shown)} of {total} methods")  # fmt: skip


def _final_losses(ax, part: dict, regime: str) -> None:
    names = reporting.ordered(part["methods"])
    for i, name in enumerate(names):
        values = np.asarray(part["methods"][name]["val_loss_per_seed"], dtype=float)
        ax.scatter(np.full(len(values), i), values, color=reporting.color(name), s=14)
        ax.hlines(part["methods"][name]["val_loss"], i - 0.3, i + 0.3, color=reporting.color(name))
    ax.axhline(part["reference_val_loss"], color="k", lw=0.6, ls=":")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("final validation loss (nats/byte; bar = median)")
    ax.set_title(f"{regime}: final validation loss (dotted: reference)")


def plot(result: dict, path) -> Any:
    """Per regime: validation curves, the seed-0 float32 map of the GNMR rows and the
    oracle, the final losses per seed."""
    regimes = [r for r, part in result["summary"]["regimes"].items() if "methods" in part]
    fig, axes = reporting.figure(len(regimes), 3, (19, 4.8 * len(regimes)), squeeze=False)
    for row, regime in zip(axes, regimes, strict=True):
        part, raw = result["summary"]["regimes"][regime], result["raw"][regime]
        _val_curves(row[0], part, raw, result["config"], regime)
        _recovery_map(row[1], raw, result, regime, len(part["methods"]))
        _final_losses(row[2], part, regime)
    fig.suptitle("low-precision LM: outlier bursts (quantizer only / in the model) and a "
                 "persistent coarse format")  # fmt: skip
    return reporting.save_figure(fig, path)
