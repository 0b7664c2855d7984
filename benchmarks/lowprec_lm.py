"""Low-precision stress: does GNMR's precision action keep a low-precision LM on track?

Setup. A byte-level decoder-only transformer (:mod:`benchmarks.lm`) learns next-byte
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

Methods. ``reference``: every layer in float32 (the switch held on). ``none``: low
precision, plain AdamW. ``clip_by_global_norm``, ``zclip``, ``spam``, ``skip_step``:
the optstab baselines before / around AdamW. ``gnmr_precision``: ``optstab.gnmr`` with
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
compilation per method; with more than one device the batch is sharded over a
``("data",)`` mesh (data parallel).
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import optstab
from benchmarks import lm, parallel, reporting, resume
from optstab import lowprec
from optstab.stability import baselines

METHODS = (
    "reference",
    "none",
    "clip_by_global_norm",
    "zclip",
    "spam",
    "skip_step",
    "gnmr_precision",
    "gnmr_precision_clip",
)
# Not contenders (extra rows): a perfect detector, and GNMR's controller fed the
# quantizers' input amax instead of gradient norms.
EXTRA_METHODS = ("oracle_precision", "gnmr_amax_precision")
PERSISTENT_METHODS = ("reference", "none", "gnmr_precision")
GNMR_METHODS = ("gnmr_precision", "gnmr_precision_clip")


# ---------------------------------------------------------------------------
# Stress


class Bursts(NamedTuple):
    """Per-step outlier schedule of one seed (numpy, T = num_steps)."""

    layer: np.ndarray  # (T,) int32: index into lm.layer_paths, -1 when no burst
    channels: np.ndarray  # (T, burst_channels) int32: input channels hit
    alpha: np.ndarray  # (T,) float32: multiplier of those channels (1 when no burst)


def burst_schedule(config: ml_collections.ConfigDict, seed: int) -> Bursts:
    """Seeded bursts (see the module docstring); every method of a seed sees the same ones."""
    rng = np.random.default_rng([seed, 1])
    steps, k = config.num_steps, config.burst_channels
    paths = lm.layer_paths(config.depth)
    widths = lm.layer_input_widths(config.width, config.mlp_width)
    layer = np.full(steps, -1, np.int32)
    channels = np.zeros((steps, k), np.int32)
    alpha = np.ones(steps, np.float32)
    candidates = [i for i, p in enumerate(paths) if p.split("/")[-1] in config.burst_layers]
    t = config.burst_start
    while t < steps:
        if rng.random() >= config.burst_prob:
            t += 1
            continue
        length = int(rng.integers(config.burst_length[0], config.burst_length[1] + 1))
        hit = int(rng.choice(candidates))
        width = widths[paths[hit].split("/")[-1]]
        size = math.exp(rng.uniform(math.log(config.alpha_min), math.log(config.alpha_max)))
        end = min(t + length, steps)
        layer[t:end] = hit
        channels[t:end] = rng.choice(width, size=k, replace=False)
        alpha[t:end] = size
        t = end
    return Bursts(layer, channels, alpha)


def outlier_vectors(config: ml_collections.ConfigDict, layer, channels, alpha) -> dict:
    """This step's ``{layer_path: (width,) multipliers}`` (traced; ones off the burst)."""
    widths = lm.layer_input_widths(config.width, config.mlp_width)
    out = {}
    for i, path in enumerate(lm.layer_paths(config.depth)):
        width = widths[path.split("/")[-1]]
        hit = jnp.zeros((width,), bool).at[channels].set(True) & (layer == i)
        out[path] = jnp.where(hit, alpha, 1.0).astype(jnp.float32)
    return out


# ---------------------------------------------------------------------------
# Methods


def make_optimizer(name: str, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW, behind or inside the method's stability transform."""

    def adamw():
        return optax.adamw(
            config.learning_rate, config.b1, config.b2, config.eps, weight_decay=config.weight_decay
        )

    if name in ("reference", "none", *EXTRA_METHODS):
        return adamw()
    if name == "clip_by_global_norm":
        return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw())
    if name == "zclip":
        return optax.chain(baselines.zclip(**config.zclip), adamw())
    if name == "spam":
        return baselines.spam(
            config.learning_rate, config.b1, config.b2, config.eps, config.weight_decay,
            **config.spam,
        )  # fmt: skip
    if name == "skip_step":
        return baselines.skip_step(adamw(), **config.skip_step)
    if name in GNMR_METHODS:
        action = ("precision", "clip") if name == "gnmr_precision_clip" else ("precision",)
        gnmr = optstab.gnmr(**config.gnmr, action=action, units=lm.layer_units)
        return optax.chain(gnmr, adamw())
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def make_detector(name: str, config: ml_collections.ConfigDict):
    """``gnmr_amax_precision``'s detector: ``optstab.gnmr`` (precision action; the GNMR
    settings with ``config.gnmr_amax``'s lock and budget) run on ``{layer_path: input
    amax}`` instead of on gradients; else None."""
    if name != "gnmr_amax_precision":
        return None
    return optstab.gnmr(**{**config.gnmr, **config.gnmr_amax}, action=("precision",))


def precision_mask(name: str, run: Any, paths: list[str], oracle) -> dict:
    """The ``{unit: bool}`` mask the training step hands to ``set_high_precision``.

    ``oracle``: (num_layers,) bool, the layers whose quantizer is disturbed (see
    :func:`oracle_mask`), used by ``oracle_precision``.
    """
    if name in GNMR_METHODS:
        return optstab.recovery_mask(run.opt_state)
    if name == "gnmr_amax_precision":
        return optstab.recovery_mask(run.detector_state)
    if name == "oracle_precision":
        return {path: oracle[i] for i, path in enumerate(paths)}
    return {"": jnp.asarray(name == "reference")}  # "" covers every layer


# ---------------------------------------------------------------------------
# Training


def make_model(config: ml_collections.ConfigDict, quant: lowprec.QuantConfig, key) -> lm.Decoder:
    return lm.Decoder(
        width=config.width,
        depth=config.depth,
        heads=config.heads,
        mlp_width=config.mlp_width,
        context=config.context,
        config=quant,
        rngs=nnx.Rngs(params=key, quant=jax.random.fold_in(key, 1)),
    )


FILTERS = (nnx.Param, lowprec.QuantState, lowprec.HighPrecision)


def layer_grad_norms(grads: Any, paths: list[str]) -> jax.Array:
    """(num_layers,) float32 gradient norm of each quantized layer (kernel and bias)."""
    partition = optstab.tree.make_partition(grads, lm.layer_units)
    rows = jnp.array([partition.index(path) for path in paths])
    return optstab.tree.unit_norms(partition, grads)[rows]


class Run(NamedTuple):
    """Training state of one seed (a pytree; stacked over seeds under vmap)."""

    params: Any  # nnx.Param state
    quant_state: Any  # lowprec.QuantState: amax histories, rounding keys
    switches: Any  # lowprec.HighPrecision: overwritten from the mask every step
    opt_state: Any
    detector_state: Any  # gnmr_amax_precision's GNMRState over layer amaxes, else None


class ModelFns(NamedTuple):
    """What every method of a regime shares (built once, so each method compiles only its
    own training step): the model structure, its initial state stacked over seeds, and
    the jitted validation loss ``evaluate(params, quant_state, switches, val)``."""

    graphdef: Any
    initial: tuple  # (params, quant_state, switches), stacked over seeds
    evaluate: Any


def model_fns(config: ml_collections.ConfigDict, quant: lowprec.QuantConfig) -> ModelFns:
    """Initialises the model for every seed and jits its float32 validation loss."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(config, quant, jax.random.key(0))))

    def init_model(key):
        return tuple(nnx.state(make_model(config, quant, key), *FILTERS))

    def evaluate(params, quant_state, switches, val):
        model = nnx.merge(graphdef, params, quant_state, switches, copy=True)
        lowprec.set_high_precision(model, {"": jnp.array(True)})
        return lm.next_byte_loss(model, val)

    keys = jax.vmap(jax.random.key)(jnp.arange(config.num_seeds))
    initial = jax.jit(jax.vmap(init_model))(keys)
    return ModelFns(graphdef, initial, jax.jit(jax.vmap(evaluate, in_axes=(0, 0, 0, None))))


def build(name: str, config: ml_collections.ConfigDict, graphdef: Any):
    """Jittable ``init(params) -> (opt_state, detector_state)`` and ``chunk(run, *inputs)``."""
    tx = make_optimizer(name, config)
    detector = make_detector(name, config)
    paths = lm.layer_paths(config.depth)

    def init(params):
        signal = {path: jnp.zeros((), jnp.float32) for path in paths}
        return tx.init(params), None if detector is None else detector.init(signal)

    def model_of(params, quant_state, switches, mask) -> lm.Decoder:
        model = nnx.merge(graphdef, params, quant_state, switches, copy=True)
        lowprec.set_high_precision(model, mask)
        return model

    def step(run: Run, inputs):
        windows, layer, channels, alpha, oracle = inputs
        mask = precision_mask(name, run, paths, oracle)
        outliers = outlier_vectors(config, layer, channels, alpha)

        def loss_fn(params, quant_state, switches):
            model = model_of(params, quant_state, switches, mask)
            loss = lm.next_byte_loss(model, windows, outliers)
            _, quant_state, switches = nnx.state(model, *FILTERS)
            seen = (lowprec.high_precision_flags(model), lowprec.input_amax(model))
            return loss, (quant_state, switches, seen)

        (loss, (quant_state, switches, (flags, amax))), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(run.params, run.quant_state, run.switches)
        updates, opt_state = tx.update(grads, run.opt_state, run.params)
        params = optax.apply_updates(run.params, updates)
        detector_state = run.detector_state
        if detector is not None:
            _, detector_state = detector.update(amax, detector_state)
        record = {
            "loss": loss,
            "high_precision": jnp.stack([flags[p] for p in paths]),
            "grad_norm": optstab.tree.global_norm(grads),
            "layer_grad_norms": layer_grad_norms(grads, paths),
        }
        return Run(params, quant_state, switches, opt_state, detector_state), record

    def chunk(run: Run, windows, layer, channels, alpha, oracle):
        return jax.lax.scan(step, run, (windows, layer, channels, alpha, oracle))

    return init, chunk


# ---------------------------------------------------------------------------
# Running a method


def check_method(name: str) -> None:
    if name not in (*METHODS, *EXTRA_METHODS):
        raise ValueError(f"unknown method {name!r}; choose from {METHODS + EXTRA_METHODS}")


def make_inputs(config: ml_collections.ConfigDict, corpus: lm.Corpus, bursts: bool) -> dict:
    """Per-seed batches and burst schedules, stacked over seeds (numpy)."""
    seeds = range(config.num_seeds)
    shape = (config.num_steps, config.batch_size)
    windows = [
        lm.sample_windows(corpus.train, np.random.default_rng([s, 0]), shape, config.context + 1)
        for s in seeds
    ]
    if bursts:
        schedules = [burst_schedule(config, s) for s in seeds]
    else:
        steps, k = config.num_steps, config.burst_channels
        none = Bursts(np.full(steps, -1, np.int32), np.zeros((steps, k), np.int32),
                      np.ones(steps, np.float32))  # fmt: skip
        schedules = [none for _ in seeds]
    layer = np.stack([b.layer for b in schedules])
    lag = config.quant.history if config.quant.scale_mode == "delayed" else 1
    return {
        "windows": np.stack(windows),
        "layer": layer,
        "channels": np.stack([b.channels for b in schedules]),
        "alpha": np.stack([b.alpha for b in schedules]),
        "oracle": np.stack(
            [oracle_mask(b.layer, len(lm.layer_paths(config.depth)), lag) for b in schedules]
        ),  # fmt: skip
    }


def oracle_mask(layer: np.ndarray, num_layers: int, lag: int) -> np.ndarray:
    """(T, num_layers) bool: at step t, the layers that had a burst at some step in
    ``[t - lag, t - 1]``. With delayed scaling (``lag`` = the amax history length) a
    burst keeps inflating its layer's scale for ``history`` steps after it ends, so
    this is what a perfect detector acting one step late would hold in float32."""
    hit = np.zeros((len(layer), num_layers), bool)
    for t in range(1, len(layer)):
        recent = layer[max(0, t - lag) : t]
        hit[t, recent[recent >= 0]] = True
    return hit


INPUT_ORDER = ("windows", "layer", "channels", "alpha", "oracle")


def shard_inputs(chunk_inputs: list[np.ndarray], mesh) -> list[jax.Array]:
    """Puts a chunk's inputs on the devices: the batch axis of the windows (seeds,
    steps, batch, context) is sharded, the rest replicated."""
    if mesh is None:
        return [jnp.asarray(x) for x in chunk_inputs]
    windows, *rest = chunk_inputs
    return [parallel.shard_batch(windows, mesh, axis=2), *parallel.replicate(rest, mesh)]


def train_method(
    name: str,
    config: ml_collections.ConfigDict,
    quant: lowprec.QuantConfig,
    inputs: dict,
    val: np.ndarray,
    progress: Any = None,
    mesh: Any = "auto",
    model: ModelFns | None = None,
    checkpointer: resume.NoCheckpoint | None = None,
    loop_name: str | None = None,
    fsdp: bool = False,
) -> dict:
    """Trains ``name`` on every seed at once; returns numpy traces and timings.

    ``mesh``: ``"auto"`` (:func:`parallel.resolve_mesh`: data parallel over all devices when there
    are several), a ``("data",)`` mesh, or None (everything on the default device);
    ``fsdp``: with a mesh, split large parameters over its ``data`` axis.
    ``model``: the regime's shared :class:`ModelFns` (built here if None).
    ``checkpointer``: saves the training state at the end of an ``eval_every`` chunk
    (as loop ``loop_name``, default ``name``; how often: its ``save_interval_s``) and
    resumes from the newest save.

    Returns a dict with ``val_curve`` (seeds, evals), ``loss``, ``grad_norm`` (seeds,
    steps), ``high_precision`` (seeds, steps, layers), ``layer_grad_norms`` (seeds,
    steps, layers), ``compile_s`` and ``chunk_s`` (wall seconds of each chunk after the
    first).
    """
    check_method(name)
    mesh = parallel.resolve_mesh(mesh)
    checkpointer = checkpointer or resume.NoCheckpoint()
    model = model_fns(config, quant) if model is None else model
    init, chunk = build(name, config, model.graphdef)
    params, quant_state, switches = jax.tree.map(jnp.copy, model.initial)  # chunks donate
    run = Run(params, quant_state, switches, *jax.jit(jax.vmap(init))(params))
    if mesh is not None:  # FSDP splits params and optimizer state alike, never the seed axis
        run = parallel.place_params(run, mesh, fsdp, leading_axes=1)
    # The state keeps its shardings from chunk to chunk (XLA would otherwise pick new
    # ones for the outputs, and the compiled chunk accepts only the ones it was built for).
    run_shardings = None if mesh is None else jax.tree.map(lambda x: x.sharding, run)
    val = jnp.asarray(val)

    def evaluate_all(run: Run):
        return model.evaluate(run.params, run.quant_state, run.switches, val)

    every = config.eval_every
    if config.num_steps % every:
        raise ValueError(f"num_steps {config.num_steps} is not a multiple of eval_every {every}")

    def chunk_inputs(start):
        return shard_inputs([inputs[k][:, start : start + every] for k in INPUT_ORDER], mesh)

    start = time.perf_counter()
    chunk_all = jax.jit(jax.vmap(chunk), donate_argnums=0, out_shardings=(run_shardings, None))
    chunk_all = chunk_all.lower(run, *chunk_inputs(0)).compile()
    compile_s = time.perf_counter() - start
    first_val = np.asarray(evaluate_all(run))

    computed = []

    def advance(run: Run, index: int) -> tuple[Run, dict]:
        computed.append(index)
        args = chunk_inputs(index * every)
        tick = time.perf_counter()
        run, record = chunk_all(run, *args)
        record = jax.block_until_ready(record)
        seconds = time.perf_counter() - tick
        if progress is not None:
            progress.update(every)
        record = jax.tree.map(np.asarray, record)
        return run, {"record": record, "val": np.asarray(evaluate_all(run)), "seconds": seconds}

    num_chunks = config.num_steps // every
    run, chunks = checkpointer.loop(loop_name or name, run, num_chunks, advance)
    if progress is not None:  # chunks restored from disk
        progress.update((num_chunks - len(computed)) * every)
    records = [c["record"] for c in chunks]
    chunk_s = [c["seconds"] for c in chunks]
    out = {key: np.concatenate([r[key] for r in records], axis=1) for key in records[0]}
    out["val_curve"] = np.stack([first_val] + [c["val"] for c in chunks], axis=1)
    out["compile_s"] = compile_s
    out["chunk_s"] = chunk_s[1:] if len(chunk_s) > 1 else chunk_s
    return out


# ---------------------------------------------------------------------------
# Metrics


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
    if name in (*GNMR_METHODS, *EXTRA_METHODS):
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


def add_ratios(methods: dict[str, dict]) -> None:
    """Adds ``gap_closed`` and ``step_time_ratio`` (vs ``none``) to every method's row."""
    reference, none = methods["reference"]["val_loss"], methods["none"]["val_loss"]
    for row in methods.values():
        row["gap_closed"] = gap_closed(row["val_loss"], none, reference)
        row["step_time_ratio"] = row["step_s"] / methods["none"]["step_s"]


def goals(methods: dict[str, dict], config: ml_collections.ConfigDict) -> dict[str, Any]:
    reference, none = methods["reference"]["val_loss"], methods["none"]["val_loss"]
    baseline_names = ("clip_by_global_norm", "zclip", "spam", "skip_step")
    best_baseline = min(
        (methods[n]["val_loss"] for n in baseline_names if n in methods), default=np.inf
    )
    out: dict[str, Any] = {
        "stress_gap": (none - reference) / reference if np.isfinite(none) else None,
        "stress_visible": bool(
            not np.isfinite(none) or none - reference >= config.visible_gap * reference
        ),
    }
    for name in (*GNMR_METHODS, "gnmr_amax_precision"):  # the last: an extra, for reference
        if name not in methods:
            continue
        row = methods[name]
        closed = row["gap_closed"]
        out[f"{name}_closes_80pct"] = bool(closed is not None and closed >= config.goal_gap_closed)
        out[f"{name}_recovery_le_10pct"] = bool(row["recovery_rate"] <= config.goal_recovery_rate)
        out[f"{name}_beats_every_baseline"] = bool(row["val_loss"] < best_baseline)
    return out


# ---------------------------------------------------------------------------
# Study


def run_regime(
    config: ml_collections.ConfigDict,
    names: tuple[str, ...],
    quant: lowprec.QuantConfig,
    inputs: dict,
    val: np.ndarray,
    label: str,
    done: tuple[dict, dict] = ({}, {}),
    checkpointer: resume.NoCheckpoint | None = None,
    mesh: Any = None,
    fsdp: bool = False,
) -> tuple[dict, dict]:
    """Trains ``names`` under one quantization setting; returns summaries and raw traces.

    ``done``: summaries and traces of methods already trained (they are not re-run).
    ``checkpointer``: each method is a stage ``<label>-<name>`` and its training a loop
    of the same name (see :mod:`benchmarks.resume`).
    """
    checkpointer = checkpointer or resume.NoCheckpoint()
    summaries, raw = {}, {}
    todo = [n for n in names if n not in done[0]]
    model = model_fns(config, quant)
    with tqdm(total=len(todo) * config.num_steps, desc=f"lowprec_lm {label}", unit="step") as bar:
        for name in names:
            if name in done[0]:
                summaries[name], raw[name] = done[0][name], done[1][name]
                continue
            bar.set_postfix_str(name)
            stage = f"{label}-{name}"

            def train(name=name, stage=stage):
                return train_method(
                    name, config, quant, inputs, val, bar, mesh, model, checkpointer, stage, fsdp
                )

            out = checkpointer.stage(stage, train)
            if stage in checkpointer.restored:
                bar.update(config.num_steps)
            summaries[name] = summarize(name, out, inputs, config)
            raw[name] = out
    add_ratios(summaries)
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


def run(
    config: ml_collections.ConfigDict,
    *,
    checkpoint_dir: Any = None,
    mesh: Any = "auto",
    fsdp: bool = False,
) -> dict:
    """Runs the burst regime (all methods) and the persistent regime; returns the JSON.

    Args:
      config: ``configs/lowprec_lm.py``'s ``get_config(size)``.
      checkpoint_dir: None, a directory or a :class:`benchmarks.resume.Checkpointer`:
        each finished method is saved, and inside a method's training the state at
        the end of an ``eval_every`` chunk (see ``Checkpointer.save_interval_s``); a
        rerun with the same config resumes from the newest save.
      mesh: see :mod:`benchmarks.parallel` (``"auto"``: data parallel over all
        devices when there are several).
      fsdp: with a mesh, split large parameters over its ``data`` axis.
    """
    checkpointer = resume.open_checkpointer(checkpoint_dir, "lowprec_lm", config)
    mesh = parallel.resolve_mesh(mesh)
    for name in config.methods:
        check_method(name)
    for name in ("reference", "none"):
        if name not in config.methods:
            raise ValueError(f"config.methods must include {name!r} (the gap is measured from it)")
    corpus = lm.stdlib_corpus(config.val_fraction)
    val = lm.val_windows(corpus.val, config.val_windows, config.context + 1)
    quant = lowprec.quant_config(**config.quant)
    inputs = make_inputs(config, corpus, bursts=True)
    devices = {"checkpointer": checkpointer, "mesh": mesh, "fsdp": fsdp}
    methods, raw = run_regime(
        config, tuple(config.methods), quant, inputs, val, "bursts", **devices
    )
    result: dict[str, Any] = {
        "config": config.to_dict(),
        "environment": reporting.environment(),
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
    }
    summary: dict[str, Any] = {
        "methods": methods,
        "reference_val_loss": methods["reference"]["val_loss"],
        "none_val_loss": methods["none"]["val_loss"],
        "goal": goals(methods, config),
    }
    stride = config.curve_stride
    result["raw"] = {"bursts": curve_payload(raw, stride)}
    if config.persistent:
        persistent_quant = lowprec.quant_config(**config.persistent_quant)
        plain = make_inputs(config, corpus, bursts=False)
        names = tuple(n for n in PERSISTENT_METHODS if n in config.methods)
        # The float32 reference never sees outliers or the format: its run is reused.
        reused = ({"reference": dict(methods["reference"])}, {"reference": raw["reference"]})
        rows, raw_p = run_regime(
            config, names, persistent_quant, plain, val, "persistent", done=reused, **devices
        )
        summary["persistent"] = {
            "methods": rows,
            "reference_val_loss": rows["reference"]["val_loss"],
            "none_val_loss": rows["none"]["val_loss"],
        }
        result["raw"]["persistent"] = curve_payload(raw_p, stride)
    result["summary"] = summary
    result["mesh"] = parallel.describe(mesh)
    checkpointer.finish()
    return result


# ---------------------------------------------------------------------------
# Reporting


def _fmt_gap(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table(result: dict) -> str:
    """Bursts table (one row per method), persistent table, goal checks."""
    summary = result["summary"]
    headers = ["method", "val_loss", "gap_closed", "recovery_rate", "spikes", "diverged",
               "step_time_ratio", "compile_s", "coverage"]  # fmt: skip

    def rows(methods: dict) -> list:
        out = []
        for name, m in methods.items():
            coverage = m.get("detection", {}).get("coverage")
            out.append([
                name, f"{m['val_loss']:.4f}", _fmt_gap(m["gap_closed"]),
                f"{100 * m['recovery_rate']:.1f}%", m["spikes"], m["diverged"],
                f"{m['step_time_ratio']:.2f}", f"{m['compile_s']:.1f}",
                "-" if coverage is None else f"{100 * coverage:.0f}%",
            ])  # fmt: skip
        return out

    config = result["config"]
    quant = config["quant"]
    lines = [
        f"bursts regime: {quant['fmt']} {quant['scaling']} {quant['scale_mode']} scaling, "
        f"{quant['rounding']} rounding; median over {config['num_seeds']} seeds; val loss in "
        f"nats/byte (float32, no outliers); bursts on "
        f"{100 * result['bursts']['fraction_of_steps']:.0f}% of steps",
        reporting.format_table(headers, rows(summary["methods"])),
    ]
    if "persistent" in summary:
        pq = config["persistent_quant"]
        lines += [
            f"persistent regime (no bursts): {pq['fmt']} {pq['scaling']} {pq['scale_mode']}",
            reporting.format_table(headers, rows(summary["persistent"]["methods"])),
        ]
    lines += ["goals:", reporting.format_goals(summary["goal"])]
    lines.append(
        f"  stress gap (none - reference) / reference: {_fmt_gap(summary['goal']['stress_gap'])}"
    )
    return "\n".join(lines)


def plot(result: dict, path) -> Any:
    """Validation curves, seed-0 train loss, the unit x step heat map, final losses."""
    reporting.plot_style()
    import matplotlib.pyplot as plt

    config = result["config"]
    summary = result["summary"]
    raw = result["raw"]["bursts"]
    names = list(summary["methods"])
    colors = dict(zip(names, plt.get_cmap("tab10").colors, strict=False))
    evals = np.arange(config["num_steps"] // config["eval_every"] + 1) * config["eval_every"]
    layer = np.asarray(result["bursts"]["layer"][0])
    paths = result["layers"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5))

    ax = axes[0, 0]
    for name in names:
        curve = np.median(np.asarray(raw[name]["val_curve"], dtype=float), axis=0)
        ax.plot(evals, curve, color=colors[name], label=name,
                lw=2 if name.startswith("gnmr") else 1.1)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte, median of seeds)")
    ax.set_title("validation loss under outlier bursts")
    lo = min(np.nanmin(np.asarray(raw[n]["val_curve"], dtype=float)) for n in names)
    ax.set_ylim(lo - 0.05, lo + 1.0)
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    stride = config["curve_stride"]
    steps = np.arange(0, config["num_steps"], stride)
    for name in ("reference", "none", "gnmr_precision", "oracle_precision"):
        if name in raw:
            loss = np.asarray(raw[name]["train_loss"], dtype=float)[0]
            ax.plot(steps[: len(loss)], loss, color=colors.get(name), lw=0.8, label=name)
    bursting = layer >= 0
    ax.fill_between(np.arange(len(layer)), 0, 1, where=bursting, color="0.85",
                    transform=ax.get_xaxis_transform(), label="burst")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("train loss, seed 0 (as trained)")
    ax.set_title("seed 0: train loss; grey = a burst is on")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    shown = [m for m in ("gnmr_precision", "gnmr_amax_precision") if m in raw] or names[-1:]
    grid = np.zeros((len(shown) * len(paths), config["num_steps"]))
    labels = []
    for k, method in enumerate(shown):
        for step, unit in raw[method]["high_precision_seed0"]:
            grid[k * len(paths) + unit, step] = 1
        labels += [f"{method.replace('_precision', '')}: {p}" for p in paths]
    ax.imshow(grid, aspect="auto", cmap="Blues", interpolation="nearest", vmin=0, vmax=1.5)
    hit = np.nonzero(bursting)[0]
    for k in range(len(shown)):
        ax.scatter(hit, k * len(paths) + layer[hit], s=2, color="tab:red", marker="s",
                   label="burst on this layer" if k == 0 else None)  # fmt: skip
        if k:
            ax.axhline(k * len(paths) - 0.5, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel("step")
    ax.set_title("seed 0: layers held in float32 (blue) vs bursts (red)")
    ax.legend(fontsize=7, loc="upper right")

    ax = axes[1, 1]
    for i, name in enumerate(names):
        values = np.asarray(summary["methods"][name]["val_loss_per_seed"], dtype=float)
        ax.scatter(np.full(len(values), i), values, color=colors[name], s=14)
        ax.hlines(summary["methods"][name]["val_loss"], i - 0.3, i + 0.3, color=colors[name])
    ax.axhline(summary["reference_val_loss"], color="k", lw=0.6, ls=":")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("final validation loss (seeds; bar = median)")
    ax.set_title("final validation loss (dotted: reference)")
    fig.suptitle("low-precision LM under activation-outlier bursts")
    return reporting.save_figure(fig, path)
