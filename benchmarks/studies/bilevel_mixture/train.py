"""Training of ``bilevel_mixture``: the solvers, one compiled training function per
job (settings and seeds vmapped), the jobs of a config, and the tuning grid."""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks.harness import Context, measure, parallel
from benchmarks.problems import methods, models
from benchmarks.studies.bilevel_mixture.problem import (
    BASELINES,
    fixed_weights,
    make_data,
    mixture_loss,
    mixture_problem,
    target_loss,
)
from optstab import bilevel

HYPER_KEYS = ("inner_lr", "aux_lr", "average", "outer_lr", "l2")


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The shared step sizes, ``l2`` and the radius (if any). They enter the jitted
    training as float32 arguments, so a grid of them (the tuning) costs one
    compilation."""
    keys = HYPER_KEYS if config.radius is None else (*HYPER_KEYS, "radius")
    return {key: float(config[key]) for key in keys}


def outer_optimizer(kind: str, learning_rate: jax.Array) -> optax.GradientTransformation:
    if kind == "sgd":
        return optax.sgd(learning_rate)
    if kind == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"outer_optimizer must be 'sgd' or 'adam', got {kind!r}")


def solver(
    name: str,
    problem: bilevel.BilevelProblem,
    hyper: dict[str, jax.Array],
    config: ml_collections.ConfigDict,
    key: jax.Array,
) -> optax.GradientTransformationExtraArgs:
    """The bilevel transform of method ``name``, chained with the outer optimizer."""
    transform = methods.bilevel_solver(
        name,
        problem,
        hyper["inner_lr"],
        hyper["aux_lr"],
        hyper["average"],
        key=key,
        radius=hyper.get("radius"),
        resample_every=config.resample_every,
    )
    return optax.chain(transform, outer_optimizer(config.outer_optimizer, hyper["outer_lr"]))


def make_train_one(kind: str, config: ml_collections.ConfigDict, num_domains: int, mesh=None):
    """``train_one(hyper, setup, domain_x, domain_y, x_val, y_val, x_test, y_test)``.

    ``kind`` is a solver name, or ``"fixed"`` for the baselines, which then read their
    mixture from ``hyper["weights"]`` (a (K,) vector). Trains one seed and returns the
    final mixture and target metrics, and every ``record_every`` steps the mixture and
    the whole-validation loss. Not jitted: :func:`make_train` vmaps and jits it. With a
    ``mesh``, every minibatch is split over its ``data`` axis along the example axis.
    """
    if kind != "fixed":
        methods.check_bilevel([kind])

    def train_one(hyper, setup, domain_x, domain_y, x_val, y_val, x_test, y_test):
        y0 = setup["params"]
        rows = jnp.arange(num_domains)[:, None]

        def batches(idx):
            inner_idx, outer_idx = idx
            inner = (domain_x[rows, inner_idx], domain_y[rows, inner_idx])  # (K, b, ...)
            outer = (x_val[outer_idx], y_val[outer_idx])
            return (
                parallel.batch_constraint(inner, mesh, axis=1),
                parallel.batch_constraint(outer, mesh, axis=0),
            )

        if kind == "fixed":
            weights = hyper["weights"]
            grad_fn = jax.grad(lambda y, b: mixture_loss(weights, y, b, hyper["l2"]))

            def step(y, idx):
                inner, _ = batches(idx)
                g = grad_fn(y, inner)
                return jax.tree.map(lambda p, d: p - hyper["inner_lr"] * d, y, g), None

            carry = y0
            lower = lambda c: c
            mixture = lambda c: weights
        else:
            problem = mixture_problem(y0, hyper["l2"])
            tx = solver(kind, problem, hyper, config, setup["probe_key"])
            x0 = jnp.zeros((num_domains,))

            def step(carry, idx):
                x, state = carry
                inner, outer = batches(idx)
                updates, state = tx.update(x, state, x, inner_batch=inner, outer_batch=outer)
                return (optax.apply_updates(x, updates), state), None

            carry = (x0, tx.init(x0))
            lower = lambda c: bilevel.inner_params(c[1])
            mixture = lambda c: jax.nn.softmax(c[0])

        def chunk(carry, idx):
            carry, _ = jax.lax.scan(step, carry, idx)
            record = {
                "mixture": mixture(carry),
                "val_loss": target_loss(lower(carry), (x_val, y_val)),
            }
            return carry, record

        carry, curves = jax.lax.scan(chunk, carry, (setup["inner_idx"], setup["outer_idx"]))
        y = lower(carry)
        params_finite = jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(y)])
        )
        return {
            "curves": curves,
            "mixture": mixture(carry),
            "test_acc": models.accuracy(y, x_test, y_test),
            "test_loss": target_loss(y, (x_test, y_test)),
            "val_loss": target_loss(y, (x_val, y_val)),
            "finite": params_finite & jnp.all(jnp.isfinite(mixture(carry))),
        }

    return train_one


def make_train(kind: str, config: ml_collections.ConfigDict, num_domains: int, mesh=None):
    """:func:`make_train_one` vmapped over a leading axis of ``hyper`` (settings or
    baselines) and over seeds, and jitted: outputs are ``(settings, seeds, ...)``."""
    train_one = make_train_one(kind, config, num_domains, mesh)
    over_seeds = jax.vmap(train_one, in_axes=(None, 0, 0, 0, None, None, None, None))
    return jax.jit(jax.vmap(over_seeds, in_axes=(0, None, None, None, None, None, None, None)))


def train_kind(
    kind: str, hyper: dict[str, Any], config: ml_collections.ConfigDict, data: dict, mesh=None
) -> tuple[dict, float, float]:
    """Trains ``kind`` for each of the stacked settings in ``hyper`` and every seed;
    returns numpy outputs (axes settings, seeds), compile and run seconds.

    With a ``mesh``, ``data`` must be placed on it (:func:`place_data`).
    """
    train = make_train(kind, config, data["domain_x"].shape[1], mesh)
    args = (
        parallel.replicate(jax.tree.map(jnp.asarray, hyper), mesh),
        data["setup"],
        data["domain_x"],
        data["domain_y"],
        data["x_val"],
        data["y_val"],
        data["x_test"],
        data["y_test"],
    )
    return measure.compile_and_run(train, *args)


def method_hyper(config: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    """The settings of method ``name``: the shared ones (:func:`hyperparameters`),
    ``average = 1`` for SOBA, then ``config.method_overrides[name]`` if any."""
    hyper = {k: float(v) for k, v in hyperparameters(config).items()}
    if name == "soba":
        hyper["average"] = 1.0
    overrides = config.get("method_overrides") or {}
    if name in overrides:
        for key, value in dict(overrides[name]).items():
            if key not in hyper:
                raise ValueError(f"method_overrides[{name!r}] sets unknown key {key!r}")
            hyper[key] = float(value)
    return hyper


def jobs_of(config: ml_collections.ConfigDict, num_domains: int) -> list[tuple[str, list, dict]]:
    """``(kind, method names, stacked hyper)`` per compiled function.

    The baselines share one function (their mixture is an argument). SOBA shares
    MA-SOBA's function with ``average = 1``: ``bilevel.soba`` is defined as exactly
    that (``ma_soba(..., average=1.0)``), so the numbers are the same and one
    compilation is saved. Each BROS rank has its own function.
    """

    def stack(names, **extra):
        settings = [method_hyper(config, name) for name in names]
        out = {k: np.asarray([h[k] for h in settings], np.float32) for k in settings[0]}
        out.update(extra)
        return out

    jobs = []
    baselines = [m for m in config.methods if m in BASELINES]
    if baselines:
        weights = np.stack([fixed_weights(m, num_domains) for m in baselines])
        jobs.append(("fixed", baselines, stack(baselines, weights=weights)))
    soba_like = [m for m in config.methods if m in ("soba", "ma_soba")]
    if soba_like:
        jobs.append(("ma_soba", soba_like, stack(soba_like)))
    for name in config.methods:
        if methods.bros_rank(name) is not None:
            jobs.append((name, [name], stack([name])))
    return jobs


def train_methods(data: dict, context: Context) -> tuple[dict, dict]:
    """Trains every method of ``config.methods`` (see :func:`jobs_of`), each job one
    stage named after its methods (e.g. ``soba+ma_soba``); returns per-method numpy
    outputs (axis 0 = seeds) and timings. With a mesh, ``data`` must be placed on it
    (:func:`benchmarks.studies.bilevel_mixture.problem.place_data`)."""
    config = context.config
    outputs, timing = {}, {}
    jobs = jobs_of(config, data["domain_x"].shape[1])
    for kind, names, hyper in context.each(jobs, lambda job: "+".join(job[1])):

        def job(kind=kind, hyper=hyper):
            out, compile_s, run_s = train_kind(kind, hyper, config, data, context.mesh)
            return {"out": out, "compile_s": compile_s, "run_s": run_s}

        trained = context.stage("+".join(names), job)
        out, compile_s, run_s = trained["out"], trained["compile_s"], trained["run_s"]
        for i, name in enumerate(names):
            outputs[name] = jax.tree.map(lambda a, i=i: a[i], out)
            timing[name] = {"compile_s": compile_s, "run_s": run_s}  # of the whole job
    return {name: outputs[name] for name in config.methods}, timing


def tune(
    config: ml_collections.ConfigDict, grid: dict[str, list[float]], method: str = "ma_soba"
) -> list[dict]:
    """Final whole-validation loss of ``method`` over a grid of settings (the tuning).

    ``method`` is ``"ma_soba"`` (whose settings all solvers share) or a baseline
    (whose lower step is tuned on its own). ``grid`` maps keys of :data:`HYPER_KEYS`
    (and ``"radius"``, where ``inf`` means no projection) to candidate values; every
    combination runs on ``config``'s seeds (use tuning seeds apart from the reported
    ones: set ``config.seed``) in one compiled function. Only the validation loss is
    looked at: no test split, no other method. Returns one row per setting, best
    median first.
    """
    config = config.copy_and_resolve_references()
    if "radius" in grid and config.radius is None:
        config.radius = float("inf")  # traced; inf leaves z unprojected
    data = make_data(config)
    base = method_hyper(config, method)
    combos = list(itertools.product(*grid.values()))
    hyper = {k: np.full(len(combos), v, np.float32) for k, v in base.items()}
    for i, combo in enumerate(combos):
        for key, value in zip(grid, combo, strict=True):
            hyper[key][i] = value
    kind = "fixed" if method in BASELINES else method
    if method in BASELINES:
        weights = fixed_weights(method, data["domain_x"].shape[1])
        hyper["weights"] = np.repeat(weights[None], len(combos), axis=0)
    out, _, _ = train_kind(kind, hyper, config, data)
    rows = []
    for i, combo in enumerate(combos):
        val = np.where(np.isfinite(out["val_loss"][i]), out["val_loss"][i], np.inf)
        rows.append(
            {
                "setting": dict(zip(grid, combo, strict=True)),
                "val_loss_median": float(np.median(val)),
                "val_loss_max": float(np.max(val)),
                "val_loss_per_seed": val.round(4).tolist(),
                "clean_weight_median": float(np.median(out["mixture"][i][:, 0])),
            }
        )
    return sorted(rows, key=lambda r: r["val_loss_median"])
