"""The steps ``overhead`` compiles and times, the methods it builds, and the statistics
of paired timings.

* :func:`optimizer_step`: ``(params, opt_state, grads) -> (params, opt_state)``, the
  update and ``apply_updates`` alone (gradients given).
* :func:`train_step`: ``(params, opt_state, x, y) -> (params, opt_state)``, with the
  forward and backward pass of the MLP.
* :func:`compile_and_time`: every method's step compiled once (``params`` and
  ``opt_state`` donated, memory from XLA), then timed round-robin.
* Methods: the registry's names, plus two of this study (:data:`LOCAL`):
  ``gnmr_wrap_generic`` (``gnmr_wrap(adamw)`` with its generic freeze forced) and
  ``gnmr_chain_injected`` (``chain(gnmr, adamw)`` under ``optax.inject_hyperparams``, so
  that ``max_recover`` is traced and the budget sorts every unit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from unittest import mock

import jax
import ml_collections
import numpy as np
import optax

import optstab
from benchmarks.harness import measure, parallel
from benchmarks.problems import methods, models
from optstab.stability import _inner_state

# Methods of this study only (see the module docstring); every other name is the registry's.
LOCAL = ("gnmr_wrap_generic", "gnmr_chain_injected")
# Peers that read the global gradient norm before any leaf's update can start.
GLOBAL_NORM_PEERS = ("clip_by_global_norm", "zclip", "skip_step")


class _GenericFreeze:
    """Refuses the fused freeze while an update traces, so ``gnmr_wrap`` takes its
    generic path (as the library's own test of that path does); counts the refusals."""

    def __init__(self):
        self.refused = 0

    def __call__(self, *args, **kwargs):
        del args, kwargs
        self.refused += 1
        return None


def generic_freeze(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` (a ``gnmr_wrap``) whose update always traces the generic freeze path."""
    refuse = _GenericFreeze()

    def update(updates, state, params=None, **extra):
        with mock.patch.object(_inner_state, "plan_fused_freeze", refuse):
            out = tx.update(updates, state, params, **extra)
        if not refuse.refused:
            raise RuntimeError("gnmr_wrap no longer asks plan_fused_freeze: update this study")
        return out

    return optax.GradientTransformationExtraArgs(tx.init, update)


def build(name: str, config: ml_collections.ConfigDict, units: Any = None):
    """The optimizer of method ``name``: a registry name or one of :data:`LOCAL`."""
    if name == "gnmr_wrap_generic":
        return generic_freeze(methods.optimizer("gnmr_wrap", config, units=units).transform)
    if name == "gnmr_chain_injected":
        settings = dict(config.get("gnmr") or {})
        gnmr = optax.inject_hyperparams(optstab.gnmr, static_args=("units",))
        return optax.chain(gnmr(units=units, **settings), methods.adamw(config))
    return methods.optimizer(name, config, units=units).transform


def check_names(names: Sequence[str]) -> None:
    """A ``ValueError`` for a name that is neither the registry's nor :data:`LOCAL`."""
    methods.check_names(names, [*methods.RECIPES, *LOCAL])


def uses_gnmr(name: str) -> bool:
    return name in LOCAL or methods.uses_gnmr(name)


# ---------------------------------------------------------------------------
# Steps


def optimizer_step(tx: optax.GradientTransformation) -> Callable:
    """``(params, opt_state, grads) -> (params, opt_state)``: one update, applied."""

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def train_step(tx: optax.GradientTransformation) -> Callable:
    """``(params, opt_state, x, y) -> (params, opt_state)``: forward, backward, update."""

    def step(params, opt_state, x, y):
        grads = jax.grad(models.cross_entropy)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


_mlp_init = jax.jit(models.mlp_init, static_argnums=1)


def mlp_params(sizes: Sequence[int], seed: int, mesh=None, fsdp: bool = False) -> Any:
    """Fresh MLP parameters of layer widths ``sizes`` (a new buffer each call)."""
    params = _mlp_init(jax.random.key(seed), tuple(sizes))
    return parallel.place_params(params, mesh, fsdp)


def random_like(tree: Any, seed: int, scale: float, mesh=None, fsdp: bool = False) -> Any:
    """Standard-normal arrays shaped like ``tree``, times ``scale`` (given gradients)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    draw = jax.jit(lambda k, x: scale * jax.random.normal(k, x.shape, x.dtype))
    out = treedef.unflatten([draw(k, x) for k, x in zip(keys, leaves, strict=True)])
    return parallel.place_params(out, mesh, fsdp)


def init_state(tx: optax.GradientTransformation, params: Any, mesh, fsdp: bool) -> Any:
    """``tx.init(params)``, placed by the parameters' rule on a mesh (moments shaped like
    the parameters are split like them under ``fsdp``; XLA would replicate them)."""
    state = jax.jit(tx.init)(params)
    return parallel.place_params(state, mesh, fsdp)


def state_bytes(tree: Any) -> int:
    """Bytes of the arrays of an optimizer state."""
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree)))


def compile_and_time(
    steps: Mapping[str, Callable],
    carry: Callable[[str], tuple[Any, Any]],
    extra: tuple,
    repeats: int,
    warmup: int,
    mesh,
    desc: str,
    cache: dict[str, measure.CompiledStep] | None = None,
) -> dict:
    """Compiles ``steps[name](*carry(name), *extra)`` for every name (names already in
    ``cache`` are taken from it; what is compiled is added to it), then times them
    round-robin.

    ``carry(name)`` builds a fresh ``(params, opt_state)``, which the step donates.
    Returns ``name -> {"memory": memory_bytes, "state_bytes", "compile_s", "times_s"}``
    (``times_s[r]`` is round ``r``, so two methods' timings pair up by round).
    """
    compiled = {} if cache is None else cache
    carries, out = {}, {}
    for name, step in steps.items():
        carries[name] = carry(name)
        if name not in compiled:
            compiled[name] = measure.compile_step(step, *carries[name], *extra, mesh=mesh)
        out[name] = {
            "memory": compiled[name].memory,
            "state_bytes": state_bytes(carries[name][1]),
            "compile_s": compiled[name].compile_s,
        }

    def runner(name):
        fn = compiled[name].fn
        return lambda state: fn(*state, *extra)

    times, _ = measure.interleaved_times(
        {name: runner(name) for name in steps}, carries, repeats, warmup, desc
    )
    for name in steps:
        out[name]["times_s"] = np.asarray(times[name])
    return out


# ---------------------------------------------------------------------------
# Statistics


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: order statistics
    ``(x_(j), x_(n+1-j))`` with the largest ``j >= 1`` such that
    ``2 P(Binomial(n, 1/2) <= j - 1) <= 1 - confidence`` (with fewer than 6 values at
    95%, no ``j`` qualifies and the interval is the range, of coverage ``1 - 2^(1-n)``)."""
    x = np.sort(np.asarray(values, np.float64))
    n = len(x)
    cdf = lambda k: sum(math.comb(n, i) for i in range(k + 1)) / 2**n  # P(B <= k)
    j = 1
    while j + 1 <= n // 2 and 1 - 2 * cdf(j) >= confidence:  # the coverage of j + 1
        j += 1
    return float(x[j - 1]), float(x[n - j])


def paired_ratio(times: Mapping[str, Any], name: str, other: str) -> dict:
    """Round-by-round ratios ``times[name][r] / times[other][r]`` (both ran in round
    ``r``, so slow spells of the machine hit both): their median and its 95% interval."""
    ratios = np.asarray(times[name], np.float64) / np.asarray(times[other], np.float64)
    low, high = median_interval(ratios)
    return {"median": float(np.median(ratios)), "low": low, "high": high}
