"""Data-mixture learning: can a bilevel solver find which training domains help?

Setup. The digits training split (``bilevel_problems.digits_splits``: 1077 images,
standardised on train) is cut into K disjoint, class-stratified shards of equal size
(K = 4 gives 269 images each; leftovers are dropped). Each shard becomes a domain
with its own corruption, named in ``config.domains`` as ``"kind"`` or
``"kind:amount"``:

* ``clean``: untouched;
* ``label_noise:f``: a fraction ``f`` of the labels replaced by a *different* class
  (``bilevel_problems.corrupt_labels``). Even at ``f = 0.8``, among the images of
  one class the true label stays the most frequent one (20 % against 8.9 % for
  each wrong class), so such a domain is very noisy but not void;
* ``shuffled``: the shard's labels permuted at random, so labels carry no
  information about the images;
* ``feature_noise:s``: labels kept, Gaussian noise of standard deviation ``s`` added
  to the standardised pixels.

The default design is ``clean``, ``label_noise:0.3``, ``label_noise:0.8``,
``shuffled``. The target domain is clean digits: the validation split (360 images)
is the upper-level data and the test split (360 images) is used only for reporting.
Per seed, the shard assignment and the corruption come from numpy's
``default_rng([seed, s, 0])``, and the MLP initialisation (He-normal, the layout of
``models.mlp_init``), every minibatch index and BROS's probe key from
``default_rng([seed, s, 1])``: every method sees the same data, initialisation and
minibatches within a seed. The train / validation / test split is fixed.

Problem. Upper variable ``x``: K mixture logits, initialised at 0 (uniform mixture
``softmax(x)``). Lower variable ``y``: an MLP (64 -> hidden -> 10). With one
minibatch of ``batch_size`` images per domain, stacked as ``(K, b, ...)``::

    g(x, y) = sum_k softmax(x)_k * mean_i CE(y; domain-k minibatch) + l2/2 ||y||^2
    f(x, y) = mean_i CE(y; validation minibatch of outer_batch_size)

Methods. ``soba``, ``ma_soba`` and ``bros_r{rank}`` (``optstab.bilevel``) chained with
``optax.sgd(outer_lr)`` over ``x`` (``optax.adam`` if ``outer_optimizer="adam"``), all
with the same settings, tuned on MA-SOBA's validation loss (see the config and
:func:`tune`). Two baselines train the MLP alone with plain SGD on ``g`` on the same
minibatches: ``uniform`` (``x`` fixed at 0) and ``oracle_clean`` (all weight on the
clean domain, the mixture someone who knew the corruption would pick); each has its
own lower step, tuned on its own validation loss (``config.method_overrides``).
SOBA runs as MA-SOBA with ``average = 1``, which is how ``bilevel.soba`` is defined.

Measured, per seed: the final mixture ``softmax(x)``, the test accuracy and loss of
the final lower variable ``y`` (the target accuracy), its loss on the whole
validation split, divergence (a non-finite ``y`` or mixture), and every
``record_every`` steps the mixture and the whole-validation loss. The summary gives
medians over seeds; ``mixture`` is the per-domain median over the finite seeds,
renormalised to sum to one (``mixture_per_seed`` has the raw values), ``ranking``
the domains from largest to smallest weight. Training is a ``lax.scan`` over steps
under ``jax.vmap`` over seeds (and over settings that share a compiled function:
the two baselines, SOBA with MA-SOBA, a tuning grid).

Resuming and devices. With a checkpoint directory each compiled training job (the
baselines, SOBA with MA-SOBA, each BROS rank) is saved when it finishes; a rerun with
the same config trains only the missing jobs. With a mesh
(:mod:`benchmarks.parallel`), each step's minibatches are sharded over its ``data``
axis (``batch_size`` and ``outer_batch_size`` must divide by its size, else
``ValueError``), the data, indices and settings are replicated and the initial MLPs
placed by :func:`benchmarks.parallel.place_params` (seeds never split).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from benchmarks import bilevel_problems, measure, models, parallel, reporting, resume
from optstab import bilevel

NUM_CLASSES = 10
BASELINES = ("uniform", "oracle_clean")
DOMAIN_KINDS = ("clean", "label_noise", "shuffled", "feature_noise")


# ---------------------------------------------------------------------------
# Domains


def parse_domain(spec: str) -> tuple[str, float]:
    """``"kind"`` or ``"kind:amount"`` -> ``(kind, amount)``; amount 0 when absent."""
    kind, _, amount = spec.partition(":")
    if kind not in DOMAIN_KINDS:
        raise ValueError(f"unknown domain kind {kind!r} in {spec!r}; one of {DOMAIN_KINDS}")
    value = float(amount) if amount else 0.0
    if kind == "label_noise" and not 0.0 <= value <= 1.0:
        raise ValueError(f"label_noise needs a fraction in [0, 1], got {spec!r}")
    if kind == "feature_noise" and value <= 0.0:
        raise ValueError(f"feature_noise needs a positive standard deviation, got {spec!r}")
    return kind, value


def describe_domain(spec: str) -> str:
    kind, amount = parse_domain(spec)
    return {
        "clean": "clean labels and pixels",
        "label_noise": f"{amount:.0%} of labels replaced by a wrong class",
        "shuffled": "labels randomly permuted, so no information",
        "feature_noise": f"clean labels, Gaussian pixel noise of std {amount:g}",
    }[kind]


def shard_indices(labels: np.ndarray, num_shards: int, rng: np.random.Generator) -> np.ndarray:
    """(num_shards, size) disjoint class-stratified index sets of equal size."""
    order = rng.permutation(labels.size)
    order = order[np.argsort(labels[order], kind="stable")]  # random within each class
    shards = [order[k::num_shards] for k in range(num_shards)]  # deal the classes round-robin
    size = min(len(s) for s in shards)
    return np.stack([rng.permutation(s)[:size] for s in shards])


def make_domains(
    x_train: np.ndarray, y_train: np.ndarray, specs: tuple[str, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs ``(K, n, d)``, labels ``(K, n)`` and the label accuracy per domain."""
    shards = shard_indices(y_train, len(specs), rng)
    inputs, labels, label_acc = [], [], []
    for spec, idx in zip(specs, shards, strict=True):
        kind, amount = parse_domain(spec)
        x, y = x_train[idx].copy(), y_train[idx].copy()
        if kind == "label_noise":
            y, _ = bilevel_problems.corrupt_labels(y, amount, NUM_CLASSES, int(rng.integers(2**31)))
        elif kind == "shuffled":
            y = rng.permutation(y)
        elif kind == "feature_noise":
            x = (x + amount * rng.standard_normal(x.shape)).astype(np.float32)
        inputs.append(x)
        labels.append(y.astype(np.int32))
        label_acc.append(float(np.mean(y == y_train[idx])))
    return np.stack(inputs), np.stack(labels), np.asarray(label_acc)


def make_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The target splits (shared) and the domains of every seed (stacked on axis 0)."""
    x_train, y_train, x_val, y_val, x_test, y_test = bilevel_problems.digits_splits()
    per_seed = [
        make_domains(
            x_train, y_train, tuple(config.domains), np.random.default_rng([config.seed, s, 0])
        )
        for s in range(config.num_seeds)
    ]
    domain_y = np.stack([p[1] for p in per_seed])
    num_domains, n_domain = domain_y.shape[1:]
    return {
        "setup": make_setup(config, num_domains, n_domain, y_val.shape[0]),
        "domain_x": np.stack([p[0] for p in per_seed]),
        "domain_y": domain_y,
        "label_acc": np.stack([p[2] for p in per_seed]),
        "x_val": x_val,
        "y_val": y_val,
        "x_test": x_test,
        "y_test": y_test,
    }


# ---------------------------------------------------------------------------
# Problem and methods


def mixture_loss(weights: jax.Array, y: models.Params, batch: tuple, l2: float) -> jax.Array:
    """``sum_k weights_k * mean CE of y on domain k's minibatch + l2/2 ||y||^2``.

    ``batch = (inputs (K, b, d), labels (K, b))``. The K minibatches go through the MLP
    as one ``(K * b, d)`` batch, so every layer stays a plain ``a @ W`` (which BROS's
    factored evaluation keeps in its subspace).
    """
    inputs, labels = batch
    num_domains, size = labels.shape
    flat = bilevel_problems.per_sample_loss(
        y, inputs.reshape(num_domains * size, -1), labels.reshape(-1)
    )
    per_domain = flat.reshape(num_domains, size).mean(axis=1)
    return jnp.dot(weights, per_domain) + 0.5 * l2 * bilevel_problems.squared_norm(y)


def target_loss(y: models.Params, batch: tuple) -> jax.Array:
    inputs, labels = batch
    return jnp.mean(bilevel_problems.per_sample_loss(y, inputs, labels))


def mixture_problem(init_params: models.Params, l2: float) -> bilevel.BilevelProblem:
    """The bilevel problem of the module docstring (``x``: K mixture logits)."""
    return bilevel.BilevelProblem(
        inner_loss=lambda x, y, batch: mixture_loss(jax.nn.softmax(x), y, batch, l2),
        outer_loss=lambda x, y, batch: target_loss(y, batch),
        inner_init=init_params,
    )


def check_method(name: str) -> None:
    if name not in ("soba", "ma_soba", *BASELINES) and bilevel_problems.bros_rank(name) is None:
        raise ValueError(f"unknown method {name!r}")


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
    transform = bilevel_problems.solver_by_name(
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


def fixed_weights(name: str, num_domains: int) -> np.ndarray:
    """The mixture a baseline trains with: uniform, or all on domain 0 (the clean one)."""
    if name == "uniform":
        return np.full((num_domains,), 1.0 / num_domains, np.float32)
    return np.eye(num_domains, dtype=np.float32)[0]


# ---------------------------------------------------------------------------
# Training


def make_train_one(kind: str, config: ml_collections.ConfigDict, num_domains: int, mesh=None):
    """``train_one(hyper, setup, domain_x, domain_y, x_val, y_val, x_test, y_test)``.

    ``kind`` is a solver name, or ``"fixed"`` for the baselines, which then read their
    mixture from ``hyper["weights"]`` (a (K,) vector). Trains one seed and returns the
    final mixture and target metrics, and every ``record_every`` steps the mixture and
    the whole-validation loss. Not jitted: :func:`make_train` vmaps and jits it. With a
    ``mesh``, every minibatch is split over its ``data`` axis along the example axis.
    """
    if kind != "fixed":
        check_method(kind)

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


def he_normal_mlp(rng: np.random.Generator, sizes: tuple[int, ...]) -> dict:
    """``models.mlp_init``'s layout and He-normal scale, drawn with numpy (see below)."""
    params = {}
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = rng.standard_normal((d_in, d_out)) * np.sqrt(2.0 / d_in)
        params[f"layer{i}"] = {"w": w.astype(np.float32), "b": np.zeros((d_out,), np.float32)}
    return params


def make_setup(config: ml_collections.ConfigDict, num_domains: int, n_domain: int, n_val: int):
    """What every method shares within a seed, stacked over seeds on axis 0.

    From seed s's generator ``numpy.random.default_rng([config.seed, s, 1])`` alone:
    the initial MLP ``params``, the minibatch indices of every step (``inner_idx``:
    (chunks, record_every, K, batch_size) into each domain; ``outer_idx``: (chunks,
    record_every, outer_batch_size) into the validation split; drawn with
    replacement) and BROS's ``probe_key`` (``jax.random.key`` of a drawn int). The
    draws use numpy because XLA:CPU compiles JAX's random draws slowly (seconds
    each, far more for rank-4 shapes) and the quick size has a one-minute budget;
    numpy also gives the same numbers on every backend.
    """
    chunks = config.num_steps // config.record_every
    if chunks < 1 or chunks * config.record_every != config.num_steps:
        raise ValueError("num_steps must be a positive multiple of record_every")
    sizes = (64, *config.hidden, NUM_CLASSES)
    per_seed = []
    for s in range(config.num_seeds):
        rng = np.random.default_rng([config.seed, s, 1])
        shape = (chunks, config.record_every)
        per_seed.append(
            {
                "params": he_normal_mlp(rng, sizes),
                "inner_idx": rng.integers(
                    0, n_domain, (*shape, num_domains, config.batch_size), dtype=np.int32
                ),
                "outer_idx": rng.integers(
                    0, n_val, (*shape, config.outer_batch_size), dtype=np.int32
                ),
                "probe_seed": int(rng.integers(2**31)),
            }
        )
    setup = jax.tree.map(lambda *leaves: np.stack(leaves), *per_seed)
    setup["probe_key"] = jnp.stack([jax.random.key(k) for k in setup.pop("probe_seed")])
    return setup


def place_data(data: dict, mesh, fsdp: bool = False) -> dict:
    """``data`` replicated on ``mesh``, the initial MLPs (stacked over seeds) placed by
    :func:`benchmarks.parallel.place_params`; unchanged without a mesh."""
    if mesh is None:
        return data
    rest = {key: value for key, value in data.items() if key != "setup"}
    setup = parallel.place_setup(data["setup"], mesh, fsdp)
    return {**parallel.replicate(rest, mesh), "setup": setup}


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
        if bilevel_problems.bros_rank(name) is not None:
            jobs.append((name, [name], stack([name])))
    return jobs


def train_methods(
    config: ml_collections.ConfigDict,
    data: dict,
    checkpointer: resume.NoCheckpoint | None = None,
    mesh=None,
) -> tuple[dict, dict]:
    """Trains every method of ``config.methods`` (see :func:`jobs_of`); returns
    per-method numpy outputs (axis 0 = seeds) and timings.

    Each job is a stage of ``checkpointer`` named after its methods, e.g.
    ``soba+ma_soba``. With a ``mesh``, ``data`` must be placed on it (:func:`place_data`).
    """
    checkpointer = checkpointer or resume.NoCheckpoint()
    outputs, timing = {}, {}
    jobs = jobs_of(config, data["domain_x"].shape[1])
    for kind, names, hyper in tqdm(jobs, desc="bilevel_mixture"):

        def job(kind=kind, hyper=hyper):
            out, compile_s, run_s = train_kind(kind, hyper, config, data, mesh)
            return {"out": out, "compile_s": compile_s, "run_s": run_s}

        trained = checkpointer.stage("+".join(names), job)
        out, compile_s, run_s = trained["out"], trained["compile_s"], trained["run_s"]
        for i, name in enumerate(names):
            outputs[name] = jax.tree.map(lambda a, i=i: a[i], out)
            timing[name] = {"compile_s": compile_s, "run_s": run_s, "shared_with": names}
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


# ---------------------------------------------------------------------------
# Summary


def normalised_median(per_seed: np.ndarray) -> np.ndarray | None:
    """Per-domain median over the finite seeds (axis 0), renormalised to sum to one;
    None when no seed is finite."""
    finite = per_seed[np.all(np.isfinite(per_seed), axis=1)]
    if len(finite) == 0:
        return None
    median = np.median(finite, axis=0)
    return median / median.sum()


def summarize_method(out: dict) -> dict:
    """Medians over seeds of one method's outputs.

    A diverged seed counts with its (chance-level) accuracy and an infinite loss (so
    losses read ``None`` once half the seeds diverged); mixtures are medians over the
    seeds that stayed finite.
    """
    mixture = np.asarray(out["mixture"], dtype=np.float64)
    finite = np.all(np.isfinite(mixture), axis=1)
    loss = lambda key: float(np.median(np.where(np.isfinite(out[key]), out[key], np.inf)))
    median_mixture = normalised_median(mixture)
    return {
        "target_acc": float(np.median(out["test_acc"])),
        "target_loss": loss("test_loss"),
        "val_loss": loss("val_loss"),
        "mixture": None if median_mixture is None else median_mixture.tolist(),
        "clean_weight": float(np.median(mixture[finite, 0])) if finite.any() else None,
        "noisy_weight": float(np.median(mixture[finite, 1:].sum(axis=1))) if finite.any() else None,
        "ranking": None
        if median_mixture is None
        else np.argsort(-median_mixture, kind="stable").tolist(),
        "diverged": int(np.sum(~out["finite"])),
        "mixture_per_seed": mixture.tolist(),
    }


def run(
    config: ml_collections.ConfigDict,
    *,
    checkpoint_dir: Any = None,
    mesh: Any = "auto",
    fsdp: bool = False,
) -> dict:
    """Runs every method of ``config.methods`` and returns the JSON-ready result.

    Args:
      config: ``configs/bilevel_mixture.py``'s ``get_config(size)``.
      checkpoint_dir: None, a directory or a :class:`benchmarks.resume.Checkpointer`:
        each training job (methods sharing a compiled function) is saved when it
        finishes, and a rerun with the same config trains only the missing ones.
      mesh: see :mod:`benchmarks.parallel` (``"auto"``: data parallel over all
        devices when there are several). ``batch_size`` and ``outer_batch_size``
        must divide by the size of its ``data`` axis (``ValueError`` otherwise).
      fsdp: with a mesh, split large MLP leaves over its ``data`` axis.
    """
    checkpointer = resume.open_checkpointer(checkpoint_dir, "bilevel_mixture", config)
    mesh = parallel.resolve_mesh(mesh)
    for name in config.methods:
        check_method(name)
    data = make_data(config)
    outputs, timing = train_methods(config, place_data(data, mesh, fsdp), checkpointer, mesh)
    raw: dict[str, dict] = {}
    methods: dict[str, dict] = {}
    for name, out in outputs.items():
        seeds = {
            key: out[key] for key in ("mixture", "test_acc", "test_loss", "val_loss", "finite")
        }
        raw[name] = {
            "seeds": reporting.to_jsonable(seeds),
            "mixture_curve": reporting.to_jsonable(out["curves"]["mixture"], digits=4),
            "val_loss_curve": reporting.to_jsonable(out["curves"]["val_loss"], digits=5),
        }
        settings = method_hyper(config, name)
        methods[name] = {**summarize_method(out), "settings": settings}
        if name in BASELINES:  # a fixed mixture: no learned order, no outer step
            methods[name]["settings"] = {k: settings[k] for k in ("inner_lr", "l2")}
            methods[name]["ranking"] = None
    label_acc = data["label_acc"]
    domains = [
        {
            "index": k,
            "spec": spec,
            "description": describe_domain(spec),
            "size": int(data["domain_y"].shape[2]),
            "label_accuracy": float(np.median(label_acc[:, k])),
        }
        for k, spec in enumerate(config.domains)
    ]
    result = {
        "study": "bilevel_mixture",
        "config": config,
        "environment": reporting.environment(),
        "summary": {
            "methods": methods,
            "domains": domains,
            "target": "clean digits: validation split (360) upper level, test split (360) reported",
            "num_params": models.num_params(
                models.mlp_init(jax.random.key(0), (64, *config.hidden, NUM_CLASSES))
            ),
        },
        "timing_s": timing,
        "mesh": parallel.describe(mesh),
        "raw": raw,
    }
    checkpointer.finish()
    return reporting.to_jsonable(result)


# ---------------------------------------------------------------------------
# Table and plot


def table(result: dict) -> str:
    """One row per method: target accuracy, losses and the learned mixture."""
    summary = result["summary"]
    domains = summary["domains"]
    headers = ["method", "inner_lr", "target_acc", "target_loss", "val_loss"]
    headers += [f"w{d['index']}" for d in domains] + ["order", "diverged"]
    rows = []
    num_seeds = result["config"]["num_seeds"]
    for name, m in summary["methods"].items():
        weights = m["mixture"] or [None] * len(domains)
        rows.append(
            [name, m["settings"]["inner_lr"], m["target_acc"], m["target_loss"], m["val_loss"]]
            + [None if w is None else f"{w:.3f}" for w in weights]
            + [">".join(map(str, m["ranking"])) if m["ranking"] else None]
            + [f"{m['diverged']}/{num_seeds}"]
        )
    legend = [f"  w{d['index']}: {d['spec']} ({d['description']})" for d in domains]
    lines = [
        f"median over {num_seeds} seeds; w_k = final mixture softmax(x) (per-domain median over"
        " finite seeds, renormalised); target = clean digits test split",
        reporting.format_table(headers, rows),
        "domains:",
        *legend,
    ]
    return "\n".join(lines)


def plot(result: dict, path) -> Any:
    """Learned mixtures (stacked bars), seed-0 mixture trajectories, target accuracy."""
    reporting.plot_style()
    import matplotlib.pyplot as plt

    config = result["config"]
    summary = result["summary"]
    methods = list(summary["methods"])
    domains = summary["domains"]
    colors = plt.get_cmap("tab10").colors
    solvers = [m for m in methods if m not in BASELINES]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.1, 1.4, 1.0]})

    ax = axes[0]
    bottom = np.zeros(len(methods))
    for k, domain in enumerate(domains):
        heights = np.array(
            [(summary["methods"][m]["mixture"] or [0.0] * len(domains))[k] for m in methods]
        )
        ax.bar(
            range(len(methods)),
            heights,
            bottom=bottom,
            color=colors[k % 10],
            label=f"{k}: {domain['spec']}",
        )
        bottom += heights
    for i, m in enumerate(methods):
        if summary["methods"][m]["mixture"] is None:
            ax.text(i, 0.5, "all seeds\ndiverged", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixture weight")
    ax.set_title(f"learned mixture (median of {config['num_seeds']} seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)

    ax = axes[1]
    styles = ["-", "--", ":", "-."]
    steps = np.arange(config["num_steps"] // config["record_every"] + 1) * config["record_every"]
    start = np.full((1, len(domains)), 1.0 / len(domains))  # x = 0 at step 0
    for i, name in enumerate(solvers):
        seed0 = np.asarray(result["raw"][name]["mixture_curve"], dtype=float)[0]
        curve = np.concatenate([start, seed0])
        for k in range(len(domains)):
            ax.plot(
                steps,
                curve[:, k],
                color=colors[k % 10],
                ls=styles[i % len(styles)],
                lw=1.1,
                label=name if k == 0 else None,
            )
    ax.axhline(1.0 / len(domains), color="k", lw=0.6, ls=":")
    ax.set_xlabel("step")
    ax.set_yscale("log")  # the noisy weights fall by orders of magnitude
    ax.set_ylabel("mixture weight (colour = domain, log scale)")
    ax.set_title("seed 0: mixture over steps (line style = solver)")
    ax.legend(loc="best", fontsize=7)

    ax = axes[2]
    accs = [[a for a in result["raw"][m]["seeds"]["test_acc"] if a is not None] for m in methods]
    ax.boxplot(accs, showfliers=False)
    rng = np.random.default_rng(0)
    for i, values in enumerate(accs, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=10, zorder=3)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right")
    ax.set_ylabel("target test accuracy")
    ax.set_title("clean target: test accuracy per seed")
    fig.suptitle("data-mixture learning on corrupted digits domains")
    return reporting.save_figure(fig, path)
