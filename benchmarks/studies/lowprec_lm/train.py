"""Training of ``lowprec_lm``: the methods (from the registry, plus the study's roles
and its amax-fed detector), the model and its quantization state, one method's
vmapped and chunked training with its records (see the package docstring)."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import optstab
from benchmarks.harness import Context, parallel, resume
from benchmarks.problems import lm, methods
from benchmarks.studies.lowprec_lm.stress import INPUT_ORDER, outlier_vectors, shard_inputs
from optstab import lowprec

# The study's own names for plain AdamW runs: the float32 reference, the unprotected
# low-precision run, and two extra rows that are not contenders (a perfect detector
# acting one step late, and GNMR's controller fed the quantizers' input amax).
ROLES = {
    "reference": "adamw",
    "none": "adamw",
    "oracle_precision": "adamw",
    "gnmr_amax_precision": "adamw",
}
EXTRA_METHODS = ("oracle_precision", "gnmr_amax_precision")
PERSISTENT_METHODS = ("reference", "none", "gnmr_precision")


def make_optimizer(name: str, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW, behind or inside the method's stability transform (GNMR: one unit per
    quantized layer, named by its path)."""
    return methods.optimizer(name, config, roles=ROLES, units=lm.layer_units).transform


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
    if methods.uses_gnmr(name):
        return optstab.recovery_mask(run.opt_state)
    if name == "gnmr_amax_precision":
        return optstab.recovery_mask(run.detector_state)
    if name == "oracle_precision":
        return {path: oracle[i] for i, path in enumerate(paths)}
    return {"": jnp.asarray(name == "reference")}  # "" covers every layer


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


def train_method(
    name: str,
    config: ml_collections.ConfigDict,
    quant: lowprec.QuantConfig,
    inputs: dict,
    val: np.ndarray,
    progress: Any = None,
    mesh: Any = "auto",
    model: ModelFns | None = None,
    context: Context | None = None,
    loop_name: str | None = None,
    fsdp: bool = False,
) -> dict:
    """Trains ``name`` on every seed at once; returns numpy traces and timings.

    ``mesh``: ``"auto"`` (data parallel over all devices when there are several), a
    ``("data",)`` mesh, or None (everything on the default device); ``fsdp``: with a
    mesh, split large parameters over its ``data`` axis. ``model``: the regime's shared
    :class:`ModelFns` (built here if None). ``context``: the run's context, whose
    ``loop`` saves the training state at the end of an ``eval_every`` chunk (as loop
    ``loop_name``, default ``name``) every so often and resumes from the newest save.

    Returns a dict with ``val_curve`` (seeds, evals), ``loss``, ``grad_norm`` (seeds,
    steps), ``high_precision`` (seeds, steps, layers), ``layer_grad_norms`` (seeds,
    steps, layers), ``compile_s`` and ``chunk_s`` (wall seconds of each chunk after the
    first).
    """
    make_optimizer(name, config)  # an unknown name raises here
    mesh = parallel.resolve_mesh(mesh)
    loop = resume.NoCheckpoint().loop if context is None else context.loop
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
    run, chunks = loop(loop_name or name, run, num_chunks, advance)
    if progress is not None:  # chunks restored from disk
        progress.update((num_chunks - len(computed)) * every)
    records = [c["record"] for c in chunks]
    chunk_s = [c["seconds"] for c in chunks]
    out = {key: np.concatenate([r[key] for r in records], axis=1) for key in records[0]}
    out["val_curve"] = np.stack([first_val] + [c["val"] for c in chunks], axis=1)
    out["compile_s"] = compile_s
    out["chunk_s"] = chunk_s[1:] if len(chunk_s) > 1 else chunk_s
    return out
