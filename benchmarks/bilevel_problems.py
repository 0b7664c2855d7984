"""Shared pieces of the bilevel studies: corrupted digits and the weighted MLP losses,
and (for ``bilevel_cleaning`` and ``bilevel_memory``) solvers by name and the donated
update step with its compile time, compiled bytes and round-robin step time.

Data: scikit-learn's digits (1797 images of 8x8 pixels, 10 classes; offline). A fixed
stratified split into train / validation / test; features standardised on train.
A fraction of the training labels is replaced by a label drawn uniformly from the
*other* nine classes, so every replaced label is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from benchmarks import measure, models
from optstab import bilevel


class CleaningData(NamedTuple):
    """Digits with corrupted training labels; float32 features, int32 labels."""

    x_train: np.ndarray  # (n_train, 64)
    y_train: np.ndarray  # (n_train,) labels after corruption
    corrupted: np.ndarray  # (n_train,) bool, True where the label was replaced
    x_val: np.ndarray  # (n_val, 64) clean validation split
    y_val: np.ndarray
    x_test: np.ndarray  # (n_test, 64) clean test split
    y_test: np.ndarray


def digits_splits(
    seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_val, y_val, x_test, y_test)``, standardised on train."""
    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    val_share = val_fraction / (1.0 - test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, random_state=seed, stratify=y_rest
    )
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1.0)
    scale = lambda a: ((a - mean) / std).astype(np.float32)
    as_labels = lambda a: a.astype(np.int32)
    return (
        scale(x_train), as_labels(y_train), scale(x_val), as_labels(y_val),
        scale(x_test), as_labels(y_test),
    )  # fmt: skip


def corrupt_labels(
    labels: np.ndarray, fraction: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Replaces ``fraction`` of ``labels`` by a different class; returns (labels, mask)."""
    rng = np.random.default_rng(seed)
    corrupted = np.zeros(labels.shape, bool)
    chosen = rng.choice(labels.size, size=int(round(fraction * labels.size)), replace=False)
    corrupted[chosen] = True
    shift = rng.integers(1, num_classes, size=labels.size)
    noisy = np.where(corrupted, (labels + shift) % num_classes, labels).astype(np.int32)
    return noisy, corrupted


def cleaning_data(seed: int, corruption: float = 0.5) -> CleaningData:
    """The hyper-data-cleaning data set: the split is fixed, the corruption uses ``seed``."""
    x_train, y_train, x_val, y_val, x_test, y_test = digits_splits()
    noisy, corrupted = corrupt_labels(y_train, corruption, 10, seed)
    return CleaningData(x_train, noisy, corrupted, x_val, y_val, x_test, y_test)


def per_sample_loss(params: models.Params, x: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy of the MLP for every sample of the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(models.mlp_apply(params, x), labels)


def squared_norm(params: models.Params) -> jax.Array:
    return sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params))


def cleaning_problem(init_params: models.Params, l2: float) -> bilevel.BilevelProblem:
    """Hyper-data cleaning: ``x`` holds one weight logit per training sample.

    * inner ``g(x, y, (idx, inputs, labels)) = mean_i sigmoid(x_idx_i) * loss_i(y)
      + l2/2 ||y||^2`` on a training batch;
    * outer ``f(x, y, (inputs, labels))`` = mean validation cross-entropy.
    """

    def inner_loss(x, y, batch):
        idx, inputs, labels = batch
        weights = jax.nn.sigmoid(x[idx])
        return jnp.mean(weights * per_sample_loss(y, inputs, labels)) + 0.5 * l2 * squared_norm(y)

    def outer_loss(x, y, batch):
        inputs, labels = batch
        return jnp.mean(per_sample_loss(y, inputs, labels))

    return bilevel.BilevelProblem(inner_loss, outer_loss, init_params)


def detection_f1(weight_logits: np.ndarray, corrupted: np.ndarray) -> float:
    """F1 of "sample is corrupted" predicted as ``sigmoid(logit) < 0.5``."""
    predicted = np.asarray(weight_logits) < 0.0
    true_positive = np.sum(predicted & corrupted)
    precision = true_positive / max(int(predicted.sum()), 1)
    recall = true_positive / max(int(corrupted.sum()), 1)
    return float(2 * precision * recall / max(precision + recall, 1e-12))


# ---------------------------------------------------------------------------
# Solvers by name, the donated update step and its measurement (shared by the
# bilevel_cleaning and bilevel_memory studies)

BILEVEL_NAMES = ("soba", "ma_soba")  # plus "bros_r{rank}" and "bros_r{rank}_naive"


def bros_rank(name: str) -> int | None:
    """The rank in ``"bros_r{rank}"`` or ``"bros_r{rank}_naive"``; ``None`` otherwise."""
    if not name.startswith("bros_r"):
        return None
    digits = name[len("bros_r") :].removesuffix("_naive")
    if not digits.isdigit():
        raise ValueError(f"cannot read a rank from method name {name!r}")
    return int(digits)


def is_bilevel(name: str) -> bool:
    """Whether ``name`` is a bilevel solver (SOBA, MA-SOBA or a BROS variant)."""
    return name in BILEVEL_NAMES or bros_rank(name) is not None


def bros_names(ranks: Sequence[int], naive: bool = False) -> list[str]:
    """``bros_r{rank}`` (or ``bros_r{rank}_naive``) for every rank."""
    return [f"bros_r{rank}" + ("_naive" if naive else "") for rank in ranks]


def solver_by_name(
    name: str,
    problem: bilevel.BilevelProblem,
    inner_lr: Any,
    aux_lr: Any,
    average: Any,
    key: Any = 0,
    radius: Any = None,
    resample_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """The bilevel transform of a method name (step sizes may be traced arrays).

    ``soba``, ``ma_soba``, ``bros_r{rank}`` (factored BROS) or ``bros_r{rank}_naive``
    (``factored=False``). SOBA ignores ``average`` (it is MA-SOBA with ``average=1``).
    """
    rank = bros_rank(name)
    if name == "soba":
        return bilevel.soba(problem, inner_lr, aux_lr, radius=radius, key=key)
    if name == "ma_soba":
        return bilevel.ma_soba(problem, inner_lr, aux_lr, average, radius=radius, key=key)
    if rank is not None:
        return bilevel.bros(
            problem,
            rank,
            inner_lr,
            aux_lr,
            average,
            radius=radius,
            key=key,
            resample_every=resample_every,
            factored=not name.endswith("_naive"),
        )
    raise ValueError(f"unknown bilevel method {name!r}")


def make_solver(
    name: str,
    problem: bilevel.BilevelProblem,
    inner_lr: float,
    aux_lr: float,
    average: float,
    outer_lr: float,
    key: int = 0,
    radius: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``chain(solver_by_name(...), sgd(outer_lr))``."""
    solver = solver_by_name(name, problem, inner_lr, aux_lr, average, key=key, radius=radius)
    return optax.chain(solver, optax.sgd(outer_lr))


def bilevel_step(tx: optax.GradientTransformationExtraArgs) -> Callable:
    """``(x, state, inner_batch, outer_batch) -> (x, state)``: one update of ``x``."""

    def step(x, state, inner_batch, outer_batch):
        # The bilevel transform ignores the incoming updates; x stands in for them.
        updates, state = tx.update(x, state, x, inner_batch=inner_batch, outer_batch=outer_batch)
        return optax.apply_updates(x, updates), state

    return step


class CompiledStep(NamedTuple):
    """A step compiled with its first two arguments donated, and what it cost."""

    fn: Any  # the compiled executable
    compile_s: float
    memory: dict[str, int]  # measure.memory_bytes: argument, output, temp, alias, total


def compile_step(step: Callable, *args: Any, mesh: Any = None) -> CompiledStep:
    """Compiles ``step(*args)`` donating ``args[0]`` and ``args[1]``; memory from XLA.

    The executable takes arguments placed as ``args`` are. With a ``mesh`` its two
    outputs keep the shardings of ``args[0]`` and ``args[1]``, so that one call's
    outputs can be the next call's inputs; the memory is then per device.
    """
    if mesh is not None:
        step = keep_shardings(step, jax.tree.map(lambda leaf: leaf.sharding, args[:2]))
    compiled, seconds = measure.compile_timed(step, *args, donate_argnums=(0, 1))
    return CompiledStep(compiled, seconds, measure.memory_bytes(compiled))


def keep_shardings(step: Callable, shardings: Any) -> Callable:
    """``step`` with its outputs constrained to ``shardings`` (inside ``jit``)."""
    return lambda *inputs: jax.lax.with_sharding_constraint(step(*inputs), shardings)


def fresh_copy(tree: Any) -> Any:
    """New buffers with the values of ``tree`` (a donated call deletes its inputs)."""
    return jax.tree.map(jnp.copy, tree)


def time_compiled_steps(
    compiled: Mapping[str, CompiledStep],
    carries: Mapping[str, tuple[Any, Any]],
    batches: Mapping[str, tuple[Any, ...]],
    repeats: int,
    warmup: int,
    desc: str = "step time",
) -> dict[str, list[float]]:
    """Per-call seconds of every compiled step, measured round-robin.

    ``carries[name]`` is the donated ``(first, second)`` pair (copied here, so the
    caller's arrays survive); ``batches[name]`` the remaining, fixed arguments.
    """

    def runner(name):
        fn, extra = compiled[name].fn, batches[name]
        return lambda carry: fn(*carry, *extra)

    times, _ = measure.interleaved_times(
        {name: runner(name) for name in compiled},
        {name: fresh_copy(carries[name]) for name in compiled},
        repeats=repeats,
        warmup=warmup,
        desc=desc,
    )
    return times
