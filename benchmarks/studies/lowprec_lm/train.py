"""Training of ``lowprec_lm``: the methods (from the registry, plus the study's own
names), the model and its quantization state, and one method's vmapped, chunked training
with its records (see the package docstring).

One compiled training chunk serves every regime of a method: the outliers' kind (in the
function or for the quantizers only) and the layers forced into float32 are inputs, so
``reference``, ``none`` and ``oracle_precision`` share one program, and each program
runs the burst regimes and the split by layer type without compiling again
(:class:`Programs`)."""

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

# The study's names for registry methods. reference, none and oracle_precision are plain
# AdamW with the float32 switch forced on every layer, on none, or on the layers a burst
# disturbs (FORCED); current_scaling and fine_grained are plain AdamW under another
# quantization recipe (config.recipes); the GNMR rows differ in the signal they watch.
ROLES = {
    "reference": "adamw",
    "none": "adamw",
    "oracle_precision": "adamw",
    "current_scaling": "adamw",
    "fine_grained": "adamw",
    "gnmr": "gnmr_precision",
    "gnmr_amax": "gnmr_precision_external",
    "gnmr_both": "gnmr_precision_both",
}
FORCED = {"reference": "all", "oracle_precision": "oracle"}
RECIPE_PEERS = ("current_scaling", "fine_grained")
EXTRA_METHODS = ("oracle_precision",)  # a reference for the precision action, not a contender
GNMR_ROWS = ("gnmr", "gnmr_amax", "gnmr_both")
FILTERS = (nnx.Param, lowprec.QuantState, lowprec.HighPrecision)


def uses_gnmr(name: str) -> bool:
    return methods.uses_gnmr(ROLES.get(name, name))


def method_quant(
    name: str, config: ml_collections.ConfigDict, quant: lowprec.QuantConfig
) -> lowprec.QuantConfig:
    """The regime's recipe ``quant``, or for a recipe peer that recipe with the peer's
    fields (``config.recipes[name]``) laid over it."""
    if name not in RECIPE_PEERS:
        return quant
    return lowprec.quant_config(**{**quant._asdict(), **config.recipes[name]})


def make_model(config: ml_collections.ConfigDict, quant: lowprec.QuantConfig, key) -> lm.Decoder:
    return lm.decoder(config, quant, key)


def gnmr_units(config: ml_collections.ConfigDict):
    """GNMR's units: the model's quantized layers (``lowprec.recoverable_units``)."""
    model = nnx.eval_shape(lambda: make_model(config, lowprec.QuantConfig(), jax.random.key(0)))
    return lowprec.recoverable_units(model)


def make_optimizer(
    name: str, config: ml_collections.ConfigDict, units: Any = None
) -> optax.GradientTransformation:
    """AdamW, behind or inside the method's stability transform (GNMR's units: ``units``,
    by default :func:`gnmr_units`)."""
    if units is None and uses_gnmr(name):
        units = gnmr_units(config)
    return methods.optimizer(name, config, roles=ROLES, units=units).transform


def layer_grad_norms(grads: Any, paths: list[str]) -> jax.Array:
    """(num_layers,) float32 gradient norm of each quantized layer (kernel and bias)."""
    partition = optstab.tree.make_partition(grads, lm.layer_units)
    rows = jnp.array([partition.index(path) for path in paths])
    return optstab.tree.unit_norms(partition, grads)[rows]


class Run(NamedTuple):
    """Training state of one seed (a pytree; stacked over seeds under vmap)."""

    params: Any  # nnx.Param state
    quant_state: Any  # lowprec.QuantState: amax, amax histories, rounding keys
    switches: Any  # lowprec.HighPrecision: overwritten from the mask every step
    opt_state: Any


class ModelFns(NamedTuple):
    """What every method of one quantization recipe shares: the model structure, its
    initial state stacked over seeds, and the jitted validation loss
    ``evaluate(params, quant_state, switches, val)`` (float32, no outliers)."""

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
    """Jittable ``init(params) -> opt_state`` and ``chunk(run, *inputs)`` of ``name``."""
    tx = make_optimizer(name, config)
    gnmr = uses_gnmr(name)
    external = methods.watches_external(ROLES.get(name, name))
    paths = lm.layer_paths(config.depth)
    positions = tuple(config.model_outliers.positions)

    def step(run: Run, inputs):
        windows, layer, channels, alpha, real, forced = inputs
        mask = {path: forced[i] for i, path in enumerate(paths)}
        if gnmr:
            recovering = optstab.recovery_mask(run.opt_state)
            mask = {path: flag | recovering[path] for path, flag in mask.items()}
        multipliers = outlier_vectors(config, layer, channels, alpha)
        quantizer_only = {p: jnp.where(real, 1.0, a) for p, a in multipliers.items()}
        in_function = {p: jnp.where(real, a, 1.0) for p, a in multipliers.items()}

        def loss_fn(params, quant_state, switches):
            model = nnx.merge(graphdef, params, quant_state, switches, copy=True)
            lowprec.set_high_precision(model, mask)
            loss = lm.next_byte_loss(model, windows, quantizer_only, in_function, positions)
            _, quant_state, switches = nnx.state(model, *FILTERS)
            seen = (lowprec.high_precision_flags(model), lowprec.amax_signal(model))
            return loss, (quant_state, switches, seen)

        (loss, (quant_state, switches, (flags, signal))), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(run.params, run.quant_state, run.switches)
        extra = {"unit_signal": signal} if external else {}
        updates, opt_state = tx.update(grads, run.opt_state, run.params, **extra)
        params = optax.apply_updates(run.params, updates)
        record = {
            "loss": loss,
            "high_precision": jnp.stack([flags[p] for p in paths]),
            "grad_norm": optstab.tree.global_norm(grads),
            "layer_grad_norms": layer_grad_norms(grads, paths),
            "amax_signal": jnp.stack([signal[p] for p in paths]),
        }
        return Run(params, quant_state, switches, opt_state), record

    def chunk(run: Run, *inputs):
        return jax.lax.scan(step, run, inputs)

    return tx.init, chunk


class Programs:
    """The models and compiled training chunks of one run, built on first use and shared
    by every regime: one :class:`ModelFns` per quantization recipe, one compiled chunk
    per (registry method, recipe). ``mesh``: a ``("data",)`` mesh or None."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Any = None, fsdp: bool = False):
        self.config, self.mesh, self.fsdp = config, mesh, fsdp
        self._models: dict = {}
        self._built: dict = {}
        self._chunks: dict = {}

    def model(self, quant: lowprec.QuantConfig) -> ModelFns:
        if quant not in self._models:
            self._models[quant] = model_fns(self.config, quant)
        return self._models[quant]

    def _build(self, name: str, quant: lowprec.QuantConfig) -> tuple[Any, Any]:
        """The jitted, vmapped ``init`` and the ``chunk`` of ``name`` under ``quant``."""
        key = (ROLES.get(name, name), quant)
        if key not in self._built:
            init, chunk = build(name, self.config, self.model(quant).graphdef)
            self._built[key] = jax.jit(jax.vmap(init)), chunk
        return self._built[key]

    def initial_run(self, name: str, quant: lowprec.QuantConfig) -> Run:
        """The seeds' initial training state of ``name``, placed on the mesh."""
        model = self.model(quant)
        init, _ = self._build(name, quant)
        params, quant_state, switches = jax.tree.map(jnp.copy, model.initial)  # chunks donate
        run = Run(params, quant_state, switches, init(params))
        if self.mesh is not None:  # FSDP splits params and optimizer state, never the seeds
            run = parallel.place_params(run, self.mesh, self.fsdp, leading_axes=1)
        return run

    def chunk(self, name: str, quant: lowprec.QuantConfig, run: Run, args: list):
        """The compiled chunk of ``name`` under ``quant`` (built on the first call, the
        same executable after) and the seconds its compilation took."""
        key = (ROLES.get(name, name), quant)
        if key not in self._chunks:
            _, chunk = self._build(name, quant)
            # The state keeps its shardings from chunk to chunk (XLA would otherwise pick
            # new ones, and the compiled chunk accepts only the ones it was built for).
            shardings = None if self.mesh is None else jax.tree.map(lambda x: x.sharding, run)
            start = time.perf_counter()
            jitted = jax.jit(jax.vmap(chunk), donate_argnums=0, out_shardings=(shardings, None))
            compiled = jitted.lower(run, *args).compile()
            self._chunks[key] = (compiled, time.perf_counter() - start)
        return self._chunks[key]


def forced_mask(name: str, inputs: dict) -> np.ndarray:
    """(seeds, steps, layers) bool: the layers ``name`` holds in float32 whatever else
    happens (every layer for ``reference``, the disturbed ones for ``oracle_precision``)."""
    oracle = inputs["oracle"]
    kind = FORCED.get(name)
    return oracle if kind == "oracle" else np.full(oracle.shape, kind == "all")


def train_method(
    name: str,
    config: ml_collections.ConfigDict,
    quant: lowprec.QuantConfig,
    inputs: dict,
    val: np.ndarray,
    progress: Any = None,
    mesh: Any = "auto",
    programs: Programs | None = None,
    context: Context | None = None,
    loop_name: str | None = None,
    fsdp: bool = False,
) -> dict:
    """Trains ``name`` on every seed at once under the regime recipe ``quant``; returns
    numpy traces and timings.

    ``mesh``: ``"auto"`` (data parallel over all devices when there are several), a
    ``("data",)`` mesh, or None; ``fsdp``: with a mesh, split large parameters over its
    ``data`` axis (both are ignored when ``programs`` is given: its own apply).
    ``programs``: the run's shared :class:`Programs` (a new one if None). ``context``:
    the run's context, whose ``loop`` saves the training state at the end of an
    ``eval_every`` chunk (as loop ``loop_name``, default ``name``) every so often and
    resumes from the newest save.

    Returns a dict with ``val_curve`` (seeds, evals), ``loss``, ``grad_norm`` (seeds,
    steps), ``high_precision``, ``layer_grad_norms``, ``amax_signal`` (seeds, steps,
    layers), ``compile_s`` (of the method's program, which other methods and regimes may
    share) and ``chunk_s`` (wall seconds of each chunk after the first).
    """
    make_optimizer(name, config)  # an unknown name raises here
    if programs is None:
        programs = Programs(config, parallel.resolve_mesh(mesh), fsdp)
    mesh = programs.mesh
    loop = resume.NoCheckpoint().loop if context is None else context.loop
    quant = method_quant(name, config, quant)
    model = programs.model(quant)
    run = programs.initial_run(name, quant)
    per_step = {**inputs, "forced": forced_mask(name, inputs)}
    val = jnp.asarray(val)

    def evaluate_all(run: Run):
        return model.evaluate(run.params, run.quant_state, run.switches, val)

    every = config.eval_every
    if config.num_steps % every:
        raise ValueError(f"num_steps {config.num_steps} is not a multiple of eval_every {every}")

    def chunk_inputs(start):
        return shard_inputs([per_step[k][:, start : start + every] for k in INPUT_ORDER], mesh)

    chunk_all, compile_s = programs.chunk(name, quant, run, chunk_inputs(0))
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
