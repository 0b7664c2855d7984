"""Low-precision stress: does GNMR's precision action keep a low-precision LM on track?

Setup. A byte-level decoder-only transformer (:mod:`benchmarks.problems.lm`) learns next-byte
prediction on Python standard-library sources (offline; corpus, size, Python version and
SHA-256 are recorded in the JSON). Its four matmuls per block (``qkv``, ``proj``, ``up``,
``down``) are fake-quantized (:class:`optstab.lowprec.QuantLinear`), int8 with per-tensor
delayed scaling by default (``config.quant``). Every method trains from the same
initialisation on the same batches under the same bursts; AdamW throughout. Validation
loss (nats per byte) is measured in float32 without outliers on fixed held-out windows,
so it judges the trained weights. The gap is ``none - reference``; a method's
``gap_closed`` is the share of it that the method removes.

Stress (the kind of event GNMR is for; methods.md section 4): activation-outlier *bursts*.
After ``burst_start`` steps, whenever no burst is running a new one starts with
probability ``burst_prob`` per step; it picks one quantized layer of the regime's layer
types, ``burst_channels`` input channels of it and a magnitude alpha (log-uniform in
``[alpha_min, alpha_max]``), and multiplies those channels of the layer's input by alpha
for ``burst_length`` steps. With per-tensor scaling the outliers set the scale and crush
every other value onto a few grid points; delayed scaling keeps that scale for
``history`` steps after the burst. Two regimes:

* ``quantizer_outliers``: only the quantizer sees the outliers, on every token
  (``Q(x * a) / a``); the float32 function, and so the reference, never sees them, so the
  regime's reference is the clean run (``clean-reference``, reused: a test checks the
  bits are the same).
* ``model_outliers``: the outliers are real in the function on the sequence positions
  ``model_outliers.positions`` (position 0), as massive activations are, so the float32
  reference sees them too. Its layer types are chosen by a rule on the float32
  reference alone (the config's docstring): first the *split by layer type*: for each
  candidate type, ``model_outliers.split_methods`` (``reference``, ``none`` and, at the
  full size, ``oracle_precision``) train with bursts on that type only; a type is kept
  when that reference ends within ``reference_tolerance`` of the clean reference; then
  the regime runs every method with bursts on the kept types.
* ``persistent`` (the boundary of the claim): no bursts, a coarse format everywhere
  (``persistent_quant``, float4); ``persistent_methods`` only.

Methods (:mod:`benchmarks.problems.methods` and :data:`train.ROLES`). ``reference``: every
layer in float32. ``none``: low precision, plain AdamW. Optimizer-level peers:
``clip_by_global_norm``, ``zclip``, ``spam``, ``skip_step``. Recipe-level peers (plain
AdamW under another quantization recipe from ``optstab.lowprec``, every layer, every
step): ``current_scaling`` (no amax history: no lag) and ``fine_grained``
(DeepSeek-V3's 1x128 activation tiles and 128x128 weight blocks, current scaling).
GNMR rows, chained before AdamW with the precision action at the library defaults and
``units=lowprec.recoverable_units(model)`` (one unit per quantized layer; norms,
embeddings and the head are not watched): ``gnmr`` watches the layers' gradient norms,
``gnmr_amax`` the amax each layer's next scale is computed from
(``unit_signal=lowprec.amax_signal(model)``), ``gnmr_both`` both. The training step sets
``lowprec.set_high_precision(model, optstab.recovery_mask(opt_state))`` before the
forward pass. ``oracle_precision`` (a reference for the action, not a contender) holds in
float32 every layer a burst disturbs, from the step after the burst starts until its
scale has recovered (``history`` steps after it ends): a perfect detector acting as late
as GNMR does.

Measured per seed: validation loss every ``eval_every`` steps and at the end; train loss
per step (spikes: a step whose loss exceeds the median of the previous
``spike_window`` steps by ``spike_factor`` times, counted once per run of such steps);
which quantized layers ran in float32 at each step (recovery rate: the share of
layer-steps; ``high_precision_flop_share``: the share of the quantized matmuls' FLOPs;
``detection``: coverage and precision against the disturbed layer-steps); per-layer
gradient norms and amax signals of ``none`` at bursts (``burst_gradient_ratios``,
``burst_amax_ratios``: what each detector can see, by layer type); step time (median
over chunks after compilation, as a ratio to ``none`` in the same run; the simulation
computes both paths of every layer, so it says nothing of hardware speed) and, for the
recipes, a count of scales, scale bytes and rescaling multiply-adds per step
(``recipe_cost``). The training loop is a ``lax.scan`` over steps under ``jax.vmap``
over seeds; one compilation per (registry method, recipe) serves every regime
(:class:`train.Programs`); each method and regime is a checkpointed stage with a
resumable loop of ``eval_every``-step chunks inside; with more than one device the batch
is sharded over a ``("data",)`` mesh (data parallel).

Summary: ``regimes`` -> {regime -> {``methods`` -> {name -> {``val_loss``,
``gap_closed``, ``recovery_rate``, ``step_time_ratio``, ...}}, ``reference_val_loss``,
``none_val_loss``, ``goal``}}, ``model_outliers`` also with ``layers`` (kept by the
rule), ``clean_reference_val_loss``, ``reference_change`` and ``by_layer_type``; the
``quantizer_outliers`` regime's ``methods``, ``reference_val_loss``, ``none_val_loss`` and
``goal`` also at the top level, and ``persistent``.

Modules: ``stress.py`` (bursts and inputs), ``train.py`` (methods, model, training),
``analysis.py`` (spikes, detection, costs, gap, rule, goals), ``report.py`` (table, figure).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from benchmarks.harness import Context, Study, parallel, reporting
from benchmarks.harness.study import check_positive
from benchmarks.problems import lm, methods
from benchmarks.studies.lowprec_lm import analysis, stress, train
from benchmarks.studies.lowprec_lm.report import plot, table
from optstab import lowprec

__all__ = ["STUDY", "plot", "run", "table"]

REGIMES = ("quantizer_outliers", "model_outliers")


def _check_names(names, known, what: str, required=("reference", "none")) -> None:
    methods.check_names(names, known, what)
    for name in required:
        if name not in names:
            raise ValueError(f"config.{what} must include {name!r} (the gap is measured from it)")


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> dict:
    """Checks the config, builds every method and quantization recipe; returns the
    recipes of the burst regimes and of the persistent one."""
    known = [*train.ROLES, *methods.RECIPES]
    _check_names(config.methods, known, "methods")
    _check_names(config.model_outliers.split_methods, list(config.methods),
                 "model_outliers.split_methods")  # fmt: skip
    methods.check_names(config.regimes, REGIMES, "regime")
    units = train.gnmr_units(config)
    for name in config.methods:
        train.make_optimizer(name, config, units)
    check_positive(config, "width", "depth", "heads", "mlp_width", "context", "batch_size",
                   "num_steps", "eval_every", "val_windows", "num_seeds")  # fmt: skip
    if config.width % config.heads:
        raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
    if config.num_steps % config.eval_every:
        raise ValueError(
            f"num_steps {config.num_steps} is not a multiple of eval_every {config.eval_every}"
        )
    for group in ("quantizer_outliers.layers", "model_outliers.candidate_layers"):
        layers = config[group.split(".")[0]][group.split(".")[1]]
        methods.check_names(layers, lm.LAYER_NAMES, f"layer type in config.{group}")
        if not layers:
            raise ValueError(f"config.{group} must name at least one layer type")
    positions = tuple(config.model_outliers.positions)
    if not positions or not all(0 <= p < config.context for p in positions):
        raise ValueError(
            f"config.model_outliers.positions must be in [0, {config.context}), got {positions}"
        )
    if not config.model_outliers.reference_tolerance > 0:
        raise ValueError("config.model_outliers.reference_tolerance must be > 0")
    parallel.check_batch(config.batch_size, mesh, "batch_size")
    plan = {"quant": lowprec.quant_config(**config.quant)}
    recipes = [plan["quant"]]
    if config.persistent:
        _check_names(config.persistent_methods, list(config.methods), "persistent_methods")
        plan["persistent_quant"] = lowprec.quant_config(**config.persistent_quant)
        recipes.append(plan["persistent_quant"])
    for quant in recipes:  # the recipe peers' settings are valid over each regime's recipe
        for name in train.RECIPE_PEERS:
            if name in config.methods:
                train.method_quant(name, config, quant)
    return plan


class Regimes:
    """Trains methods under one regime's inputs and summarises them (see :func:`measure`)."""

    def __init__(self, context: Context, val: np.ndarray):
        self.context, self.val = context, val
        self.programs = train.Programs(context.config, context.mesh, context.fsdp)

    def run(
        self,
        names: tuple[str, ...],
        quant: lowprec.QuantConfig,
        inputs: dict,
        label: str,
        done: tuple[dict, dict] = ({}, {}),
    ) -> tuple[dict, dict]:
        """Trains ``names`` (stages ``<label>-<name>``); returns summaries and raw traces.
        ``done``: summaries and traces of methods already trained (they are not re-run)."""
        context, config = self.context, self.context.config
        summaries, raw = {}, {}
        todo = [n for n in names if n not in done[0]]
        with context.progress(len(todo) * config.num_steps, unit="step",
                              desc=f"lowprec_lm {label}") as bar:  # fmt: skip
            for name in names:
                if name in done[0]:
                    summaries[name], raw[name] = dict(done[0][name]), done[1][name]
                    continue
                bar.set_postfix_str(name)
                stage = f"{label}-{name}"

                def train_stage(name=name, stage=stage):
                    return train.train_method(name, config, quant, inputs, self.val, bar,
                                              programs=self.programs, context=context,
                                              loop_name=stage)  # fmt: skip

                out = context.stage(stage, train_stage)
                if stage in context.restored:
                    bar.update(config.num_steps)
                method_quant = train.method_quant(name, config, quant)
                summaries[name] = analysis.summarize(name, out, inputs, config, method_quant)
                raw[name] = out
        analysis.add_ratios(summaries)
        return summaries, raw


def regime_summary(rows: dict, config: ml_collections.ConfigDict) -> dict:
    return {
        "methods": rows,
        "reference_val_loss": rows["reference"]["val_loss"],
        "none_val_loss": rows["none"]["val_loss"],
        "goal": analysis.goals(rows, config),
    }


def curve_payload(raw: dict, stride: int) -> dict:
    """The per-method traces kept in the JSON: val curves, strided train loss, and the
    seed-0 high-precision map as ``[step, layer]`` pairs."""
    payload = {}
    for name, out in raw.items():
        flags = out["high_precision"][0].astype(bool)
        payload[name] = {
            "val_curve": reporting.to_jsonable(out["val_curve"], digits=4),
            "train_loss": reporting.to_jsonable(out["loss"][:, ::stride], digits=4),
            "high_precision_seed0": np.argwhere(flags).tolist(),
        }
    return payload


def burst_record(inputs: dict) -> dict:
    return {
        "layer": inputs["layer"].tolist(),
        "fraction_of_steps": float((inputs["layer"] >= 0).mean()),
    }


def model_outliers(
    regimes: Regimes, corpus: lm.Corpus, quant: lowprec.QuantConfig, clean: tuple[dict, dict]
) -> tuple[dict, dict, dict]:
    """The split by layer type, the rule, then the regime on the kept types; returns the
    regime's summary, its raw payload and its burst record."""
    config = regimes.context.config
    group = config.model_outliers
    clean_loss = clean[0]["reference"]["val_loss"]
    split, split_raw = {}, {}
    for kind in group.candidate_layers:
        inputs = stress.make_inputs(config, corpus, (kind,), real=True)
        split[kind], split_raw[kind] = regimes.run(
            tuple(group.split_methods), quant, inputs, f"model_outliers-{kind}"
        )
    reference = {kind: rows["reference"]["val_loss"] for kind, rows in split.items()}
    kept = analysis.admitted_layers(reference, clean_loss, group.reference_tolerance)
    by_type = {}
    for kind, rows in split.items():
        ref, none = rows["reference"]["val_loss"], rows["none"]["val_loss"]
        by_type[kind] = {
            "reference_val_loss": ref,
            "reference_change": analysis.relative_change(ref, clean_loss),
            "kept": kind in kept,
            "none_val_loss": none,
            "gap": analysis.relative_change(none, ref),
            "methods": {
                n: {k: r[k] for k in ("val_loss", "gap_closed", "recovery_rate")}
                for n, r in rows.items()
            },  # fmt: skip
            "burst_gradient_ratio_hit_layer": rows["none"]["burst_gradient_ratios"]["hit_layer"],
        }
    summary: dict[str, Any] = {
        "layers": kept,
        "clean_reference_val_loss": clean_loss,
        "reference_tolerance": group.reference_tolerance,
        "by_layer_type": by_type,
    }
    if not kept:
        summary["skipped"] = "no layer type keeps the float32 reference within the tolerance"
        return summary, {}, {}
    inputs = stress.make_inputs(config, corpus, tuple(kept), real=True)
    done = (split[kept[0]], split_raw[kept[0]]) if len(kept) == 1 else ({}, {})
    rows, raw = regimes.run(tuple(config.methods), quant, inputs, "model_outliers", done)
    summary.update(regime_summary(rows, config))
    summary["reference_change"] = analysis.relative_change(rows["reference"]["val_loss"],
                                                           clean_loss)  # fmt: skip
    summary["goal"]["reference_within_tolerance"] = bool(
        abs(summary["reference_change"]) <= group.reference_tolerance
    )
    return summary, curve_payload(raw, config.curve_stride), burst_record(inputs)


def measure(plan: dict, context: Context) -> dict:
    """The clean reference, each burst regime, then the persistent regime (if configured)."""
    config = context.config
    corpus = lm.stdlib_corpus(config.val_fraction)
    val = lm.val_windows(corpus.val, config.val_windows, config.context + 1)
    regimes = Regimes(context, val)
    quant = plan["quant"]
    plain = stress.make_inputs(config, corpus, (), real=False)
    # The float32 run without outliers: the reference of every regime whose float32
    # function never sees them (quantizer_outliers, persistent) and the rule's baseline.
    clean = regimes.run(("reference",), quant, plain, "clean")
    summary: dict[str, Any] = {"regimes": {}}
    raw_payload, bursts = {}, {}
    if "quantizer_outliers" in config.regimes:
        inputs = stress.make_inputs(config, corpus, config.quantizer_outliers.layers, real=False)
        rows, raw = regimes.run(tuple(config.methods), quant, inputs, "quantizer_outliers", clean)
        part = regime_summary(rows, config)
        summary["regimes"]["quantizer_outliers"] = part
        summary.update(part)  # the top-level keys of earlier versions
        raw_payload["quantizer_outliers"] = curve_payload(raw, config.curve_stride)
        bursts["quantizer_outliers"] = burst_record(inputs)
    if "model_outliers" in config.regimes:
        part, raw, record = model_outliers(regimes, corpus, quant, clean)
        summary["regimes"]["model_outliers"] = part
        raw_payload["model_outliers"] = raw
        bursts["model_outliers"] = record
    if config.persistent:
        names = tuple(config.persistent_methods)
        rows, raw = regimes.run(names, plan["persistent_quant"], plain, "persistent", clean)
        part = {
            "methods": rows,
            "reference_val_loss": rows["reference"]["val_loss"],
            "none_val_loss": rows["none"]["val_loss"],
        }
        summary["regimes"]["persistent"] = part
        summary["persistent"] = part
        raw_payload["persistent"] = curve_payload(raw, config.curve_stride)
    return {
        "corpus": {
            "modules": list(lm.CORPUS_MODULES),
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
            "python": corpus.python,
            "sha256": corpus.sha256,
        },
        "layers": lm.layer_paths(config.depth),
        "fine_grained_tiles": analysis.tile_map(config, config.recipes.fine_grained.block_size),
        "bursts": bursts,
        "summary": summary,
        "raw": raw_payload,
    }


STUDY = Study("lowprec_lm", prepare, measure, table, plot)
run = STUDY.run
