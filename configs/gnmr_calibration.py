"""Configuration of the GNMR calibration study (``benchmarks/studies/gnmr_calibration``).

    python -m benchmarks.run gnmr_calibration --config quick   # or tiny, full

Calibration rule (written down before any stress result was looked at; the study
applies it as written, and the library defaults of ``optstab.gnmr`` are its output on
the quick config):

1. Data: clean runs only (no spikes, no outliers) of three problems: the digits MLP of
   ``spike_injection`` (one GNMR unit per parameter leaf, the default units) and the
   byte-level LM of ``lowprec_lm`` in float32 and in int8 (its quantized layers as
   units, ``optstab.lowprec.recoverable_units``), on the *calibration* seeds. GNMR
   watches every update but cannot act (``max_recover=0``: no unit ever enters
   recovery, the gradient reaches AdamW unchanged, every update is observed). Its
   statistics then depend on ``threshold`` alone (the cap ``threshold * m_u`` on what
   enters the means), so one watcher per grid value of ``threshold`` records the
   controller's own GNMR and Delta-GNMR for every unit-update after ``warmup_steps``.
2. A candidate ``(threshold, delta_threshold, delta_gate)`` marks a unit-update at risk
   when its score ``max(GNMR / threshold, Delta-GNMR / delta_threshold if GNMR >
   delta_gate else 0)`` exceeds 1 (the controller's own test, in float32). Its false
   alarm rate on a problem is the number of such unit-updates per 1000 unit-updates
   after warm-up, pooled over that problem's calibration seeds.
3. Feasible: a rate of at most ``budget_per_1000`` = 0.5 (half the goal of 1 false
   trigger per 1000) on *every* problem. Grids: ``threshold`` and ``delta_threshold``
   in 1.5, 2.0, ..., 10.0 (Delta-GNMR stays on: it is half of the published method),
   ``delta_gate`` in 1.0, 1.5, ... below ``threshold`` (1: a climb must at least reach
   the unit's mean).
4. Among feasible candidates, take the one that makes the smallest spike visible. A
   spike that multiplies a unit's gradient norm by S multiplies both ratios by S (both
   means are taken before the update), so at an update with ratios (G, D) the smallest
   factor caught is ``S* = min(threshold / G, max(delta_threshold / D, delta_gate /
   G))``. Objective: the geometric mean of S* over a problem's unit-updates, the
   largest over the problems; smallest wins. Ties: the lower largest rate, then the
   larger values (the quieter candidate).

Judged on *held-out* seeds (another base key): the real controller at its defaults
(``max_recover=1`` and the rest), acting, at the old bars and lock (``old_defaults``)
and at the library's current ones: false triggers (every trigger of a clean run is false)
per 1000 unit-updates after warm-up, against the goal of at most 1.
"""

from __future__ import annotations

import ml_collections

from configs import new_config
from configs import spike_injection as spike_config

PROBLEMS = ("mlp", "lm_float32", "lm_int8")
MLP_KEYS = ("hidden", "batch_size", "num_steps", "learning_rate", "b1", "b2", "eps",
            "weight_decay", "split_seed", "test_fraction")  # fmt: skip


def grid(start: float, stop: float, step: float = 0.5) -> tuple[float, ...]:
    """``start, start + step, ..., stop`` (inclusive)."""
    count = round((stop - start) / step) + 1
    return tuple(round(start + i * step, 6) for i in range(count))


def get_config(size: str = "quick") -> ml_collections.ConfigDict:
    """``size`` is ``"tiny"`` (seconds), ``"quick"`` (2 CPU cores: about 1 minute) or
    ``"full"`` (one GPU)."""
    if size == "tiny":  # small models, few steps: a smoke run (the MLP only: the LM's
        # compilation alone would take the tests' time budget; quick runs every problem)
        c = get_config("quick")
        c.size = "tiny"
        c.num_seeds, c.num_held_out = 2, 2
        c.problems, c.mlp_methods = ("mlp",), ("gnmr_clip",)
        c.mlp.hidden, c.mlp.num_steps = (16,), 60
        c.lm.width, c.lm.depth, c.lm.heads, c.lm.mlp_width = 16, 1, 2, 32
        c.lm.context, c.lm.batch_size, c.lm.num_steps, c.lm.val_windows = 16, 8, 40, 8
        c.rule.threshold_grid = grid(1.5, 4.0)
        c.rule.delta_threshold_grid = grid(1.5, 4.0)
        return c
    quick = size == "quick"
    c = new_config(size)
    c.problems = PROBLEMS
    # Calibration seed s uses fold_in(key(seed), s), s < num_seeds; held-out seed s uses
    # fold_in(key(held_out_seed), s), s < num_held_out. Neither base is spike_injection's
    # (0), so its runs are held out too.
    c.seed = 1
    c.held_out_seed = 2
    c.num_seeds = 5 if quick else 10
    c.num_held_out = 5 if quick else 10

    # The digits MLP of spike_injection (same size, AdamW, minibatches), without spikes.
    spike = spike_config.get_config(size)
    c.mlp = ml_collections.ConfigDict({key: spike[key] for key in MLP_KEYS})
    c.mlp_methods = ("gnmr_clip", "gnmr_skip")  # spike_injection's GNMR rows

    # The byte-level LM of lowprec_lm (its quick / full model and AdamW), no bursts.
    c.lm = ml_collections.ConfigDict(
        {"width": 64 if quick else 256, "depth": 2 if quick else 6, "heads": 4 if quick else 8,
         "mlp_width": 128 if quick else 1024, "context": 32 if quick else 256,
         "batch_size": 16 if quick else 64, "num_steps": 400 if quick else 5000,
         "learning_rate": 3e-3 if quick else 1e-3, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
         "weight_decay": 0.01, "val_fraction": 0.1, "val_windows": 64 if quick else 256}
    )  # fmt: skip
    c.lm_method = "gnmr_precision"  # lowprec_lm's GNMR row: precision action
    # lm_int8: lowprec_lm's format (int8, per-tensor, delayed scaling, nearest);
    # lm_float32: the same model with every layer held in float32.
    c.quant = ml_collections.ConfigDict(
        {"fmt": "int8", "scaling": "per_tensor", "scale_mode": "delayed",
         "rounding": "nearest", "history": 16, "backward_fmt": None}
    )  # fmt: skip

    # The rule (see the docstring).
    c.rule = ml_collections.ConfigDict(
        {
            "budget_per_1000": 0.5,
            "threshold_grid": grid(1.5, 10.0),
            "delta_threshold_grid": grid(1.5, 10.0),
            "delta_gate_step": 0.5,  # delta_gate in 1.0, 1.5, ... below threshold
            "delta_gate_min": 1.0,
        }
    )
    # The defaults before this calibration: the bars (also the watchers' own Delta
    # settings, for the recorded score that checks the replay) and the lock (10 for every
    # action; now 1 for clip and skip, 10 with precision).
    c.old_defaults = ml_collections.ConfigDict(
        {"threshold": 3.0, "delta_threshold": 2.0, "delta_gate": 1.0, "lock_steps": 10}
    )
    c.goal_per_1000 = 1.0
    c.quantiles = (0.5, 0.9, 0.99, 0.999)
    return c
