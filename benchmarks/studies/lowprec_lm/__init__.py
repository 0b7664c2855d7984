"""Low-precision stress: does GNMR's precision action keep a low-precision LM on track?

Setup. A byte-level decoder-only transformer (:mod:`benchmarks.problems.lm`) learns next-byte
prediction on Python standard-library sources (offline; corpus, size, Python version and
SHA-256 are recorded in the JSON). Its four matmuls per block are fake-quantized
(:class:`optstab.lowprec.QuantLinear`) in the configured format, scaling and rounding.
Every method trains from the same initialisation on the same batches and under the same
stress; AdamW throughout. Validation loss (nats per byte) is measured in float32
without outliers on fixed held-out windows, so it judges the trained weights.

Stress (the regime GNMR is for; methods.md section 4). Activation-outlier *bursts*:
after ``burst_start`` steps, whenever no burst is running a new one starts with
probability ``burst_prob`` per step; it picks one quantized layer, ``burst_channels``
input channels of it and a magnitude alpha (log-uniform in ``[alpha_min, alpha_max]``),
and for ``burst_length`` steps (uniform in its range) multiplies those channels of the
layer's input by alpha *as its quantizer sees it* (``QuantLinear(x, outliers)`` uses
``Q(x * a) / a``). The float32 function, and so the reference run, never sees them: the
gap between ``reference`` and ``none`` is what the *format* adds.
With per-tensor scaling the outlier channels set the scale and crush every other
channel onto a few grid points; delayed scaling adds a lag. The persistent setting
(``persistent_*`` options: no bursts, a coarse format everywhere) is run too, with
``reference``, ``none`` and ``gnmr_precision``, to show where the method cannot help.

Methods (:mod:`benchmarks.problems.methods`, and the study's own rows). ``reference``:
every layer in float32 (the switch held on). ``none``: low precision, plain AdamW.
``clip_by_global_norm``, ``zclip``, ``spam``, ``skip_step``: the optstab baselines
before / around AdamW. ``gnmr_precision``: ``optstab.gnmr`` with
action ``("precision",)`` chained before AdamW, its units one per layer (the layer's
path), and the training step sets ``lowprec.set_high_precision(model,
optstab.recovery_mask(opt_state))`` before the forward pass. ``gnmr_precision_clip``:
the same with action ``("precision", "clip")``. Two extra rows, not contenders, separate
detection from action: ``oracle_precision`` holds in float32 every layer whose quantizer
a burst disturbs, from the step after the burst starts until its scale has recovered
(``history`` steps after the burst with delayed scaling): a perfect detector acting as
late as GNMR does. ``gnmr_amax_precision`` runs GNMR's controller, unchanged, on each
quantizer's input amax (:func:`optstab.lowprec.input_amax`) instead of on the gradient
norms, with its lock and budget sized to the stress (``config.gnmr_amax``; the rule is
in the config). The persistent regime reuses the bursts regime's reference run (the
float32 path never sees the outliers or the format, so the run is the same bit for bit;
a test checks it).

Measured per seed: validation loss every ``eval_every`` steps and at the end; train loss
per step (spikes: a step whose loss exceeds the median of the previous
``spike_window`` steps by ``spike_factor`` times, counted once per run of such steps);
which quantized layers ran in high precision at each step (recovery rate: the fraction
of layer-steps) and how those matched the disturbed layer-steps (``detection``:
coverage and precision); per-layer gradient norms (``burst_gradient_ratios`` of
``none``: what a gradient-norm detector could see at a burst); step time (median over
chunks after compilation, as a ratio to ``none`` in the same run; compile time apart).
The training loop is a ``lax.scan`` over steps under ``jax.vmap`` over seeds, one
compilation per method, one checkpointed stage (with a resumable loop of
``eval_every``-step chunks inside); with more than one device the batch is sharded over
a ``("data",)`` mesh (data parallel).

Modules: ``stress.py`` (bursts and inputs), ``train.py`` (methods, model, training),
``analysis.py`` (spikes, detection, gap, goals), ``report.py`` (table, figure).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from benchmarks.harness import Context, Study, parallel, reporting
from benchmarks.harness.study import check_positive
from benchmarks.problems import lm
from benchmarks.studies.lowprec_lm import analysis, stress, train
from benchmarks.studies.lowprec_lm.report import plot, table
from optstab import lowprec

__all__ = ["STUDY", "plot", "run", "table"]


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> dict:
    """Checks the config, builds every method, detector and quantization setting;
    returns the quantization settings of the two regimes."""
    for name in ("reference", "none"):
        if name not in config.methods:
            raise ValueError(f"config.methods must include {name!r} (the gap is measured from it)")
    for name in config.methods:
        train.make_optimizer(name, config)
        train.make_detector(name, config)
    check_positive(config, "width", "depth", "heads", "mlp_width", "context", "batch_size",
                   "num_steps", "eval_every", "val_windows")  # fmt: skip
    if config.width % config.heads:
        raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
    if config.num_steps % config.eval_every:
        raise ValueError(
            f"num_steps {config.num_steps} is not a multiple of eval_every {config.eval_every}"
        )
    parallel.check_batch(config.batch_size, mesh, "batch_size")
    plan = {"quant": lowprec.quant_config(**config.quant)}
    if config.persistent:
        plan["persistent_quant"] = lowprec.quant_config(**config.persistent_quant)
    return plan


def run_regime(
    context: Context,
    names: tuple[str, ...],
    quant: lowprec.QuantConfig,
    inputs: dict,
    val: np.ndarray,
    label: str,
    done: tuple[dict, dict] = ({}, {}),
) -> tuple[dict, dict]:
    """Trains ``names`` under one quantization setting; returns summaries and raw traces.

    ``done``: summaries and traces of methods already trained (they are not re-run).
    Each method is a stage ``<label>-<name>`` and its training a loop of the same name.
    """
    config = context.config
    summaries, raw = {}, {}
    todo = [n for n in names if n not in done[0]]
    model = train.model_fns(config, quant)
    total = len(todo) * config.num_steps
    with context.progress(total, unit="step", desc=f"lowprec_lm {label}") as bar:
        for name in names:
            if name in done[0]:
                summaries[name], raw[name] = done[0][name], done[1][name]
                continue
            bar.set_postfix_str(name)
            stage = f"{label}-{name}"

            def train_stage(name=name, stage=stage):
                return train.train_method(name, config, quant, inputs, val, bar, context.mesh,
                                          model, context, stage, context.fsdp)  # fmt: skip

            out = context.stage(stage, train_stage)
            if stage in context.restored:
                bar.update(config.num_steps)
            summaries[name] = analysis.summarize(name, out, inputs, config)
            raw[name] = out
    analysis.add_ratios(summaries)
    return summaries, raw


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


def measure(plan: dict, context: Context) -> dict:
    """The burst regime (every method), then the persistent regime (if configured)."""
    config = context.config
    corpus = lm.stdlib_corpus(config.val_fraction)
    val = lm.val_windows(corpus.val, config.val_windows, config.context + 1)
    inputs = stress.make_inputs(config, corpus, bursts=True)
    methods, raw = run_regime(context, tuple(config.methods), plan["quant"], inputs, val, "bursts")
    summary: dict[str, Any] = {
        "methods": methods,
        "reference_val_loss": methods["reference"]["val_loss"],
        "none_val_loss": methods["none"]["val_loss"],
        "goal": analysis.goals(methods, config),
    }
    raw_payload = {"bursts": curve_payload(raw, config.curve_stride)}
    if config.persistent:
        plain = stress.make_inputs(config, corpus, bursts=False)
        names = tuple(n for n in train.PERSISTENT_METHODS if n in config.methods)
        # The float32 reference never sees outliers or the format: its run is reused.
        reused = ({"reference": dict(methods["reference"])}, {"reference": raw["reference"]})
        rows, raw_p = run_regime(
            context, names, plan["persistent_quant"], plain, val, "persistent", done=reused
        )
        summary["persistent"] = {
            "methods": rows,
            "reference_val_loss": rows["reference"]["val_loss"],
            "none_val_loss": rows["none"]["val_loss"],
        }
        raw_payload["persistent"] = curve_payload(raw_p, config.curve_stride)
    return {
        "corpus": {
            "modules": list(lm.CORPUS_MODULES),
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
            "python": corpus.python,
            "sha256": corpus.sha256,
        },
        "layers": lm.layer_paths(config.depth),
        "bursts": {
            "layer": inputs["layer"].tolist(),
            "fraction_of_steps": float((inputs["layer"] >= 0).mean()),
        },
        "summary": summary,
        "raw": raw_payload,
    }


STUDY = Study("lowprec_lm", prepare, measure, table, plot)
run = STUDY.run
