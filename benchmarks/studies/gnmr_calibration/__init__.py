"""GNMR calibration: bars that stay quiet on clean training, set by a rule on clean runs.

Question. At what ``threshold``, ``delta_threshold`` and ``delta_gate`` does GNMR raise
at most 1 false trigger per 1000 unit-updates on clean training, and how many did the
old defaults (3, 2, 1) raise? Every trigger of a clean run is a false one, and each
holds GNMR's single recovery slot for at least 11 updates.

Problems (clean: no spikes, no outliers). ``mlp``: the digits MLP of
``spike_injection`` (its size, AdamW settings and minibatches; GNMR's default units,
one per parameter leaf). ``lm_float32`` and ``lm_int8``: the byte-level LM of
``lowprec_lm`` (:mod:`benchmarks.problems.lm`, its model and AdamW settings) with every
layer in float32, or its quantized layers in int8 (per-tensor delayed scaling, the
study's format, without bursts); GNMR's units are the quantized layers
(:func:`optstab.lowprec.recoverable_units`).

Calibration (``calibration`` seeds). AdamW trains each problem while one GNMR per grid
value of ``threshold`` watches every update with ``max_recover=0``: it never enters
recovery, so it passes the gradient on unchanged and folds every update into its
statistics (the same as running GNMR in the chain with ``max_recover=0``). Their
telemetry gives, per unit and update after ``warmup_steps``, the controller's GNMR,
Delta-GNMR and score. The statistics depend on ``threshold`` alone (the cap on what
enters the means), so the score of any Delta bars is recomputed from the recorded
ratios with the controller's own float32 operations (:mod:`.rule`; checked bit-exact
against the recorded score of the watchers' own bars, ``replay_max_abs_diff``). The
rule (``configs/gnmr_calibration.py``) then picks the bars: at most 0.5 at-risk
unit-updates per 1000 on every problem, and among those the bars that catch the
smallest spikes.

Judgement (``held-out`` seeds, another base key). The registry's GNMR methods run,
acting, at the old defaults (the old bars, lock 10) and at the library's current ones
(its bars, and the lock its ``lock_steps=None`` gives the method's action: 1 for clip
and skip, 10 with precision; every other option at its default): ``gnmr_clip`` and
``gnmr_skip`` (``spike_injection``'s rows) on the MLP, ``gnmr_precision``
(``lowprec_lm``'s row) on the LMs. False triggers per 1000
unit-updates = triggers / (methods x seeds x units x updates after warm-up) x 1000.
The study also says whether the library defaults are the rule's output on this run.

Modules: ``train.py`` (watched and acting runs of both problems), ``rule.py`` (the rule,
in numpy), ``report.py`` (summary, table, figure).
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections

from benchmarks.harness import Context, Study, parallel
from benchmarks.harness.study import check_positive
from benchmarks.problems import data, methods
from benchmarks.studies.gnmr_calibration import report, rule, train
from benchmarks.studies.gnmr_calibration.report import plot, table

__all__ = ["STUDY", "plot", "run", "table"]

PROBLEMS = ("mlp", "lm_float32", "lm_int8")


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> tuple[str, ...]:
    """Checks the config and builds every method at both bars; returns the problems."""
    check_positive(config, "num_seeds", "num_held_out", "goal_per_1000")
    check_positive(config.mlp, "hidden", "batch_size", "num_steps", "learning_rate")
    check_positive(config.lm, "width", "depth", "batch_size", "num_steps", "context")
    unknown = [p for p in config.problems if p not in PROBLEMS]
    if unknown or not config.problems:
        raise ValueError(f"problems must be a non-empty subset of {PROBLEMS}; got {unknown}")
    if not rule.candidates(config.rule):
        raise ValueError("the rule's grids hold no candidate (delta_gate_min >= every threshold)")
    if float(config.old_defaults.threshold) not in map(float, config.rule.threshold_grid):
        raise ValueError("old_defaults.threshold must be on rule.threshold_grid")
    warmup = train.library_defaults()["warmup_steps"]
    for key in ("mlp", "lm"):
        if config[key].num_steps <= warmup:
            raise ValueError(f"{key}.num_steps must exceed GNMR's warmup_steps ({warmup})")
    train.lm_quant(config)
    if not methods.uses_gnmr(config.lm_method):
        raise ValueError(f"lm_method must be a GNMR method, got {config.lm_method!r}")
    for name in config.mlp_methods:
        if not methods.uses_gnmr(name):
            raise ValueError(f"mlp_methods must be GNMR methods, got {name!r}")
    for base, names in ((config.mlp, config.mlp_methods), (config.lm, [config.lm_method])):
        for name in names:
            for bars in train.acting_settings(config, name).values():
                methods.optimizer(name, train.gnmr_config(base, bars))
    parallel.check_batch(config.mlp.batch_size, mesh, "mlp.batch_size")
    parallel.check_batch(config.lm.batch_size, mesh, "lm.batch_size")
    return tuple(config.problems)


def measure(problems: tuple[str, ...], context: Context) -> dict:
    """Watched runs on the calibration seeds and acting runs on the held-out seeds (one
    stage per MLP program, one per LM problem), then the rule and the judgement."""
    config, mesh = context.config, context.mesh
    settings = {"old_defaults": dict(config.old_defaults), "new_defaults": train.library_bars()}
    split = data.digits(config.mlp.split_seed, config.mlp.test_fraction)
    mlp_setups = functools.cache(lambda: train.mlp_setups(config, split))  # only if trained
    watched, acting = {}, {}
    for problem in context.each(problems):
        if problem == "mlp":
            watched[problem] = context.stage(
                "mlp_watched", lambda: train.mlp_watched(config, split, mlp_setups()[0], mesh)
            )
            for name in config.mlp_methods:
                acting[(problem, name)] = context.stage(
                    f"mlp_{name}",
                    lambda name=name: train.mlp_acting(
                        config,
                        name,
                        train.acting_settings(config, name),
                        split,
                        mlp_setups()[1],
                        mesh,
                    ),  # fmt: skip
                )
        else:
            runs = context.stage(
                problem,
                lambda problem=problem: train.lm_runs(
                    config,
                    problem,
                    train.lm_corpus(config),
                    train.acting_settings(config, config.lm_method),
                    mesh,
                ),  # fmt: skip
            )
            watched[problem] = runs["watched"]
            acting[(problem, config.lm_method)] = runs["acting"]
    return report.analyse(config, watched, acting, settings)


STUDY = Study("gnmr_calibration", prepare, measure, table, plot)
run = STUDY.run
