"""Spike injection: does a stability method keep training on track under gradient spikes?

Setup. An MLP classifies the scikit-learn digits (offline, standardised, one fixed
stratified split) with AdamW on random minibatches. Every method trains from the same
initialisation on the same minibatches and, except ``clean``, under the same spikes.

Stress. From step ``spike_start`` on, each step carries a spike event with probability
``spike_prob``. An event hits one parameter leaf (an optstab *unit*, e.g.
``"layer1/w"``) drawn uniformly, with a magnitude S drawn log-uniformly in
``[spike_min, spike_max]``. With ``spike_kind="random"`` (the default) the leaf's
gradient g becomes ``g + S * |g| * u`` for a unit-norm Gaussian direction u: a
garbage gradient whose norm is about S times the true one, as a numerical fault would
produce. (``"scale"`` multiplies g by S instead; that keeps the direction and is the
milder stress for Adam, whose step is scale-free.) The calibrated stress (see
``configs/spike_injection.py`` for how it was found) is p = 0.2 per step, S in
[10, 1e4], random direction, AdamW at lr 3e-3, spikes from step 100 of 1000 (quick)
or 3000 (full). Per seed, a jitted setup function draws from the seed's key alone
the initial parameters, every step's minibatch indices and the spike schedule
(event, unit, S, and an offset into a per-seed pool of Gaussian numbers from which
the direction u is read), so within a seed every method sees the same data and the
same spikes at the same steps. The spike is added after backpropagation and before
the optimizer, where the methods would see a real one.

Methods (:mod:`benchmarks.problems.methods`). ``clean`` (no spikes) and ``none``
(spikes, plain AdamW) bracket the range;
``clip_by_global_norm`` clips at ``clip_factor`` times the median global gradient norm
of the clean runs; ``zclip``, ``adagc``, ``spam`` and ``skip_step`` are the optstab
baselines at their published defaults; ``gnmr_clip`` chains ``optstab.gnmr`` with the
clip action before AdamW and ``gnmr_skip`` wraps AdamW with the skip action, both at
the library defaults; ``gnmr_clip_budget2`` and ``gnmr_skip_budget2`` are the same
with a budget sized to the stress (``max_recover=2``, ``lock_steps=3``; the sizing
rule is in the config).

Measured, per seed: train loss and global gradient norm (after injection) at every
step; final test loss and accuracy; divergence (non-finite loss or parameters, or a
final test loss above ``divergence_factor`` times the initial one); spikes caught (an
injected event whose unit the method acted on at that step: GNMR's ``recovering``
mask, a global clip or skip that fired, a per-unit clip that fired on the hit unit;
null where a method exposes no such signal); GNMR's recovered unit-steps, triggers
and budget denials. The training loop is one ``lax.scan`` over steps under
``jax.vmap`` over seeds: one compilation per method, and one checkpointed stage.

Modules: ``stress.py`` (the spike schedule and its injection), ``train.py`` (setup and
training), ``report.py`` (analysis, table, figure).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

import optstab
from benchmarks.harness import Context, Study, parallel, reporting
from benchmarks.harness.study import check_positive
from benchmarks.problems import data, methods, models
from benchmarks.problems import spike_training as train
from benchmarks.problems import spikes as stress
from benchmarks.studies.spike_injection import report
from benchmarks.studies.spike_injection.report import plot, table

__all__ = ["STUDY", "plot", "run", "table"]

STRESS_KEYS = ("spike_kind", "spike_prob", "spike_min", "spike_max", "spike_start",
               "learning_rate", "num_steps")  # fmt: skip


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> list[str]:
    """Checks the config and builds every method; returns the methods in training
    order (``clean`` first: ``clip_by_global_norm``'s bound comes from its runs)."""
    check_positive(config, "num_steps", "batch_size", "hidden", "spike_min", "spike_max")
    if config.spike_kind not in stress.KINDS:
        raise ValueError(f"spike_kind must be one of {stress.KINDS}, got {config.spike_kind!r}")
    if not 0.0 <= config.spike_prob <= 1.0 or config.spike_min > config.spike_max:
        raise ValueError("need 0 <= spike_prob <= 1 and spike_min <= spike_max")
    names = list(config.methods)
    for name in names:  # a placeholder bound: the real one is known after `clean`
        methods.optimizer(name, config, roles=train.ROLES, clip_norm=1.0)
    if "clip_by_global_norm" in names and "clean" not in names:
        raise ValueError("clip_by_global_norm needs the clean method (its bound comes from it)")
    parallel.check_batch(config.batch_size, mesh, "batch_size")
    return sorted(names, key=lambda name: name != "clean")


def measure(names: list[str], context: Context) -> dict:
    """Trains every method on every seed (one stage each) and summarises."""
    config, mesh = context.config, context.mesh
    split = data.digits(config.split_seed, config.test_fraction)
    setup = train.make_setup(config, split)
    setup = parallel.place_setup(setup, mesh, context.fsdp)  # seeds stay whole
    first = jax.tree.map(lambda leaf: leaf[0], setup["params"])
    units = optstab.tree.leaf_names(first)
    raw: dict[str, dict] = {}
    clip = float("nan")
    for name in context.each(names):
        trained = context.stage(
            name,
            lambda name=name, clip=clip: train.train_method(name, config, split, setup, clip, mesh),
        )
        out = trained["out"]
        if name == "clean":
            clip = report.clip_norm_from_clean(out, config)
        stride = config.curve_stride
        raw[name] = {
            "seeds": report.per_seed(out, config),
            "train_loss": reporting.to_jsonable(out["curves"]["loss"][:, ::stride], digits=5),
            "grad_norm": reporting.to_jsonable(out["curves"]["grad_norm"][:, ::stride], digits=5),
            "compile_s": trained["compile_s"],
            "run_s": trained["run_s"],
        }
    summaries = {name: report.summarize_method(raw[name]["seeds"]) for name in names}
    unit_steps = config.num_steps * len(units) * config.num_seeds
    for name in filter(methods.uses_gnmr, names):  # fraction of unit-steps in recovery
        summaries[name]["recovery_rate"] = summaries[name]["recovered_unit_steps"] / unit_steps
    summary = {
        "methods": summaries,
        "goal": report.goal_checks(summaries, config),
        "stress": {key: config[key] for key in STRESS_KEYS},
        "clip_norm": clip if math.isfinite(clip) else None,
        "num_params": models.num_params(first),
        "units": units,
    }
    return {
        "summary": summary,
        "spike_schedule": stress.schedule_record(setup["schedule"], units),
        "raw": raw,
    }


STUDY = Study("spike_injection", prepare, measure, table, plot)
run = STUDY.run
