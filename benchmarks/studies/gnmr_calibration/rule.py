"""The calibration rule of ``gnmr_calibration`` (stated in ``configs/gnmr_calibration.py``),
in numpy, on the watchers' records.

A watcher at ``threshold`` records, per unit-update, the controller's GNMR ``G`` and
Delta-GNMR ``D``. For any Delta bars the controller's score is a function of ``(G, D)``
alone; :func:`scores` computes it with the float32 operations the compiled controller
performs (``level = G / threshold``; ``D / delta_threshold`` where ``G > delta_gate``;
their maximum), so it equals what the controller computes; :func:`replay_error`
checks that on the recorded score of the watchers' own Delta bars.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

F32 = np.float32


class Ratios(NamedTuple):
    """One problem's unit-updates after warm-up, pooled over seeds, per threshold."""

    gnmr: np.ndarray  # (thresholds, N) float32
    delta_gnmr: np.ndarray  # (thresholds, N) float32
    score: np.ndarray  # (thresholds, N) float32: the recorded score (watchers' Delta bars)


def pooled(records: Mapping[str, np.ndarray], warmup: int) -> Ratios:
    """The records ``(seeds, steps, thresholds, units)`` from update ``warmup`` on, as
    ``(thresholds, seeds * steps * units)``."""

    def flat(x):
        x = np.asarray(x, F32)[:, warmup:]
        return np.moveaxis(x, 2, 0).reshape(x.shape[2], -1)

    return Ratios(flat(records["gnmr"]), flat(records["delta_gnmr"]), flat(records["score"]))


def scores(g: np.ndarray, d: np.ndarray, threshold, delta_threshold, delta_gate) -> np.ndarray:
    """The controller's ranking score for ratios ``g``, ``d`` (float32, as in
    ``optstab.stability.gnmr._signal_scores``). XLA compiles the controller's division
    by a bar (a scalar broadcast over the units) as a product with the bar's float32
    reciprocal, which can differ from the correctly rounded quotient by one unit in the
    last place; the replay does the same."""
    level = g * (F32(1.0) / F32(threshold))
    climbing = g > F32(delta_gate)
    delta = d * (F32(1.0) / F32(delta_threshold))
    return np.maximum(level, np.where(climbing, delta, F32(0.0)))


def replay_error(ratios: Ratios, thresholds: Sequence[float], delta_threshold, delta_gate):
    """Largest ``|replayed - recorded|`` score over every threshold and unit-update (0.0
    when the replay is bit-exact)."""
    worst = 0.0
    for i, threshold in enumerate(thresholds):
        got = scores(ratios.gnmr[i], ratios.delta_gnmr[i], threshold, delta_threshold, delta_gate)
        worst = max(worst, float(np.max(np.abs(got - ratios.score[i]), initial=0.0)))
    return worst


def smallest_spike(g, d, threshold, delta_threshold, delta_gate) -> np.ndarray:
    """``S* = min(threshold / G, max(delta_threshold / D, delta_gate / G))``: the smallest
    factor on a unit's gradient norm that the bars would catch at each update."""
    g, d = np.asarray(g, np.float64), np.asarray(d, np.float64)
    with np.errstate(divide="ignore"):
        return np.minimum(threshold / g, np.maximum(delta_threshold / d, delta_gate / g))


def geometric_mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.exp(np.mean(np.log(x)))) if x.size else float("inf")


def candidates(rule: Mapping) -> list[tuple[float, float, float]]:
    """Every ``(threshold, delta_threshold, delta_gate)`` of the grids (gate below the
    threshold)."""
    out = []
    for threshold, delta in itertools.product(rule["threshold_grid"], rule["delta_threshold_grid"]):
        gate = rule["delta_gate_min"]
        while gate < threshold - 1e-9:
            out.append((float(threshold), float(delta), round(gate, 6)))
            gate += rule["delta_gate_step"]
    return out


def evaluate(problems: Mapping[str, Ratios], rule: Mapping) -> list[dict]:
    """Rate (per 1000 unit-updates) and objective of every candidate on every problem."""
    index = {float(t): i for i, t in enumerate(rule["threshold_grid"])}
    rows = []
    for threshold, delta, gate in candidates(rule):
        i = index[threshold]
        rates, objectives = {}, {}
        for name, ratios in problems.items():
            g, d = ratios.gnmr[i], ratios.delta_gnmr[i]
            over = scores(g, d, threshold, delta, gate) > F32(1.0)
            rates[name] = 1000.0 * float(np.mean(over))
            objectives[name] = geometric_mean(smallest_spike(g, d, threshold, delta, gate))
        rows.append({"threshold": threshold, "delta_threshold": delta, "delta_gate": gate,
                     "rates_per_1000": rates, "objective": objectives})  # fmt: skip
    return rows


def choose(rows: list[dict], budget: float) -> dict:
    """The rule's pick: feasible (every problem's rate <= ``budget``), smallest largest
    objective; ties: lower largest rate, then larger values."""
    feasible = [row for row in rows if max(row["rates_per_1000"].values()) <= budget]
    if not feasible:
        raise ValueError(f"no candidate of the grids keeps every problem at <= {budget} per 1000")

    def key(row):
        worst = round(max(row["objective"].values()), 9)
        rate = max(row["rates_per_1000"].values())
        return (worst, rate, -row["threshold"], -row["delta_threshold"], -row["delta_gate"])

    best = min(feasible, key=key)
    return {**best, "num_feasible": len(feasible), "num_candidates": len(rows)}


def survival(values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Per 1000 values: how many exceed each of ``points``."""
    ordered = np.sort(np.asarray(values, np.float64))
    above = len(ordered) - np.searchsorted(ordered, points, side="right")
    return 1000.0 * above / max(len(ordered), 1)


def quantiles(ratios: Ratios, i: int, bars: Mapping, qs: Sequence[float]) -> dict:
    """Quantiles of GNMR, of Delta-GNMR on the updates the gate lets through, and of the
    score at ``bars``, for the watcher ``i`` (at ``bars["threshold"]``)."""
    g, d = ratios.gnmr[i], ratios.delta_gnmr[i]
    gated = d[g > F32(bars["delta_gate"])]
    score = scores(g, d, bars["threshold"], bars["delta_threshold"], bars["delta_gate"])

    def q(x):
        return {str(p): float(np.quantile(x, p)) if x.size else None for p in qs}

    return {"gnmr": q(g), "delta_gnmr_gated": q(gated), "score": q(score),
            "gated_fraction": float(np.mean(g > F32(bars["delta_gate"])))}  # fmt: skip
