"""Clean training runs of ``gnmr_calibration``: watched runs (GNMR cannot act; one watcher
per grid value of ``threshold``) and acting runs (a GNMR method of the registry at given
bars), for the digits MLP of ``spike_injection`` and the byte-level LM (see the package
docstring)."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import optstab
from benchmarks.harness import measure, parallel
from benchmarks.problems import data, lm, methods, models
from benchmarks.problems import spike_training as spike_train
from optstab import lowprec
from optstab.stability import gnmr as gnmr_module

BARS = ("threshold", "delta_threshold", "delta_gate")  # the options this study calibrates


# ----------------------------------------------------------------------------- watchers


def watchers(config: ml_collections.ConfigDict, units: Any):
    """``init(params)`` and ``watch(states, grads) -> (states, record)`` for one GNMR per
    value of ``config.rule.threshold_grid``, stacked on axis 0.

    Each is ``optstab.gnmr`` with ``max_recover=0`` (it never enters recovery, so every
    update is observed and nothing is acted on) and the library's other defaults; its
    Delta bars are the old defaults', which only set the recorded ``score`` (GNMR's
    statistics do not depend on them). The record holds, per threshold and unit, the
    telemetry's GNMR and Delta-GNMR of the gradient signal and the ranking score.
    """
    thresholds = jnp.asarray(config.rule.threshold_grid, jnp.float32)
    old = config.old_defaults

    def make(threshold):
        return optstab.gnmr(
            threshold=threshold,
            delta_threshold=old.delta_threshold,
            delta_gate=old.delta_gate,
            max_recover=0,
            action="precision",
            units=units,
        )

    def init(params):
        return jax.vmap(lambda threshold: make(threshold).init(params))(thresholds)

    def watch(states, grads):
        def one(state, threshold):
            _, state = make(threshold).update(grads, state)
            telemetry = state.telemetry
            record = {"gnmr": telemetry.gnmr[0], "delta_gnmr": telemetry.delta_gnmr[0],
                      "score": telemetry.score}  # fmt: skip
            return state, record

        return jax.vmap(one)(states, thresholds)

    return init, watch


def gnmr_config(base: ml_collections.ConfigDict, bars: dict | None) -> ml_collections.ConfigDict:
    """``base`` with a ``gnmr`` group: ``bars`` (the old defaults), or empty for the
    library's defaults."""
    config = base.copy_and_resolve_references()
    config.gnmr = ml_collections.ConfigDict(dict(bars or {}))
    return config


# ----------------------------------------------------------------------------- MLP


def mlp_spike_free(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.mlp`` as a ``spike_injection`` config without spikes (its setup and
    trainer then run the MLP problem unchanged, with no event ever drawn)."""
    mlp = config.mlp.copy_and_resolve_references()
    mlp.spike_kind, mlp.spike_prob, mlp.spike_min, mlp.spike_max = "random", 0.0, 1.0, 1.0
    mlp.spike_start = mlp.num_steps
    return mlp


def seed_keys(config: ml_collections.ConfigDict) -> jax.Array:
    """The calibration seeds' keys, then the held-out seeds' (two base keys)."""
    calibration = spike_train.seed_keys(config.seed, config.num_seeds)
    held_out = spike_train.seed_keys(config.held_out_seed, config.num_held_out)
    return jnp.concatenate([calibration, held_out])


def split_seeds(config: ml_collections.ConfigDict, stacked: Any) -> tuple[Any, Any]:
    """A pytree stacked over :func:`seed_keys` as (calibration, held-out)."""
    n = config.num_seeds
    return jax.tree.map(lambda x: x[:n], stacked), jax.tree.map(lambda x: x[n:], stacked)


def mlp_setups(config: ml_collections.ConfigDict, split: data.Split) -> tuple[dict, dict]:
    """``spike_injection``'s per-seed setup (initial parameters and minibatches) of the
    calibration and of the held-out seeds."""
    setup = spike_train.make_setup(mlp_spike_free(config), split, seed_keys(config))
    return split_seeds(config, setup)


def mlp_watched(config, split: data.Split, setup: dict, mesh=None) -> dict:
    """AdamW on the clean MLP, every seed, with the watchers: their records (seeds,
    steps, thresholds, units), the final test accuracy and the seconds."""
    mlp = mlp_spike_free(config)
    adamw = methods.adamw(mlp)
    init_watch, watch = watchers(config, None)

    def train_one(setup, x_train, y_train, x_test, y_test):
        params = setup["params"]

        def step(carry, idx):
            params, opt_state, watch_state = carry
            batch = parallel.batch_constraint((x_train[idx], y_train[idx]), mesh)
            grads = jax.grad(models.cross_entropy)(params, *batch)
            updates, opt_state = adamw.update(grads, opt_state, params)
            watch_state, record = watch(watch_state, grads)
            return (optax.apply_updates(params, updates), opt_state, watch_state), record

        carry = (params, adamw.init(params), init_watch(params))
        (params, _, _), records = jax.lax.scan(step, carry, setup["batches"])
        return records, models.accuracy(params, x_test, y_test)

    jitted = jax.jit(jax.vmap(train_one, in_axes=(0, None, None, None, None)))
    arrays = parallel.replicate((split.x_train, split.y_train, split.x_test, split.y_test), mesh)
    (records, test_acc), compile_s, run_s = measure.compile_and_run(jitted, setup, *arrays)
    return {"records": records, "test_acc": test_acc, "compile_s": compile_s, "run_s": run_s}


def mlp_acting(config, name: str, settings: dict, split, setup: dict, mesh=None) -> dict:
    """GNMR method ``name`` (``gnmr_clip`` or ``gnmr_skip``) acting on the clean MLP of
    the held-out seeds, once per setting of ``settings`` (``{name: bars}``; vmapped, one
    compilation), with ``spike_injection``'s trainer: ``{setting: {counters,
    test_acc}}`` per seed, and the seconds."""
    trained = spike_train.train_method(
        name, mlp_spike_free(config), split, setup, float("nan"), mesh,
        gnmr_over=list(settings.values()),
    )  # fmt: skip
    out = trained["out"]
    acting = {
        setting: {"counters": {k: v[i] for k, v in out["counters"].items()},
                  "test_acc": out["test_acc"][i]}
        for i, setting in enumerate(settings)
    }  # fmt: skip
    return {**acting, "compile_s": trained["compile_s"], "run_s": trained["run_s"]}


# ----------------------------------------------------------------------------- LM


FILTERS = (nnx.Param, lowprec.QuantState, lowprec.HighPrecision)


def lm_quant(config: ml_collections.ConfigDict) -> lowprec.QuantConfig:
    return lowprec.quant_config(**config.quant)


def lm_model(config: ml_collections.ConfigDict, key: jax.Array) -> lm.Decoder:
    return lm.decoder(config.lm, lm_quant(config), key)


def lm_units(config: ml_collections.ConfigDict):
    """GNMR's units of the LM: its quantized layers (``lowprec.recoverable_units``)."""
    abstract = nnx.eval_shape(lambda: lm_model(config, jax.random.key(0)))
    return lowprec.recoverable_units(abstract)


def lm_corpus(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """The train bytes and the fixed held-out windows of ``lowprec_lm``'s corpus."""
    corpus = lm.stdlib_corpus(config.lm.val_fraction)
    val = lm.val_windows(corpus.val, config.lm.val_windows, config.lm.context + 1)
    return corpus.train, val


def lm_runs(config, problem: str, corpus: tuple, settings: dict, mesh=None) -> dict:
    """Every run of one LM problem in one compiled program (vmapped over runs).

    ``lm_float32`` holds every layer in float32; ``lm_int8`` runs the quantized layers
    in int8 unless GNMR recovers them. Each run trains the registry's
    ``config.lm_method`` (GNMR chained before AdamW, precision action) from its seed's
    initial model on its own random windows of the train bytes, with the watchers
    beside it. The calibration seeds run with the old bars and ``max_recover=0`` (GNMR
    cannot act: the watched runs); the held-out seeds once per setting of ``settings``
    (``{name: bars}``), with the library's ``max_recover``.

    Returns ``watched`` (the watchers' records (seeds, steps, thresholds, units) and the
    final validation loss, of the calibration seeds), ``acting`` (``{setting:
    {counters, val_loss}}`` per held-out seed) and the seconds.
    """
    c = config.lm
    float32 = problem == "lm_float32"
    units = lm_units(config)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: lm_model(config, jax.random.key(0))))
    train_bytes, val = (jnp.asarray(x, jnp.int32) for x in corpus)
    offsets = jnp.arange(c.context + 1)
    keys, options = run_plan(config, settings)
    init_watch, watch = watchers(config, units)

    def model_of(params, quant_state, switches, mask):
        model = nnx.merge(graphdef, params, quant_state, switches, copy=True)
        lowprec.set_high_precision(model, mask)
        return model

    def train_one(key, option):
        tx = methods.optimizer(config.lm_method, gnmr_config(c, option), units=units).transform
        init_key, batch_key = jax.random.split(key)
        params, quant_state, switches = nnx.state(lm_model(config, init_key), *FILTERS)

        def step(carry, t):
            params, quant_state, switches, opt_state, watch_state = carry
            starts = jax.random.randint(jax.random.fold_in(batch_key, t), (c.batch_size,), 0,
                                        len(train_bytes) - c.context - 1)  # fmt: skip
            windows = parallel.batch_constraint(train_bytes[starts[:, None] + offsets], mesh)
            mask = {"": jnp.array(True)} if float32 else optstab.recovery_mask(opt_state)

            def loss_fn(params, quant_state, switches):
                model = model_of(params, quant_state, switches, mask)
                loss = lm.next_byte_loss(model, windows)
                _, quant_state, switches = nnx.state(model, *FILTERS)
                return loss, (quant_state, switches)

            (_, (quant_state, switches)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, quant_state, switches
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            watch_state, record = watch(watch_state, grads)
            params = optax.apply_updates(params, updates)
            return (params, quant_state, switches, opt_state, watch_state), record

        carry = (params, quant_state, switches, tx.init(params), init_watch(params))
        carry, records = jax.lax.scan(step, carry, jnp.arange(c.num_steps))
        params, quant_state, switches, opt_state, _ = carry
        model = model_of(params, quant_state, switches, {"": jnp.array(True)})
        val_loss = lm.next_byte_loss(model, val)
        return {"records": records, "val_loss": val_loss, "counters": counters(opt_state)}

    jitted = jax.jit(jax.vmap(train_one))
    out, compile_s, run_s = measure.compile_and_run(
        jitted, *parallel.replicate((keys, options), mesh)
    )
    n, h = config.num_seeds, config.num_held_out
    part = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], out)
    watched = part(0, n)
    acting = {
        name: {k: v for k, v in part(n + i * h, n + (i + 1) * h).items() if k != "records"}
        for i, name in enumerate(settings)
    }
    return {
        "watched": {"records": watched["records"], "val_loss": watched["val_loss"]},
        "acting": acting,
        "compile_s": compile_s,
        "run_s": run_s,
    }


def run_plan(config: ml_collections.ConfigDict, settings: dict) -> tuple[jax.Array, dict]:
    """The runs of :func:`lm_runs`: their seed keys and GNMR options, stacked. The
    calibration seeds with the old bars and ``max_recover=0``, then the held-out seeds
    once per setting with the library's ``max_recover``."""
    calibration, held_out = split_seeds(config, seed_keys(config))
    budget = float(library_defaults()["max_recover"])
    runs = [(calibration, {**config.old_defaults, "max_recover": 0.0})]
    runs += [(held_out, {**bars, "max_recover": budget}) for bars in settings.values()]
    keys = jnp.concatenate([k for k, _ in runs])
    options = {
        key: jnp.concatenate([jnp.full(len(k), float(o[key]), jnp.float32) for k, o in runs])
        for key in runs[0][1]
    }
    options["max_recover"] = options["max_recover"].astype(jnp.int32)
    return keys, options


def library_defaults() -> dict[str, Any]:
    """``optstab.gnmr``'s keyword defaults, read from its signature."""
    parameters = inspect.signature(optstab.gnmr).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not p.empty}


def library_lock(name: str) -> int:
    """The lock ``lock_steps=None`` (the default) gives GNMR method ``name``'s action."""
    recipe = methods.RECIPES[name]
    action = recipe.action
    if action is None:
        constructor = optstab.gnmr if recipe.pre == "gnmr" else optstab.gnmr_wrap
        action = inspect.signature(constructor).parameters["action"].default
    return gnmr_module._default_lock_steps(action)


def acting_settings(config: ml_collections.ConfigDict, name: str) -> dict[str, dict]:
    """The two settings method ``name`` runs at on the held-out seeds: the old bars with
    the old lock (``config.old_defaults``), and the library's bars with the lock its
    default gives this method's action."""
    new = {**library_bars(), "lock_steps": float(library_lock(name))}
    return {"old_defaults": dict(config.old_defaults), "new_defaults": new}


def library_bars() -> dict[str, float]:
    """The library's current ``threshold``, ``delta_threshold`` and ``delta_gate``."""
    defaults = library_defaults()
    if defaults["delta_threshold"] is None:
        raise ValueError("this study compares Delta bars: the default delta_threshold is None")
    return {key: float(defaults[key]) for key in BARS}


def counters(opt_state: Any) -> dict[str, jax.Array]:
    """GNMR's cumulative counters in ``opt_state``."""
    metrics = optstab.gnmr_metrics(opt_state)
    return {key: metrics[key] for key in ("triggers", "denied", "preempted", "recovered_steps")}
