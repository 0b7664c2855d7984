"""Analysis of ``lowprec_lm``: loss spikes, how the float32 switches followed the
disturbed layers, what a gradient-norm detector could see, medians over seeds, the gap
closed and the goal checks."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from benchmarks.problems import methods
from benchmarks.studies.lowprec_lm.train import EXTRA_METHODS


def count_spikes(loss: np.ndarray, window: int, factor: float) -> int:
    """Runs of steps whose loss exceeds ``factor`` x the median of the previous ``window``
    steps (a non-finite loss counts as above), counted once per run."""
    count, inside = 0, False
    for t in range(window, len(loss)):
        past = loss[t - window : t]
        past = past[np.isfinite(past)]
        above = not np.isfinite(loss[t]) or (len(past) > 0 and loss[t] > factor * np.median(past))
        if above and not inside:
            count += 1
        inside = above
    return count


def detection(out: dict, inputs: dict) -> dict:
    """How well the high-precision switches followed the disturbed layers (seeds pooled).

    A layer-step is *disturbed* when :func:`oracle_mask` marks it (a burst, or the
    scale lag after one, reachable by a detector acting one step late). ``coverage``:
    fraction of disturbed layer-steps run in float32; ``precision``: fraction of
    float32 layer-steps that were disturbed.
    """
    flags = out["high_precision"].astype(bool)
    disturbed = inputs["oracle"]
    return {
        "coverage": float((flags & disturbed).sum() / max(disturbed.sum(), 1)),
        "precision": float((flags & disturbed).sum() / max(flags.sum(), 1)),
    }


def burst_gradient_ratios(out: dict, inputs: dict, before: int = 20, during: int = 5) -> dict:
    """What a gradient-norm detector can see: for every burst (all seeds), the mean of a
    layer's gradient norm over the burst's first ``during`` steps divided by its median
    over the ``before`` steps ahead of it; medians over bursts, for the hit layer and for
    the most-raised other layer. Bursts whose look-back window holds another burst's
    disturbance (``inputs["oracle"]``) are left out."""
    hit, other = [], []
    norms = out["layer_grad_norms"]
    for seed, layer in enumerate(inputs["layer"]):
        alpha = inputs["alpha"][seed]
        starts = np.flatnonzero((layer[1:] >= 0) & (
            (layer[1:] != layer[:-1]) | (alpha[1:] != alpha[:-1])
        )) + 1  # fmt: skip
        for t in starts:
            if (
                t < before
                or t + during > len(layer)
                or inputs["oracle"][seed, t - before : t].any()
            ):
                continue
            baseline = np.median(norms[seed, t - before : t], 0)
            if np.any(baseline <= 0):
                continue
            ratio = norms[seed, t : t + during].mean(0) / baseline
            hit.append(ratio[layer[t]])
            other.append(np.max(np.delete(ratio, layer[t])))
    if not hit:
        return {"bursts": 0, "hit_layer": None, "max_other_layer": None, "hit_layer_above_3x": None}
    return {
        "bursts": len(hit),
        "hit_layer": float(np.median(hit)),
        "max_other_layer": float(np.median(other)),
        "hit_layer_above_3x": float(np.mean(np.asarray(hit) > 3)),
    }


def summarize(
    name: str, out: dict, inputs: dict, config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Per-method medians over seeds (val loss of a diverged seed counts as +inf)."""
    final = out["val_curve"][:, -1]
    finite = np.isfinite(final) & np.all(np.isfinite(out["loss"]), axis=1)
    spikes = [count_spikes(x, config.spike_window, config.spike_factor) for x in out["loss"]]
    row = {
        "val_loss": float(np.median(np.where(np.isfinite(final), final, np.inf))),
        "val_loss_per_seed": final.tolist(),
        "recovery_rate": float(out["high_precision"].mean()),
        "spikes": float(np.median(spikes)),
        "spikes_per_seed": spikes,
        "diverged": int(np.sum(~finite)),
        "step_s": float(np.median(out["chunk_s"]) / config.eval_every),
        "compile_s": float(out["compile_s"]),
    }
    if methods.uses_gnmr(name) or name in EXTRA_METHODS:
        row["detection"] = detection(out, inputs)
    if name == "none":
        row["burst_gradient_ratios"] = burst_gradient_ratios(out, inputs)
    return row


def gap_closed(value: float, none: float, reference: float) -> float | None:
    """``(L_none - L) / (L_none - L_ref)``.

    None when the method diverged or there is no gap; 1 for a finite method when
    ``none`` diverged (the whole, infinite gap is closed).
    """
    if not np.isfinite(value) or none - reference <= 0:
        return None
    if not np.isfinite(none):
        return 1.0
    return float((none - value) / (none - reference))


def add_ratios(rows: dict[str, dict]) -> None:
    """Adds ``gap_closed`` and ``step_time_ratio`` (vs ``none``) to every method's row."""
    reference, none = rows["reference"]["val_loss"], rows["none"]["val_loss"]
    for row in rows.values():
        row["gap_closed"] = gap_closed(row["val_loss"], none, reference)
        row["step_time_ratio"] = row["step_s"] / rows["none"]["step_s"]


def goals(rows: dict[str, dict], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The stress gap, and per GNMR row: gap closed, recovery rate, beats every peer."""
    reference, none = rows["reference"]["val_loss"], rows["none"]["val_loss"]
    best_baseline = min((rows[n]["val_loss"] for n in methods.PEERS if n in rows), default=np.inf)
    out: dict[str, Any] = {
        "stress_gap": (none - reference) / reference if np.isfinite(none) else None,
        "stress_visible": bool(
            not np.isfinite(none) or none - reference >= config.visible_gap * reference
        ),
    }
    gnmr_rows = [name for name in rows if methods.uses_gnmr(name)]
    for name in [*gnmr_rows, "gnmr_amax_precision"]:  # the last: an extra, for reference
        if name not in rows:
            continue
        row = rows[name]
        closed = row["gap_closed"]
        out[f"{name}_closes_80pct"] = bool(closed is not None and closed >= config.goal_gap_closed)
        out[f"{name}_recovery_le_10pct"] = bool(row["recovery_rate"] <= config.goal_recovery_rate)
        out[f"{name}_beats_every_baseline"] = bool(row["val_loss"] < best_baseline)
    return out
