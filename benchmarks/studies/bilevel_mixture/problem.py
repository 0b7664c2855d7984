"""The problem of ``bilevel_mixture``: corrupted digits domains, the mixture-weighted
lower loss and the clean target, and the per-seed setup (see the package docstring)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.harness import parallel
from benchmarks.problems import cleaning, data, models
from optstab import bilevel

NUM_CLASSES = 10

BASELINES = ("uniform", "oracle_clean")

DOMAIN_KINDS = ("clean", "label_noise", "shuffled", "feature_noise")


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
            y, _ = data.corrupt_labels(y, amount, NUM_CLASSES, int(rng.integers(2**31)))
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
    x_train, y_train, x_val, y_val, x_test, y_test = data.digits_splits()
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


def mixture_loss(weights: jax.Array, y: models.Params, batch: tuple, l2: float) -> jax.Array:
    """``sum_k weights_k * mean CE of y on domain k's minibatch + l2/2 ||y||^2``.

    ``batch = (inputs (K, b, d), labels (K, b))``. The K minibatches go through the MLP
    as one ``(K * b, d)`` batch, so every layer stays a plain ``a @ W`` (which BROS's
    factored evaluation keeps in its subspace).
    """
    inputs, labels = batch
    num_domains, size = labels.shape
    flat = cleaning.per_sample_loss(y, inputs.reshape(num_domains * size, -1), labels.reshape(-1))
    per_domain = flat.reshape(num_domains, size).mean(axis=1)
    return jnp.dot(weights, per_domain) + 0.5 * l2 * cleaning.squared_norm(y)


def target_loss(y: models.Params, batch: tuple) -> jax.Array:
    inputs, labels = batch
    return jnp.mean(cleaning.per_sample_loss(y, inputs, labels))


def mixture_problem(init_params: models.Params, l2: float) -> bilevel.BilevelProblem:
    """The bilevel problem of the module docstring (``x``: K mixture logits)."""
    return bilevel.BilevelProblem(
        inner_loss=lambda x, y, batch: mixture_loss(jax.nn.softmax(x), y, batch, l2),
        outer_loss=lambda x, y, batch: target_loss(y, batch),
        inner_init=init_params,
    )


def fixed_weights(name: str, num_domains: int) -> np.ndarray:
    """The mixture a baseline trains with: uniform, or all on domain 0 (the clean one)."""
    if name == "uniform":
        return np.full((num_domains,), 1.0 / num_domains, np.float32)
    return np.eye(num_domains, dtype=np.float32)[0]


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
    :func:`benchmarks.harness.parallel.place_params`; unchanged without a mesh."""
    if mesh is None:
        return data
    rest = {key: value for key, value in data.items() if key != "setup"}
    setup = parallel.place_setup(data["setup"], mesh, fsdp)
    return {**parallel.replicate(rest, mesh), "setup": setup}
