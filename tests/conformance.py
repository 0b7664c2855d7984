"""Registry of optimizer cases and toy problems for the shared conformance suite.

Every optimizer transform of optstab is registered here as a :class:`Case`;
``tests/test_conformance.py`` runs every test over every case and
``tests/_sharded_worker.py`` reuses the same cases and problems on 8 simulated CPU
devices. The plain ``adam`` case is the reference: if it fails, the suite itself
is wrong.

Problems (small on purpose: on CPU the compile time dominates):

* ``quadratic``: a diagonal, ill-conditioned quadratic (curvatures 1 .. 100) over
  a 2-leaf dict ``{"a": (3,), "w": (8, 4)}``; ``w``'s leading dim is divisible by
  8 so that it can be sharded over 8 devices.
* ``rosenbrock``: the 2-D Rosenbrock function over two scalar leaves ``x``, ``y``.
* ``quadratic_rotated``: ``quadratic`` on complex64 parameters, every coordinate (start
  and target) multiplied by its own phase ``exp(i * theta)``, theta in (0, pi). An
  optimizer that treats a complex number by its modulus and phase (norms of ``|z|``,
  second moments of ``|g|**2``, as ``optax.adam`` does) follows the rotated trajectory
  of the real run exactly; one that drops or separately treats the imaginary part does
  not.

Runs can inject a gradient spike (``x1000`` on leaf ``w`` at one step) so that the
recovery branches of the stability transforms run in the vmap, checkpoint and
sharding tests. (No gradient noise: threefry sampling adds seconds of CPU compile
time per run.)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer under test.

    Attributes:
      name: test id.
      make: ``lr -> optax.GradientTransformation``, the full optimizer.
      make_injected: the same optimizer with the optstab transform (and the inner
        optimizer) wrapped by ``optax.inject_hyperparams``, so numeric
        hyperparameters are traced arrays in the state; it must produce the same
        numbers as ``make`` and hold a ``learning_rate`` hyperparameter.
      lr: learning rate used by the tests.
      steps: steps for the quadratic convergence test.
      rosenbrock_steps: steps for the Rosenbrock convergence test.
      requires: ``(module, attribute)`` the case needs; the case is skipped with a
        reason while that does not exist yet.
      complex_make: for a case that draws random numbers, a deterministic variant
        (``lr -> transformation``) used by the complex-parameter test: a random
        perturbation is rotation-equivariant only in distribution, not draw by draw.
      complex_params: ``"supported"`` (a complex run is the real run rotated),
        ``"rejected"`` (a clear ``TypeError``/``ValueError`` naming complex parameters
        at trace time) or ``None`` when either is acceptable (the owning module has not
        chosen yet).
    """

    name: str
    make: Callable[[float], optax.GradientTransformation]
    make_injected: Callable[[float], optax.GradientTransformation]
    lr: float = 0.05
    steps: int = 150
    rosenbrock_steps: int = 1000
    requires: tuple[str, str] | None = None
    complex_params: str | None = None
    complex_make: Callable[[float], optax.GradientTransformation] | None = None

    def missing(self) -> str | None:
        """Why the case cannot run (its module is not written yet), else None."""
        if self.requires is None:
            return None
        module, attr = self.requires
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            return f"{module} is not importable: {err}"
        if not hasattr(mod, attr):
            return f"{module}.{attr} does not exist yet"
        return None


def _optstab():
    return importlib.import_module("optstab")


def _baselines():
    return importlib.import_module("optstab.stability.baselines")


def _inject(factory, *, static_args=()):
    return optax.inject_hyperparams(factory, static_args=static_args)


def _injected_adam(lr: float) -> optax.GradientTransformation:
    return _inject(optax.adam)(learning_rate=lr)


# Suite settings: short warm-ups (and a short skip_step window) so that the recovery
# branches run within the few steps the vmap, checkpoint and sharding tests take;
# their spike comes after the warm-up. GNMR keeps its default lock (10): with a lock
# of 3 and 5 warm-up steps, Rosenbrock's naturally swinging gradient norms re-enter
# recovery ~90 times in 1000 steps and the skip variant ends at ~0.13, not below
# 0.05. AdaGC keeps its default warm-up
# (100 steps): with 5, its relative clip (which lets a tensor's norm bound grow by at
# most ~0.1% per step) holds Rosenbrock at ~0.2 after 1000 steps; its warm-up clip
# runs in every test anyway.
GNMR_KW = {"warmup_steps": 5}
SPAM_KW = {"clip_delay_steps": 5}
ZCLIP_KW = {"warmup_steps": 5}
ADAGC_KW: dict[str, Any] = {}
SKIP_STEP_KW = {"window": 16, "min_history": 8}
_GNMR_STATIC = ("action", "units", "mean_mode", "short_window")
_GNMR_WRAP_STATIC = ("inner",) + _GNMR_STATIC


def _gnmr_chain(action: tuple[str, ...]):
    def make(lr):
        return optax.chain(_optstab().gnmr(action=action, **GNMR_KW), optax.adam(lr))

    def make_injected(lr):
        gnmr = _inject(_optstab().gnmr, static_args=_GNMR_STATIC)
        return optax.chain(gnmr(action=action, **GNMR_KW), _injected_adam(lr))

    return make, make_injected


def _gnmr_wrap(action: tuple[str, ...]):
    def make(lr):
        return _optstab().gnmr_wrap(optax.adam(lr), action=action, **GNMR_KW)

    def make_injected(lr):
        wrap = _inject(_optstab().gnmr_wrap, static_args=_GNMR_WRAP_STATIC)
        return wrap(_injected_adam(lr), action=action, **GNMR_KW)

    return make, make_injected


def _spam():
    def make(lr):
        return _baselines().spam(lr, **SPAM_KW)

    def make_injected(lr):
        return _inject(_baselines().spam)(lr, **SPAM_KW)

    return make, make_injected


def _chained_baseline(name: str, kw: dict[str, Any]):
    def make(lr):
        return optax.chain(getattr(_baselines(), name)(**kw), optax.adam(lr))

    def make_injected(lr):
        return optax.chain(_inject(getattr(_baselines(), name))(**kw), _injected_adam(lr))

    return make, make_injected


def _skip_step():
    def make(lr):
        return _baselines().skip_step(optax.adam(lr), **SKIP_STEP_KW)

    def make_injected(lr):
        skip_step = _inject(_baselines().skip_step, static_args=("inner", "window"))
        return skip_step(_injected_adam(lr), **SKIP_STEP_KW)

    return make, make_injected


def _perturbed_updates():
    # A decaying relative perturbation of the gradient (the lab's gradient-level stress);
    # its key lives in the state, so the suite's key handling is exercised too.
    def make(lr):
        tx = _optstab().perturb.perturbed_updates(_optstab().perturb.inverse_sqrt(0.1), key=0)
        return optax.chain(tx, optax.adam(lr))

    def make_injected(lr):
        factory = _inject(_optstab().perturb.perturbed_updates, static_args=("mode",))
        scale = _optstab().perturb.inverse_sqrt(0.1)  # a schedule of inject's own count
        return optax.chain(factory(scale, key=0), _injected_adam(lr))

    return make, make_injected


def _perturbed_updates_bias(lr):
    # The deterministic mode (delta = -scale * g) of the same transform, for the complex
    # test: it touches both parts of every element the way the random modes do.
    return optax.chain(_optstab().perturb.perturbed_updates(0.1, mode="bias"), optax.adam(lr))


def _case(name: str, makers, requires=None, **kw) -> Case:
    make, make_injected = makers
    return Case(name, make, make_injected, requires=requires, **kw)


_OK = {"complex_params": "supported"}
_GNMR = ("optstab", "gnmr")
_GNMR_WRAP = ("optstab", "gnmr_wrap")
_BASE = "optstab.stability.baselines"

# The registry. Every test of test_conformance.py runs once per case.
CASES: tuple[Case, ...] = (
    # Reference: plain optax, so that failures of the suite itself are visible.
    _case("adam", (lambda lr: optax.adam(lr), _injected_adam), **_OK),
    _case("gnmr_clip", _gnmr_chain(("precision", "clip")), _GNMR, **_OK),
    _case("gnmr_wrap_skip", _gnmr_wrap(("skip",)), _GNMR_WRAP, **_OK),
    _case("gnmr_wrap_reset", _gnmr_wrap(("clip", "reset")), _GNMR_WRAP, **_OK),
    _case("spam", _spam(), (_BASE, "spam"), **_OK),
    _case("zclip", _chained_baseline("zclip", ZCLIP_KW), (_BASE, "zclip"), **_OK),
    _case("adagc", _chained_baseline("adagc", ADAGC_KW), (_BASE, "adagc"), **_OK),
    _case("skip_step", _skip_step(), (_BASE, "skip_step"), **_OK),
    _case(
        "perturbed_updates",
        _perturbed_updates(),
        ("optstab.perturb", "perturbed_updates"),
        complex_make=_perturbed_updates_bias,
        **_OK,
    ),
)
CASES_BY_NAME = {case.name: case for case in CASES}

_TX_CACHE: dict[tuple[str, str, float, int], optax.GradientTransformation] = {}


def get_tx(case: Case, lr: float | None = None, *, injected: bool = False, every_k: int = 1):
    """The case's optimizer, built once per process so jitted runs hit the jit cache.

    ``every_k > 1`` wraps it in ``optax.MultiSteps(tx, every_k_schedule=every_k)``.
    """
    lr = case.lr if lr is None else lr
    key = (case.name, "injected" if injected else "plain", lr, every_k)
    if key not in _TX_CACHE:
        tx = (case.make_injected if injected else case.make)(lr)
        if every_k > 1:
            tx = optax.MultiSteps(tx, every_k_schedule=every_k).gradient_transformation()
        _TX_CACHE[key] = tx
    return _TX_CACHE[key]


# ------------------------------------------------------------------------ problems

# Curvatures (condition number 100) and targets, as numpy constants.
_H_A = np.array([1.0, 10.0, 100.0], np.float32)
_H_W = np.logspace(0.0, 2.0, 32, dtype=np.float32).reshape(8, 4)
_T_A = np.array([1.0, -2.0, 0.5], np.float32)
_T_W = np.linspace(-1.0, 1.0, 32, dtype=np.float32).reshape(8, 4)


def quadratic_loss(params: PyTree) -> jax.Array:
    """Diagonal quadratic with curvatures from 1 to 100; minimum 0 at the targets."""
    a = params["a"].astype(jnp.float32)
    w = params["w"].astype(jnp.float32)
    return 0.5 * (jnp.sum(_H_A * (a - _T_A) ** 2) + jnp.sum(_H_W * (w - _T_W) ** 2))


def quadratic_init(seed: int, dtype=jnp.float32) -> PyTree:
    """Targets plus unit Gaussian noise (numpy, per seed); the initial loss is a few 100."""
    rng = np.random.default_rng(seed)
    return {
        "a": jnp.asarray(_T_A + rng.standard_normal(3, np.float32), dtype),
        "w": jnp.asarray(_T_W + rng.standard_normal((8, 4), np.float32), dtype),
    }


def rosenbrock_loss(params: PyTree) -> jax.Array:
    """``(1 - x)^2 + 100 (y - x^2)^2``, minimum 0 at ``(1, 1)``."""
    x = params["x"].astype(jnp.float32)
    y = params["y"].astype(jnp.float32)
    return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


def rosenbrock_init(seed: int, dtype=jnp.float32) -> PyTree:
    """The classic start ``(-1.2, 1)`` (the seed is unused; kept for a uniform API)."""
    del seed
    return {"x": jnp.asarray(-1.2, dtype), "y": jnp.asarray(1.0, dtype)}


# One phase per coordinate, spread over (0, pi): the real parts shrink by different
# factors (cos 1.57 ~ 0, cos 3 ~ -1), so a norm of the real part alone is not
# proportional to the norm of |z| and a method using it leaves the rotated trajectory.
ROTATIONS = {
    "a": np.exp(1j * np.linspace(0.2, 3.0, 3)).astype(np.complex64),
    "w": np.exp(1j * np.linspace(0.2, 3.0, 32)).reshape(8, 4).astype(np.complex64),
}


def quadratic_rotated_loss(params: PyTree) -> jax.Array:
    """:func:`quadratic_loss` of ``params / ROTATIONS``: the same quadratic in ``|z|``."""
    a = params["a"].astype(jnp.complex64)
    w = params["w"].astype(jnp.complex64)
    da, dw = a - ROTATIONS["a"] * _T_A, w - ROTATIONS["w"] * _T_W
    abs_sq = lambda z: jnp.real(z * jnp.conj(z))  # noqa: E731  (|z|**2, smooth at 0)
    return 0.5 * (jnp.sum(_H_A * abs_sq(da)) + jnp.sum(_H_W * abs_sq(dw)))


def quadratic_rotated_init(seed: int, dtype=jnp.float32) -> PyTree:
    """:func:`quadratic_init` times ``ROTATIONS``, in the complex dtype of ``dtype``."""
    complex_dtype = jnp.result_type(dtype, jnp.complex64)
    real = quadratic_init(seed, jnp.float32)
    return {
        name: jnp.asarray(ROTATIONS[name] * np.asarray(x), complex_dtype)
        for name, x in real.items()
    }


SPIKE_FACTOR = 1000.0

PROBLEMS: dict[str, tuple[Callable, Callable]] = {
    "quadratic": (quadratic_loss, quadratic_init),
    "rosenbrock": (rosenbrock_loss, rosenbrock_init),
    "quadratic_rotated": (quadratic_rotated_loss, quadratic_rotated_init),
}


def init_params(problem: str, seed: int, dtype=jnp.float32) -> PyTree:
    """Initial parameters of ``problem`` (jax arrays, uncommitted) for a seed."""
    return PROBLEMS[problem][1](seed, dtype)


def _grads(problem: str, params: PyTree, step: jax.Array, spike_at: int):
    loss, grads = jax.value_and_grad(PROBLEMS[problem][0])(params)
    # JAX's gradient of a real loss in a complex parameter is the conjugate of the descent
    # direction (https://gist.github.com/wdphy16/118aef6fb5f82c49790d7678cf87da29);
    # conj is the identity on real arrays.
    grads = jax.tree.map(jnp.conj, grads)
    if spike_at >= 0 and "w" in grads:
        factor = jnp.where(step == spike_at, SPIKE_FACTOR, 1.0)
        grads = {**grads, "w": grads["w"] * factor.astype(grads["w"].dtype)}
    return loss, grads


def global_norm(tree: PyTree) -> jax.Array:
    """L2 norm of all leaves together (of ``|z|`` for complex leaves), in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.abs(x).astype(jnp.float32))) for x in leaves))


def run_fn(
    tx: optax.GradientTransformation,
    problem: str,
    params: PyTree,
    opt_state: PyTree,
    start: jax.Array | int,
    *,
    steps: int,
    spike_at: int = -1,
):
    """``steps`` optimizer steps from step number ``start``, in a ``lax.scan``.

    Not jitted (see :data:`run`), so that it can be vmapped or composed.

    Returns:
      ``(params, opt_state, aux)`` with ``aux["loss"]`` the loss before each step and
      ``aux["update_norm"]`` the global norm of each update, both ``(steps,)``.
    """

    def body(carry, _):
        params, opt_state, step = carry
        loss, grads = _grads(problem, params, step, spike_at)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        aux = {"loss": loss, "update_norm": global_norm(updates)}
        return (params, opt_state, step + 1), aux

    start = jnp.asarray(start, jnp.int32)
    (params, opt_state, _), aux = jax.lax.scan(body, (params, opt_state, start), None, length=steps)
    return params, opt_state, aux


_STATIC = ("tx", "problem", "steps", "spike_at")
# Jitted with the optimizer static: a case's optimizer is built once per process
# (get_tx), so repeated runs of one case hit the jit cache.
run = jax.jit(run_fn, static_argnames=_STATIC)


def train_fn(tx, problem, params, *, steps, spike_at=-1):
    """``tx.init`` followed by :func:`run_fn` from step 0 (not jitted, vmappable)."""
    return run_fn(tx, problem, params, tx.init(params), 0, steps=steps, spike_at=spike_at)


train = jax.jit(train_fn, static_argnames=_STATIC)


@functools.cache
def vmapped_train(tx, problem: str, steps: int, spike_at: int = -1):
    """Jitted :func:`train_fn` vmapped over the leading axis of ``params``."""
    fn = functools.partial(train_fn, tx, problem, steps=steps, spike_at=spike_at)
    return jax.jit(jax.vmap(fn))


# ------------------------------------------------------------------ state helpers


def set_learning_rate(opt_state: PyTree, lr: float) -> tuple[PyTree, int]:
    """Replaces every injected ``learning_rate`` in ``opt_state``; returns the count."""
    found = 0

    def is_inject(x):
        return isinstance(x, optax.InjectStatefulHyperparamsState)

    def visit(node):
        nonlocal found
        if not is_inject(node):
            return node
        hyper = dict(node.hyperparams)
        if "learning_rate" in hyper:
            found += 1
            hyper["learning_rate"] = jnp.asarray(lr, jnp.asarray(hyper["learning_rate"]).dtype)
        inner = jax.tree.map(visit, node.inner_state, is_leaf=is_inject)
        return node._replace(hyperparams=hyper, inner_state=inner)

    new_state = jax.tree.map(visit, opt_state, is_leaf=is_inject)
    return new_state, found


def tree_dtypes(tree: PyTree) -> PyTree:
    """``(dtype, shape, weak_type)`` of every leaf (arrays or ``ShapeDtypeStruct``)."""

    def describe(x):
        x = x if hasattr(x, "dtype") and hasattr(x, "shape") else jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed PRNG keys (no numpy dtype)
            return (str(x.dtype), tuple(x.shape), False)
        return (np.dtype(x.dtype), tuple(x.shape), bool(getattr(x, "weak_type", False)))

    return jax.tree.map(describe, tree)


def as_numpy(x):
    """The array's bits as numpy; typed PRNG keys as their raw key data."""
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def assert_trees_equal(a: PyTree, b: PyTree) -> None:
    """Exact equality of two pytrees, leaf by leaf; typed PRNG keys compared by key data."""
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(as_numpy(x), as_numpy(y)), a, b)


def assert_row_close(batched: PyTree, single: PyTree, row: int, rtol: float, atol: float) -> None:
    """Row ``row`` of every leaf of a vmapped result is close to a separate run's leaf."""
    jax.tree.map(
        lambda b, s: np.testing.assert_allclose(
            as_numpy(b)[row], as_numpy(s), rtol=rtol, atol=atol
        ),
        batched,
        single,
    )


def all_finite(tree: PyTree) -> bool:
    """Whether every float or complex element of ``tree`` is finite."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) and jnp.size(x)
    ]
    return all(bool(jnp.all(jnp.isfinite(jnp.asarray(x)))) for x in leaves)


# --------------------------------------------------------------------- 8 devices


def run_on_eight_devices(
    worker: str | Path, out: str | Path, timeout: int, args: tuple[str, ...] = ()
) -> dict:
    """Runs ``python WORKER OUT *ARGS`` on 8 simulated CPU devices and loads the ``.npz``
    (or ``.json``) file it writes.

    The subprocess runs from the repository root with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``. A failed
    run (non-zero exit or no file) fails the calling test with the worker's stderr.
    """
    import pytest  # only the tests use this helper

    worker = Path(worker)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, str(worker), str(out), *args],
        env=env,
        cwd=str(Path(__file__).resolve().parents[1]),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0 or not Path(out).exists():
        pytest.fail(f"the 8-device worker failed:\n{done.stderr[-8000:]}", pytrace=False)
    if Path(out).suffix == ".json":
        return json.loads(Path(out).read_text())
    with np.load(out, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
