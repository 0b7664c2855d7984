"""Overhead: what does each stability method add to the time and memory of a step, and
how does GNMR's cost grow with the model and with the number of units?

Sections (``config.sections``; each is one checkpointed stage):

* ``optimizer_step``: one donated optimizer step (``tx.update`` and ``apply_updates``,
  ``params`` and optimizer state donated) of a ~16.8M-parameter MLP (``step_sizes``:
  four 2048 x 2048 layers) with the gradients given. This isolates what a method adds
  to the optimizer, the part of training it can change.
* ``train_step``: one donated train step (forward, backward, update) of a
  ~21M-parameter MLP on a fixed batch of random inputs and labels (``sizes``,
  ``batch_size``). Here a method that needs every unit's norm before any update can
  start keeps all gradients alive at once (AdamW alone can free each leaf's gradient
  as soon as its update is done).
* ``scaling_size``: GNMR's optimizer step over model size, square MLPs of
  ``scaling_depth`` layers of every width in ``scaling_widths`` (1M to 105M
  parameters in the full config), one unit per leaf.
* ``scaling_units``: GNMR's optimizer step over the number of units on a fixed model
  (``unit_leaves`` matrices, ``unit_rows`` rows in all, like embedding tables), with
  units of consecutive rows built by ``optstab.units.named``: from 10 units to one
  unit per row (100k).

Methods (:mod:`benchmarks.problems.methods`, plus two of this study,
:data:`steps.LOCAL`): ``adamw`` (the reference in every section), ``gnmr_chain`` =
``chain(optstab.gnmr(), adamw)`` (default actions: precision and clip),
``gnmr_precision`` (``action=("precision",)``), ``gnmr_wrap`` =
``optstab.gnmr_wrap(adamw)`` (its fused freeze, taken for element-wise inner
optimizers), ``gnmr_wrap_generic`` (the same with its generic freeze path forced, the
path any other inner optimizer takes), ``gnmr_chain_injected`` (``gnmr_chain`` under
``optax.inject_hyperparams``: ``max_recover`` is traced, so the budget sorts every
unit instead of a static ``top_k``), and the peers ``clip_by_global_norm``, ``zclip``,
``spam``, ``adagc`` and ``skip_step``.

Measured, per method and point: compiled memory from XLA's memory analysis (argument
+ output + temp - alias bytes), compile time, and step time: the median of timed
rounds after ``warmup_rounds`` untimed ones, every method of a section or point timed
round-robin (rotated order each round) so that load from other processes spreads over
all of them; ratios against ``adamw`` in the same run (and, secondary, the ratio of the
fastest repeats). Sweep points of a smaller model get more rounds
(``sections.repeats_for``).

Goals (from the issue; ``summary.goal``):

* optimizer step: ``gnmr_wrap`` at most ``goal_wrap_time_ratio`` (1.25) of AdamW's time
  and ``goal_wrap_memory_ratio`` (1.01) of its memory;
* train step: ``gnmr_precision`` at most ``goal_precision_memory_ratio`` (1.01) of
  AdamW's memory; ``gnmr_chain`` no dearer than the cheapest peer that reads the
  global gradient norm (``clip_by_global_norm``, ``zclip``, ``skip_step``): memory
  beyond each method's own optimizer state no larger, and the round-by-round time ratio
  not measurably above 1 (the 95% interval of its median reaches 1).

Asymptotic cost. For ``P`` parameter elements in ``L`` leaves and ``U`` units
(``optstab.gnmr``'s docstring gives the library's account): the unit norms are one
extra read of the gradient, ``O(P)``, and the update must wait for them; the clip and
skip actions are a select or scale fused into the optimizer's element-wise pass, and
``gnmr_wrap``'s freeze a select fused into each state update (no extra pass); the
controller is ``O(U log K)`` for a static budget ``K = max_recover`` (``lax.top_k``)
and ``O(U log U)`` for a traced one (a sort), plus ``O(U)`` statistics; the extra
memory is the ``O(U)`` state. AdamW's step moves about ``7P`` words (reads ``p, g, m,
v``, writes ``p, m, v``), so on a memory-bound device the ratio tends to a constant
floor near ``8/7 = 1.14`` as ``P`` grows with ``U`` fixed (less where the read fuses
with Adam's pass or the step is compute-bound), the memory ratio to 1, and at fixed
``P`` the controller's ``O(U log K)`` share grows like ``U / P``. Compile time grows with
``L`` (the per-unit sums are scattered leaf by leaf).

Mesh: with a device mesh the train step's batch is split over its ``data`` axis;
parameters, gradients and optimizer state are replicated (or, with ``fsdp``, their
large leaves split), and the compiled memory is that of one device's program.

Modules: ``steps.py`` (the steps, methods, compile-and-time, paired statistics),
``sections.py`` (the four sections), ``report.py`` (summary, goals, table, figure).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from benchmarks.harness import Context, Study, parallel
from benchmarks.harness.study import check_positive
from benchmarks.studies.overhead import sections, steps
from benchmarks.studies.overhead.report import plot, summarize, table

__all__ = ["STUDY", "plot", "run", "table"]

SECTIONS = ("optimizer_step", "train_step", "scaling_size", "scaling_units")


def _methods_of(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """The method names each section that runs needs."""
    found = {
        "optimizer_step": tuple(config.methods),
        "train_step": tuple(config.train_methods),
        "scaling_size": tuple(config.scaling_methods),
        "scaling_units": tuple(config.unit_methods),
    }
    return {name: found[name] for name in config.sections}


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> dict:
    """Checks the sections, sizes and methods, and builds the optimizers of the two
    step sections (the sweeps build theirs per point): ``{section: {name: tx}}``."""
    unknown = set(config.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    for section, names in _methods_of(config).items():
        steps.check_names(names)
        if "adamw" not in names:
            raise ValueError(f"the overhead study needs 'adamw' in every section ({section})")
    check_positive(config, "step_sizes", "sizes", "batch_size", "step_repeats",
                   "train_repeats", "scaling_widths", "scaling_depth", "scaling_repeats",
                   "unit_counts", "unit_rows", "unit_leaves", "unit_cols")  # fmt: skip
    if config.unit_rows % config.unit_leaves:
        raise ValueError("config.unit_rows must be a multiple of config.unit_leaves")
    if max(config.unit_counts) > config.unit_rows:
        raise ValueError("config.unit_counts cannot exceed config.unit_rows (one unit per row)")
    parallel.check_batch(config.batch_size, mesh, "batch_size")
    for name in config.scaling_methods:
        steps.build(name, config)
    return {
        "optimizer_step": {name: steps.build(name, config) for name in config.methods},
        "train_step": {name: steps.build(name, config) for name in config.train_methods},
    }


def measure(optimizers: dict, context: Context) -> dict:
    """Runs the chosen sections, one stage each, and summarizes them."""
    config, mesh, fsdp = context.config, context.mesh, context.fsdp
    run_section = {
        "optimizer_step": lambda: sections.optimizer_step(
            optimizers["optimizer_step"], config, mesh, fsdp
        ),
        "train_step": lambda: sections.train_step(optimizers["train_step"], config, mesh, fsdp),
        "scaling_size": lambda: sections.scaling_size(config, mesh, fsdp),
        "scaling_units": lambda: sections.scaling_units(config, mesh, fsdp),
    }
    chosen = [name for name in SECTIONS if name in config.sections]
    raw = {
        name: context.stage(name, run_section[name])
        for name in context.each(chosen, desc="overhead sections")
    }
    return {"summary": summarize(raw, config), "raw": raw}


STUDY = Study("overhead", prepare, measure, table, plot)
run = STUDY.run
