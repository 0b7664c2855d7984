"""Analysis of ``lowprec_lm``: loss spikes, how the float32 switches followed the
disturbed layers, what a gradient-norm or amax detector could see, the costs of the
precision action and of the recipes, medians over seeds, the gap closed, the layer rule
of ``model_outliers`` and the goal checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from benchmarks.problems import lm, methods
from benchmarks.studies.lowprec_lm.train import EXTRA_METHODS, GNMR_ROWS, RECIPE_PEERS, uses_gnmr
from optstab import lowprec


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
    total = max(disturbed.sum(), 1)
    return {
        "coverage": float((flags & disturbed).sum() / total),
        "precision": float((flags & disturbed).sum() / max(flags.sum(), 1)),
        "missed": {k: float(v / total) for k, v in missed_layer_steps(flags, disturbed).items()},
    }


def missed_layer_steps(flags: np.ndarray, disturbed: np.ndarray) -> dict[str, int]:
    """Why disturbed layer-steps ran in low precision, from the recorded switches alone
    (seeds, steps, layers): ``slot_taken``, another layer was in float32 at that step
    (the budget was spent elsewhere); ``released``, none was, but this layer had been in
    float32 earlier in the same disturbance (a run of disturbed steps), so its lock
    ended before the disturbance did; ``not_detected``, neither."""
    counts = {"slot_taken": 0, "released": 0, "not_detected": 0}
    for seed_flags, seed_disturbed in zip(flags, disturbed, strict=True):
        others = seed_flags.sum(1, keepdims=True) - seed_flags > 0  # (steps, layers)
        for layer in range(seed_flags.shape[1]):
            on, hit, busy = seed_flags[:, layer], seed_disturbed[:, layer], others[:, layer]
            started = False
            for t in range(len(hit)):
                if not hit[t]:
                    started = False
                    continue
                if on[t]:
                    started = True
                elif busy[t]:
                    counts["slot_taken"] += 1
                elif started:
                    counts["released"] += 1
                else:
                    counts["not_detected"] += 1
    return counts


def burst_ratios(
    trace: np.ndarray, inputs: dict, paths: Sequence[str], before: int = 20, during: int = 5
) -> dict:
    """What a detector watching ``trace`` (seeds, steps, layers; a gradient norm or an
    amax per layer) can see: for every burst (all seeds), the mean over the burst's first
    ``during`` steps divided by the median over the ``before`` steps ahead of it, for the
    hit layer and for the most-raised other layer; medians over bursts, also by the hit
    layer's type. Bursts whose look-back window holds another burst's disturbance
    (``inputs["oracle"]``) are left out."""
    hit, other, kinds = [], [], []
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
            baseline = np.median(trace[seed, t - before : t], 0)
            if np.any(baseline <= 0):
                continue
            ratio = trace[seed, t : t + during].mean(0) / baseline
            hit.append(ratio[layer[t]])
            other.append(np.max(np.delete(ratio, layer[t])))
            kinds.append(paths[layer[t]].split("/")[-1])

    def medians(select: np.ndarray) -> dict:
        if not select.any():
            return {"bursts": 0, "hit_layer": None, "max_other_layer": None}
        return {
            "bursts": int(select.sum()),
            "hit_layer": float(np.median(np.asarray(hit)[select])),
            "max_other_layer": float(np.median(np.asarray(other)[select])),
        }

    kinds = np.asarray(kinds, dtype=object)
    out = medians(np.ones(len(hit), bool))
    out["hit_layer_above_3x"] = float(np.mean(np.asarray(hit) > 3)) if hit else None
    out["by_layer_type"] = {k: medians(kinds == k) for k in lm.LAYER_NAMES if (kinds == k).any()}
    return out


# ----------------------------------------------------------------------------- costs


def layer_shapes(config: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
    """``(tokens, inputs, outputs)`` of every quantized matmul of one training step's
    forward pass, in :func:`lm.layer_paths` order."""
    ins = lm.layer_input_widths(config.width, config.mlp_width)
    outs = lm.layer_output_widths(config.width, config.mlp_width)
    tokens = config.batch_size * config.context
    return [(tokens, ins[p.split("/")[-1]], outs[p.split("/")[-1]])
            for p in lm.layer_paths(config.depth)]  # fmt: skip


def high_precision_flop_share(flags: np.ndarray, config: ml_collections.ConfigDict) -> float:
    """Share of the quantized matmuls' FLOPs run in float32: ``flags`` (seeds, steps,
    layers) weighted by each layer's ``2 M K N`` (the backward pass's two matmuls per
    layer have the same weights, so the share holds for them too)."""
    flops = np.array([2.0 * m * k * n for m, k, n in layer_shapes(config)])
    return float((flags * flops).sum() / (flops.sum() * flags.shape[0] * flags.shape[1]))


def recipe_cost(config: ml_collections.ConfigDict, quant: lowprec.QuantConfig) -> dict:
    """What the quantization recipe adds per training step, forward matmuls only (the
    backward's four operands are scaled the same way), counted, not timed:

    * ``scales``: scales computed (one amax reduction and one division each);
      per-tensor: 2 per matmul (activation, weight); fine-grained: ``M * ceil(K / b)``
      activation tiles plus ``ceil(K / b) * ceil(N / b)`` weight blocks;
    * ``scale_bytes``: the scales as float32 (delayed scaling also keeps ``history``
      amaxes per layer, counted too);
    * ``rescale_madds``: multiply-adds to apply the scales to the products: per-tensor
      ``M * N`` (the output once); fine-grained ``M * N * ceil(K / b)`` (each block's
      partial sum is scaled before it is accumulated in float32, as in DeepSeek-V3);
    * ``matmul_flops``: ``2 M K N`` summed, for scale.
    """
    scales = rescale = flops = 0
    for m, k, n in layer_shapes(config):
        flops += 2 * m * k * n
        if quant.scaling == "fine_grained":
            blocks = math.ceil(k / quant.block_size)
            scales += m * blocks + blocks * math.ceil(n / quant.block_size)
            rescale += m * n * blocks
        else:
            scales += (m if quant.scaling == "per_token" else 1) + 1
            rescale += m * n
    layers = len(layer_shapes(config))
    kept = layers * quant.history if quant.scale_mode == "delayed" else 0
    return {"scales": scales, "scale_bytes": 4 * (scales + kept), "rescale_madds": rescale,
            "matmul_flops": flops}  # fmt: skip


def tile_map(config: ml_collections.ConfigDict, block_size: int) -> dict[str, str]:
    """How ``1 x block_size`` tiles and ``block_size`` square blocks fall on each layer
    type at this model's widths (for the report)."""
    ins = lm.layer_input_widths(config.width, config.mlp_width)
    outs = lm.layer_output_widths(config.width, config.mlp_width)
    text = {}
    for name in lm.LAYER_NAMES:
        k, n = ins[name], outs[name]
        rows, cols = math.ceil(k / block_size), math.ceil(n / block_size)
        text[name] = (f"input {k} wide: {rows} tile(s) per token; kernel {k}x{n}: "
                      f"{rows}x{cols} block(s)")  # fmt: skip
    return text


# ----------------------------------------------------------------------------- summaries


def summarize(
    name: str,
    out: dict,
    inputs: dict,
    config: ml_collections.ConfigDict,
    quant: lowprec.QuantConfig,
) -> dict[str, Any]:
    """Per-method medians over seeds (val loss of a diverged seed counts as +inf)."""
    final = out["val_curve"][:, -1]
    finite = np.isfinite(final) & np.all(np.isfinite(out["loss"]), axis=1)
    spikes = [count_spikes(x, config.spike_window, config.spike_factor) for x in out["loss"]]
    flags = out["high_precision"].astype(bool)
    row = {
        "val_loss": float(np.median(np.where(np.isfinite(final), final, np.inf))),
        "val_loss_per_seed": final.tolist(),
        "recovery_rate": float(flags.mean()),
        "high_precision_flop_share": high_precision_flop_share(flags, config),
        "spikes": float(np.median(spikes)),
        "spikes_per_seed": spikes,
        "diverged": int(np.sum(~finite)),
        "step_s": float(np.median(out["chunk_s"]) / config.eval_every),
        "compile_s": float(out["compile_s"]),
    }
    if uses_gnmr(name) or name in EXTRA_METHODS:
        row["detection"] = detection(out, inputs)
    if name in RECIPE_PEERS:
        row["recipe_cost"] = recipe_cost(config, quant)
    if name == "none":
        paths = lm.layer_paths(config.depth)
        row["burst_gradient_ratios"] = burst_ratios(out["layer_grad_norms"], inputs, paths)
        row["burst_amax_ratios"] = burst_ratios(out["amax_signal"], inputs, paths)
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
    """Adds ``gap_closed`` and ``step_time_ratio`` (vs ``none``) to every method's row
    (nothing without both ``reference`` and ``none``)."""
    if "reference" not in rows or "none" not in rows:
        return
    reference, none = rows["reference"]["val_loss"], rows["none"]["val_loss"]
    for row in rows.values():
        row["gap_closed"] = gap_closed(row["val_loss"], none, reference)
        row["step_time_ratio"] = row["step_s"] / rows["none"]["step_s"]


def relative_change(value: float, base: float) -> float:
    return float((value - base) / base)


def admitted_layers(
    reference_by_type: dict[str, float], clean: float, tolerance: float
) -> list[str]:
    """The ``model_outliers`` rule (from the float32 reference alone): the layer types
    whose reference with bursts on them alone ends within ``tolerance`` (relative) of the
    clean reference's validation loss."""
    return [k for k, v in reference_by_type.items() if abs(relative_change(v, clean)) <= tolerance]


def goals(rows: dict[str, dict], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The stress gap; per GNMR row: gap closed, recovery rate, beats every peer's
    median; the best GNMR row and how it compares with fine-grained scaling."""
    reference, none = rows["reference"]["val_loss"], rows["none"]["val_loss"]
    peers = [n for n in methods.PEERS if n in rows]
    best_peer = min((rows[n]["val_loss"] for n in peers), default=np.inf)
    out: dict[str, Any] = {
        "stress_gap": relative_change(none, reference) if np.isfinite(none) else None,
        "stress_visible": bool(
            not np.isfinite(none) or none - reference >= config.visible_gap * reference
        ),
    }
    met = {}
    for name in (n for n in GNMR_ROWS if n in rows):
        row, closed = rows[name], rows[name]["gap_closed"]
        checks = {
            "closes_80pct": bool(closed is not None and closed >= config.goal_gap_closed),
            "recovery_le_10pct": bool(row["recovery_rate"] <= config.goal_recovery_rate),
            "beats_every_peer": bool(row["val_loss"] < best_peer),
        }
        out.update({f"{name}_{k}": v for k, v in checks.items()})
        met[name] = checks
    if met:
        # The best row: the most gap closed within the recovery budget, if any row keeps it.
        within = [n for n in met if met[n]["recovery_le_10pct"]] or list(met)
        best = max(within, key=lambda n: -np.inf if rows[n]["gap_closed"] is None
                   else rows[n]["gap_closed"])  # fmt: skip
        out["best_gnmr"] = best
        out["best_gnmr_meets_goal"] = bool(all(met[best].values()) and out["stress_visible"])
        if "fine_grained" in rows:
            out["best_gnmr_minus_fine_grained_val_loss"] = (
                rows[best]["val_loss"] - rows["fine_grained"]["val_loss"]
            )
    return out
