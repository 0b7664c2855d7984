"""Perturbed forward-backward SGD: the paper's qualitative claims as measured statements.

Paper: Kong, Zhang and Yuan, "Perturbed forward-backward SGD" (arXiv 2602.20646); its
text is not available, so the statements below are our reading of its abstract and of
the bounds reconstructed in ``optstab.perturb``. Each statement is measured on logistic
regression over scikit-learn's breast-cancer data (569 tumours, 30 standardised
features; a fixed stratified 75/25 split, training part only), written as a chain of N
operators, and is reported with the value measured, the value expected and pass/fail.

Problems.
* ``deep_linear``: N - 1 square bias-free factors ``z @ W_i`` initialised as gain x a
  random orthogonal matrix (so every L_i = gain > 1), then a logistic head.
* ``tanh``: N - 1 dense + tanh operators, then a logistic head.
* ``convex``: the chain with N = 1 (a logistic head) and L2 regularisation: strongly
  convex with mu >= 2 lambda.
Regularisers: convex ``lambda ||w||^2`` (deep_linear and convex problems) and
non-convex ``lambda sum w^2 / (1 + w^2)`` (tanh problem in statement 7).

Statements (sizes, steps and pass criteria are in ``configs/perturbed_sgd.py``).
0. At size 0 the perturbation points are exact identities (same bits) and cost nothing
   measurable: median step time of the tanh chain with every point at a traced size 0
   over the same step without points (and, for scale, at a small size).
1. Backward noise at operator k leaves blocks j > k exactly unchanged and changes block
   j <= k by at most M_j prod_{i=j+1..k} L_i ||xi|| (exact Jacobian norms at the probe
   point); reported: the largest and median of measured / bound.
2. Forward noise at operator m changes every block, and its effect on the gradient
   grows with the distance to the output when every L_i > 1: the fitted slope of
   log(||dg|| / ||delta||) against N - m is positive (compared with mean log L_i).
3. The gradient error is linear in the perturbation size for small sizes (log-log
   slope of ||dg|| against the relative forward size).
4. Forward vs backward sensitivity per operator under relative normalisation: the
   ratio ||dg_fwd|| / ||dg_bwd|| for the same relative size at each operator's output,
   reported per operator with which direction dominates (on every seed, or "mixed").
   What statements 1 and 2 predict, and what is checked: backward noise at operator 1
   reaches block 1 only while forward noise there reaches every block, so forward
   dominates at the first operator; at the last operator backward noise moves every
   block with the full cotangent while forward noise acts only through the loss's
   curvature (at most 1/4 for the logistic loss), so backward dominates there.
5. Minibatch SGD with lr ~ 1/t on the convex problem: with a forward (bias-mode)
   perturbation of size c / sqrt(t) the excess loss decays with the clean run's log-log
   slope; with a constant size it plateaus at a level growing like size^2.
6. A one-off spike of size S (full-batch GD, absolute backward noise at the logit) is
   recovered in time a + b log S with b = 1 / -log(1 - eta mu), mu the smallest Hessian
   eigenvalue at the optimum (fit, R^2 and fitted / predicted b).
7. A persistent perturbation makes SGD stall or diverge once the relative gradient
   error reaches about 1 (size sweep, tanh chain, non-convex regulariser): (a) a
   systematic error (bias mode at the output cotangent: every block's data gradient is
   scaled by 1 - c); (b) random relative noise at every operator's cotangent.

Every run uses ``optstab.perturb``: the operators, ``Composite``, ``jacobian_norms`` and
``run_sgd`` (paired clean and perturbed runs sharing data order).

Resume: each section (locality, depth, linearity, rates, recovery, threshold, example,
zero_cost) is one checkpointed stage; every one draws its randomness from the config's
seeds alone, so a resumed run repeats the interrupted sections bit for bit (timings
aside).

Mesh: the probe batch of statements 1-4 and the SGD minibatches of statements 5 and 7
(and the example run) are split over the mesh's ``data`` axis. Passes over the whole
training split (full-batch gradient descent in statement 6 and for F*, the recorded
losses, statement 0's timed step) are not split: its 426 examples do not divide evenly
over a power of two. The parameter blocks (at most 30 x 30 entries) are far below
``parallel.FSDP_MIN_SIZE``, so they are replicated with or without ``fsdp``.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from benchmarks import data as data_lib
from benchmarks import measure, parallel, reporting, resume
from optstab import perturb

PROBLEMS = ("deep_linear", "tanh")


# --------------------------------------------------------------------------- problems


class ShardedMinibatches(perturb.Composite):
    """A ``Composite`` whose loss splits minibatches over a mesh's ``data`` axis.

    ``perturb.run_sgd`` draws each step's minibatch inside its scan, so the loss is
    where the study can place it: batches of exactly ``batch_size`` examples are
    sharded; other batches (the whole training split) are left as they are.
    """

    def __init__(self, operators, *, mesh, batch_size, **kwargs):
        super().__init__(operators, **kwargs)
        self.mesh, self.batch_size = mesh, batch_size

    def loss(self, params, x, y, injection=None):
        if x.shape[0] == self.batch_size:
            x, y = parallel.batch_constraint((x, y), self.mesh)
        return super().loss(params, x, y, injection)


def composite(operators, mesh=None, batch_size=None, **kwargs) -> perturb.Composite:
    """``perturb.Composite``, or with a mesh :class:`ShardedMinibatches`."""
    if mesh is None:
        return perturb.Composite(operators, **kwargs)
    return ShardedMinibatches(operators, mesh=mesh, batch_size=batch_size, **kwargs)


def chain(kind: str, config, mesh=None, batch_size=None, **modes) -> perturb.Composite:
    """The N-operator chain ``kind`` (``deep_linear`` or ``tanh``) with L2 regularisation.

    With a ``mesh``, minibatches of ``batch_size`` examples are split over it.
    """
    n = config.num_operators
    if kind == "deep_linear":
        body = [perturb.linear(config.linear_gain) for _ in range(n - 1)]
    else:
        body = [perturb.dense(30, "tanh") for _ in range(n - 1)]
    return composite(
        [*body, perturb.logistic_head()],
        mesh,
        batch_size,
        regularizer="l2",
        reg_strength=config.l2_strength,
        **modes,
    )


def convex(config, mesh=None, batch_size=None, **modes) -> perturb.Composite:
    return composite(
        [perturb.logistic_head()],
        mesh,
        batch_size,
        regularizer="l2",
        reg_strength=config.l2_strength,
        **modes,
    )


def seed_keys(config) -> jax.Array:
    return jax.random.split(jax.random.key(config.seed), config.num_seeds)


def fit_line(x, y) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: returns ``(b, a, R^2)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    b, a = np.polyfit(x, y, 1)
    residual = y - (a + b * x)
    r2 = 1.0 - residual.var() / y.var() if y.var() > 0 else 1.0
    return float(b), float(a), float(r2)


def gradient_change(model, params, x, y, keys, forward=None, backward=None) -> jax.Array:
    """``(N,)`` block gradient errors of one perturbed pass against the exact gradient.

    The exact gradient is the same computation with every size 0 (an exact identity),
    run as the other lane of one ``vmap``, so a block the perturbation cannot reach
    compares equal bit for bit (two separately compiled passes may differ in the last
    bit through different fusion).
    """
    both = jax.tree.map(
        lambda *v: jnp.stack(v),
        model.make_injection(keys),
        model.make_injection(keys, forward, backward),
    )
    exact, perturbed = (
        jax.tree.map(
            lambda g, i=i: g[i], jax.vmap(lambda inj: model.gradient(params, x, y, inj))(both)
        )
        for i in range(2)
    )
    return perturb.block_errors(perturbed, exact)


def changes_per_operator(model, params, x, y, keys, size, direction) -> jax.Array:
    """``(N, N)`` block errors: row k perturbs operator k only (``direction`` forward/backward)."""
    sizes = size * jnp.eye(model.num_operators, dtype=jnp.float32)

    def one(row):
        fwd, bwd = (row, None) if direction == "forward" else (None, row)
        return gradient_change(model, params, x, y, keys, fwd, bwd)

    return jax.vmap(one)(sizes)


def map_seeds(measure, keys, x, y, mesh) -> Any:
    """``measure(seed_key, x, y)`` for every seed key in one jit, the probe batch
    ``(x, y)`` split over the mesh's ``data`` axis."""

    def over_seeds(keys):
        probe = parallel.batch_constraint((x, y), mesh)
        # lax.map, not vmap: a vmapped batch of 10 seeds hung XLA:CPU (all threads idle
        # in futex waits) on jax 0.10.2; seeds one after another compile once as well.
        return jax.lax.map(lambda key: measure(key, *probe), keys)

    return jax.jit(over_seeds)(keys)


def probe_keys(key, config) -> jax.Array:
    """``(probe_keys, N, 2)`` noise keys."""
    n = config.num_operators
    return jax.vmap(lambda k: perturb.operator_keys(k, 0, n))(
        jax.random.split(key, config.probe_keys)
    )


# ----------------------------------------------------------------- statements 1 to 4


def backward_locality(config, x, y, keys, mesh=None) -> list[dict]:
    """Statement 1 for every seed key, both chains: locality and the bound's tightness."""
    n = config.num_operators
    per_kind = {}
    for kind in PROBLEMS:
        model = chain(kind, config, backward_mode="absolute")

        def measure(seed_key, x, y, model=model):
            init_key, noise_key = jax.random.split(jax.random.fold_in(seed_key, 1))
            params = model.init(init_key, x.shape[1])
            norms = perturb.jacobian_norms(model, params, x, "exact")
            noise = perturb.operator_keys(noise_key, 0, n)
            return norms, changes_per_operator(model, params, x, y, noise, 1.0, "backward")

        per_kind[kind] = map_seeds(measure, keys, x, y, mesh)
    out = []
    for seed in range(keys.shape[0]):
        entry = {}
        for kind in PROBLEMS:
            (lipschitz, block), err = jax.tree.map(
                lambda v, seed=seed: np.asarray(v[seed], np.float64), per_kind[kind]
            )
            ratios = [
                err[k, j] / (block[j] * np.prod(lipschitz[j + 1 : k + 1]))
                for k in range(n)
                for j in range(k + 1)
            ]
            later = np.triu(np.ones((n, n), bool), 1)  # row k, column j > k
            entry[kind] = {
                "max_ratio": float(np.max(ratios)),
                "median_ratio": float(np.median(ratios)),
                "later_blocks_exactly_unchanged": bool(np.all(err[later] == 0.0)),
                "earlier_blocks_changed": bool(np.all(err[~later] > 0.0)),
                "lipschitz": lipschitz.tolist(),
                "block_lipschitz": block.tolist(),
            }
        out.append(entry)
    return out


def depth_sensitivity(config, x, y, keys, mesh=None) -> list[dict]:
    """Statements 2 and 4 for every seed key: forward and backward sensitivity per operator."""
    n = config.num_operators
    per_kind = {}
    for kind in PROBLEMS:
        model = chain(kind, config, forward_mode="relative", backward_mode="relative")

        def measure(seed_key, x, y, model=model):
            init_key, noise_key = jax.random.split(jax.random.fold_in(seed_key, 2))
            params = model.init(init_key, x.shape[1])
            noise = probe_keys(noise_key, config)

            def per_direction(direction):
                return jax.vmap(
                    lambda ks: changes_per_operator(
                        model, params, x, y, ks, config.probe_size, direction
                    )
                )(noise)  # (keys, N perturbed operators, N blocks)

            lipschitz, _ = perturb.jacobian_norms(model, params, x, "power", noise_key, iters=50)
            output_norms = jnp.stack([jnp.linalg.norm(z) for z in model.activations(params, x)])
            grad_norm = jnp.linalg.norm(perturb.block_norms(model.gradient(params, x, y)))
            return (
                per_direction("forward"),
                per_direction("backward"),
                lipschitz,
                output_norms,
                grad_norm,
            )

        per_kind[kind] = map_seeds(measure, keys, x, y, mesh)
    out = []
    distance = n - 1 - np.arange(n)  # operators between z_k and the output
    for seed in range(keys.shape[0]):
        entry = {}
        for kind in PROBLEMS:
            fwd, bwd, lipschitz, output_norms, grad_norm = (
                np.asarray(v[seed], np.float64) for v in per_kind[kind]
            )
            fwd_total = np.linalg.norm(fwd, axis=-1).mean(axis=0)  # (N,) mean over keys
            bwd_total = np.linalg.norm(bwd, axis=-1).mean(axis=0)
            forward_abs = fwd_total / (config.probe_size * output_norms)  # ||dg|| / ||delta||
            slope, _, r2 = fit_line(distance[:-1], np.log(forward_abs[:-1]))
            entry[kind] = {
                "forward_sensitivity": forward_abs.tolist(),
                "forward_relative_error": (fwd_total / grad_norm).tolist(),
                "backward_relative_error": (bwd_total / grad_norm).tolist(),
                "ratio_forward_backward": (fwd_total / bwd_total).tolist(),
                "depth_slope": slope,
                "depth_r2": r2,
                "mean_log_lipschitz": float(np.mean(np.log(lipschitz[1:-1]))),
                "forward_changes_every_block": bool(np.all(fwd > 0.0)),
            }
        out.append(entry)
    return out


def linearity(config, x, y, keys, mesh=None) -> list[dict]:
    """Statement 3 for every seed key: gradient error against the size (tanh chain)."""
    n = config.num_operators
    model = chain("tanh", config, forward_mode="relative", backward_mode="relative")
    middle = n // 2
    unit = jnp.zeros((n,), jnp.float32).at[middle].set(1.0)

    def errors(sizes, seed_key):
        xb, yb = parallel.batch_constraint((x, y), mesh)
        init_key, noise_key = jax.random.split(jax.random.fold_in(seed_key, 3))
        params = model.init(init_key, xb.shape[1])
        noise = perturb.operator_keys(noise_key, 0, n)

        def error(size, direction):
            fwd, bwd = (unit * size, None) if direction == "forward" else (None, unit * size)
            return jnp.linalg.norm(gradient_change(model, params, xb, yb, noise, fwd, bwd))

        return {d: jax.vmap(lambda s, d=d: error(s, d))(sizes) for d in ("forward", "backward")}

    fit_sizes = np.asarray(config.linearity_sizes)
    plot_sizes = np.asarray(config.linearity_plot_sizes)
    both = jnp.asarray(np.concatenate([fit_sizes, plot_sizes]), jnp.float32)  # one compile
    measured = jax.jit(jax.vmap(errors, (None, 0)))(both, keys)
    fit_errors = {d: v[:, : len(fit_sizes)] for d, v in measured.items()}
    plot_errors = {d: v[:, len(fit_sizes) :] for d, v in measured.items()}
    out = []
    for seed in range(keys.shape[0]):
        entry = {"operator": middle + 1, "plot_sizes": plot_sizes.tolist()}
        for direction in ("forward", "backward"):
            errs = np.asarray(fit_errors[direction][seed], np.float64)
            slope, _, r2 = fit_line(np.log(fit_sizes), np.log(errs))
            curve = np.asarray(plot_errors[direction][seed])
            entry[direction] = {"slope": slope, "r2": r2, "curve": curve.tolist()}
        out.append(entry)
    return out


# ------------------------------------------------------------------ statements 5 to 7


def optimum(model, params, x, y, config) -> tuple[float, Any]:
    """``F*`` and ``w*`` of the convex problem by full-batch gradient descent."""
    run = jax.jit(
        lambda p: perturb.run_sgd(
            model, p, x, y, num_steps=config.optimum_steps, learning_rate=config.spike_lr * 2
        )
    )
    result = run(params)
    return float(result.trace.loss_clean[-1]), result.params_clean


def rates(config, x, y, mesh=None) -> dict:
    """Statement 5: excess-loss curves, decaying vs constant forward bias, over seeds."""
    model = convex(config, mesh, config.rate_batch, forward_mode="bias")
    params = model.init(jax.random.key(config.seed), x.shape[1])
    f_star, _ = optimum(model, params, x, y, config)
    mu = 2.0 * config.l2_strength
    steps = config.rate_steps

    def lr(t):
        return 1.0 / (mu * (t + config.rate_lr_shift))

    def excess(schedule, data_key):
        result = perturb.run_sgd(
            model,
            params,
            x,
            y,
            num_steps=steps,
            learning_rate=lr,
            perturbation=perturb.Perturbation(forward={0: schedule}),
            data_key=data_key,
            batch_size=config.rate_batch,
            eval_data=(x, y),
        )
        return result.trace.loss - f_star, result.trace.loss_clean - f_star

    keys = jax.random.split(jax.random.key(config.seed + 5), config.rate_seeds)

    def mean_over_orders(schedule):
        pert, clean = jax.vmap(lambda k: excess(schedule, k))(keys)
        return pert.mean(0), clean.mean(0)

    decaying_run = jax.jit(lambda: mean_over_orders(perturb.inverse_sqrt(config.rate_decay_size)))
    constant_runs = jax.jit(jax.vmap(lambda c: mean_over_orders(perturb.constant(c))[0]))
    decaying, clean = (np.asarray(v, np.float64) for v in decaying_run())
    plateaus = np.asarray(constant_runs(jnp.asarray(config.plateau_sizes, jnp.float32)))
    t = np.arange(1, steps + 1)
    tail = slice(steps // 4, steps)
    slope_clean, _, _ = fit_line(np.log(t[tail]), np.log(clean[tail]))
    slope_decaying, _, _ = fit_line(np.log(t[tail]), np.log(decaying[tail]))
    levels = [float(v) for v in plateaus[:, -config.plateau_window :].mean(axis=1)]
    exponent, _, r2 = fit_line(np.log(config.plateau_sizes), np.log(levels))
    stride = max(1, steps // 400)
    return {
        "f_star": f_star,
        "slope_clean": slope_clean,
        "slope_decaying": slope_decaying,
        "plateau_levels": levels,
        "clean_final_excess": float(clean[-config.plateau_window :].mean()),
        "plateau_exponent": exponent,
        "plateau_r2": r2,
        "curves": {
            "step": t[::stride],
            "clean": clean[::stride],
            "decaying": decaying[::stride],
        },
    }


def recovery(config, x, y, mesh=None) -> dict:
    """Statement 6: recovery time of a one-off spike against log S (full-batch GD).

    ``outcome`` holds codes (indices into ``perturb.OUTCOMES``).
    """
    del mesh  # full-batch on the whole training split, which is not sharded
    model = convex(config, backward_mode="absolute")
    params = model.init(jax.random.key(config.seed), x.shape[1])
    _, w_star = optimum(model, params, x, y, config)
    flat, unravel = ravel_pytree(w_star)
    hessian = jax.hessian(lambda v: model.loss(unravel(v), x, y))(flat)
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
    mu, smoothness = float(eigenvalues[0]), float(eigenvalues[-1])
    eta, t0, steps = config.spike_lr, config.spike_t0, config.spike_steps

    def run(size):
        result = perturb.run_sgd(
            model,
            params,
            x,
            y,
            num_steps=steps,
            learning_rate=eta,
            perturbation=perturb.Perturbation(backward={0: perturb.spike(t0, size)}),
            t0=t0,
            tolerance=config.tolerance,
            divergence_factor=config.divergence_factor,
        )
        return result.recovery_time, result.outcome, result.trace.loss, result.trace.loss_clean

    sizes = np.asarray(config.spike_sizes, np.float32)
    times, outcomes, losses, clean = jax.jit(jax.vmap(run))(jnp.asarray(sizes))
    times = np.asarray(times)
    recovered = times >= 0
    slope, intercept, r2 = fit_line(np.log(sizes[recovered]), times[recovered])
    predicted = 1.0 / -np.log(1.0 - eta * mu)
    show = [0, len(sizes) // 2, len(sizes) - 1]
    return {
        "sizes": sizes.tolist(),
        "recovery_time": times.tolist(),
        "outcome": np.asarray(outcomes),
        "mu": mu,
        "smoothness": smoothness,
        "fitted_slope": slope,
        "fitted_intercept": intercept,
        "r2": r2,
        "predicted_slope": float(predicted),
        "curves": {
            "sizes": sizes[show].tolist(),
            "loss": np.asarray(losses)[show],
            "clean": np.asarray(clean)[0],
        },
    }


def threshold(config, x, y, mesh=None) -> dict:
    """Statement 7: persistent backward perturbation, systematic and random, size sweep."""
    n = config.num_operators
    body = [perturb.dense(30, "tanh") for _ in range(n - 1)]
    sizes = jnp.asarray(config.threshold_sizes, jnp.float32)
    out = {"sizes": np.asarray(sizes).tolist()}
    for kind, mode in (("systematic", "bias"), ("random", "relative")):
        model = composite(
            [*body, perturb.logistic_head()],
            mesh,
            config.threshold_batch,
            regularizer="nonconvex",
            reg_strength=config.nonconvex_strength,
            backward_mode=mode,
        )
        params = model.init(jax.random.key(config.seed), x.shape[1])

        def run(size, data_key, model=model, kind=kind, params=params):
            where = {-1: size} if kind == "systematic" else size
            result = perturb.run_sgd(
                model,
                params,
                x,
                y,
                num_steps=config.threshold_steps,
                learning_rate=config.threshold_lr,
                perturbation=perturb.Perturbation(backward=where),
                data_key=data_key,
                batch_size=config.threshold_batch,
                eval_data=(x, y),
                divergence_factor=config.divergence_factor,
            )
            trace = result.trace
            return (
                result.outcome,
                jnp.median(trace.relative_grad_error),
                trace.loss[-1],
                trace.loss_clean[-1],
                trace.loss[0],
            )

        keys = seed_keys(config)
        sweep = jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))
        outcome, rel_err, final, clean_final, initial = (np.asarray(v) for v in sweep(sizes, keys))
        progress = (initial - final) / (initial - clean_final)
        failed = (
            (outcome == perturb.DIVERGED)
            | ~np.isfinite(final)
            | (np.nan_to_num(progress, nan=-1.0) < config.stall_fraction)
        )
        failed_all = failed.all(axis=1)  # per size: every seed stalled or diverged
        median_err = np.median(rel_err, axis=1)
        first = int(np.argmax(failed_all)) if failed_all.any() else None
        out[kind] = {
            "relative_error": median_err.tolist(),
            "progress": np.median(np.where(np.isfinite(progress), progress, -np.inf), 1).tolist(),
            "diverged": (outcome == perturb.DIVERGED).mean(axis=1).tolist(),
            "failed": failed_all.tolist(),
            "threshold_error": None if first is None else float(median_err[first]),
            "last_ok_error": None if first is None or first == 0 else float(median_err[first - 1]),
        }
    return out


def example_run(config, x, y, mesh=None) -> dict:
    """Loss curves of Poisson-spike runs on the tanh chain, for the plot.

    The same spike train (relative backward noise) hits either the output operator only
    or every operator at once, which shows how the perturbations compound. ``outcome``
    is a code (an index into ``perturb.OUTCOMES``).
    """
    model = chain("tanh", config, mesh, config.threshold_batch, backward_mode="relative")
    params = model.init(jax.random.key(config.seed), x.shape[1])
    spikes = perturb.poisson_spikes(
        jax.random.key(config.seed + 1),
        config.example_rate,
        config.example_size,
        config.example_duration,
        start=100,
    )

    def run(where):
        return perturb.run_sgd(
            model,
            params,
            x,
            y,
            num_steps=config.threshold_steps,
            learning_rate=config.threshold_lr,
            perturbation=perturb.Perturbation(backward=where),
            batch_size=config.threshold_batch,
            eval_data=(x, y),
            divergence_factor=config.divergence_factor,
        )

    out = {}
    for name, where in (("output_operator", {-1: spikes}), ("every_operator", spikes)):
        result = jax.jit(lambda where=where: run(where))()
        trace = result.trace
        out[name] = {
            "loss": np.asarray(trace.loss),
            "clean": np.asarray(trace.loss_clean),
            "spike": np.asarray(trace.backward_size)[:, -1] > 0,
            "outcome": int(result.outcome),
        }
    return out


def zero_scale_cost(config, x, y, mesh=None) -> dict:
    """Statement 0: at size 0 the perturbation points are identities and cost nothing.

    Times one jitted full-batch SGD step of the tanh chain without perturbation points
    (``injection=None``), with every point present at a traced size 0, and at size
    ``probe_size``; medians of interleaved rounds after compilation, as ratios to the
    step without points measured in the same run. Bits: the forward and backward points
    at a traced size 0 return their input exactly (every operator output checked).
    """
    del mesh  # the timed step is full-batch on the whole training split: not sharded
    n = config.num_operators
    model = chain("tanh", config, forward_mode="relative", backward_mode="relative")
    params = model.init(jax.random.key(config.seed), x.shape[1])
    noise = perturb.operator_keys(jax.random.key(config.seed + 7), 0, n)

    def step(state):
        params, sizes = state
        injection = None if sizes is None else model.make_injection(noise, sizes, sizes)
        grads = model.gradient(params, x, y, injection)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), sizes

    variants = {
        "no_points": (params, None),
        "size_0": (params, jnp.zeros((n,), jnp.float32)),
        "size_small": (params, jnp.full((n,), config.probe_size, jnp.float32)),
    }
    steps, compile_s = {}, {}
    for name, state in variants.items():
        compiled, seconds = measure.compile_timed(step, state)
        steps[name], compile_s[name] = compiled, seconds
    times, _ = measure.interleaved_times(
        steps, variants, repeats=config.timing_repeats, warmup=5, desc="size-0 cost"
    )
    medians = {name: measure.median(t) for name, t in times.items()}

    @jax.jit
    def points_return_input(sizes):
        outputs = model.activations(params, x)
        same = []
        for i, z in enumerate(outputs):
            fwd = perturb.forward(z, noise[i, 0], sizes[i])
            bwd = perturb.backward(z, noise[i, 1], sizes[i])
            same.append(jnp.all(fwd == z) & jnp.all(bwd == z))
            same.append(jnp.all(jnp.signbit(fwd) == jnp.signbit(z)))
        return jnp.all(jnp.stack(same))

    return {
        "median_step_s": medians,
        "compile_s": compile_s,
        "ratio_size_0": medians["size_0"] / medians["no_points"],
        "ratio_size_small": medians["size_small"] / medians["no_points"],
        "identity_bits": bool(points_return_input(jnp.zeros((n,), jnp.float32))),
    }


# ------------------------------------------------------------------------ statements


def statement(sid: int, claim: str, measured: Any, expected: str, passed: bool) -> dict:
    return {"id": sid, "claim": claim, "measured": measured, "expected": expected, "passed": passed}


def within(value: float | None, bounds) -> bool:
    return value is not None and bounds[0] <= value <= bounds[1]


def threshold_statement(sid: str, claim: str, sweep: dict, config) -> dict:
    """Statement 7a or 7b from one kind's size sweep."""
    low, high = config.threshold_range
    return statement(
        sid,
        claim,
        {"first_failing_error": sweep["threshold_error"], "last_ok_error": sweep["last_ok_error"]},
        f"first failing relative error in [{low}, {high}]",
        within(sweep["threshold_error"], config.threshold_range),
    )


def zero_cost_statements(r: dict, config) -> list[dict]:
    cost = r["zero_cost"]
    return [
        statement(
            0,
            "at size 0 the perturbation points are exact identities and cost nothing measurable",
            {
                "identity_bits": cost["identity_bits"],
                "step_time_ratio_size_0": cost["ratio_size_0"],
                "step_time_ratio_size_small": cost["ratio_size_small"],
            },
            f"same bits; step time / no points <= {config.zero_cost_ratio}",
            cost["identity_bits"] and cost["ratio_size_0"] <= config.zero_cost_ratio,
        )
    ]


def locality_statements(r: dict, config) -> list[dict]:
    s1 = [s["locality"][k] for s in r["per_seed"] for k in PROBLEMS]
    max_ratio = max(x["max_ratio"] for x in s1)
    return [
        statement(
            1,
            "backward noise at operator k leaves blocks j > k unchanged and moves block "
            "j <= k by at most M_j prod L_i ||xi||",
            {
                "later_blocks_exactly_unchanged": all(
                    x["later_blocks_exactly_unchanged"] for x in s1
                ),
                "max_measured_over_bound": max_ratio,
                "median_measured_over_bound": float(np.median([x["median_ratio"] for x in s1])),
            },
            f"unchanged exactly; measured / bound <= 1 + {config.bound_tolerance}",
            all(x["later_blocks_exactly_unchanged"] and x["earlier_blocks_changed"] for x in s1)
            and max_ratio <= 1 + config.bound_tolerance,
        )
    ]


def depth_statements(r: dict, config) -> list[dict]:
    """Statements 2 and 4."""
    seeds = r["per_seed"]
    s2 = [s["depth"]["deep_linear"] for s in seeds]
    s2_tanh = [s["depth"]["tanh"] for s in seeds]
    ratios = {
        k: np.array([s["depth"][k]["ratio_forward_backward"] for s in seeds]) for k in PROBLEMS
    }
    median_slope = float(np.median([x["depth_slope"] for x in s2]))
    dominant = {
        k: [
            "forward" if (r > 1).all() else "backward" if (r < 1).all() else "mixed"
            for r in ratios[k].T
        ]
        for k in PROBLEMS
    }
    median_ratios = {k: np.median(ratios[k], axis=0).tolist() for k in PROBLEMS}
    ends = all((ratios[k][:, 0] > 1).all() and (ratios[k][:, -1] < 1).all() for k in PROBLEMS)
    return [
        statement(
            2,
            "forward noise at operator m changes every block and its effect grows with the "
            "distance to the output when L_i > 1 (deep linear, gain "
            f"{config.linear_gain})",
            {
                "every_block_changed": all(x["forward_changes_every_block"] for x in s2),
                "depth_slope": median_slope,
                "mean_log_lipschitz": float(np.median([x["mean_log_lipschitz"] for x in s2])),
                "tanh_depth_slope": float(np.median([x["depth_slope"] for x in s2_tanh])),
            },
            "every block changed; slope of log sensitivity vs distance > 0",
            all(x["forward_changes_every_block"] for x in s2) and median_slope > 0,
        ),
        statement(
            4,
            "forward vs backward sensitivity per operator (relative normalisation): forward "
            "noise dominates at the first operator, backward noise at the last",
            {"median_ratio_fwd_over_bwd": median_ratios, "dominant": dominant},
            "ratio > 1 at operator 1 and < 1 at operator N, on every seed and both chains",
            ends,
        ),
    ]


def linearity_statements(r: dict, config) -> list[dict]:
    s3 = [s["linearity"]["forward"]["slope"] for s in r["per_seed"]]
    return [
        statement(
            3,
            "the gradient error is linear in the perturbation size for small sizes",
            {"loglog_slope": float(np.median(s3)), "min": float(min(s3)), "max": float(max(s3))},
            f"slope in [{config.linearity_slope[0]}, {config.linearity_slope[1]}]",
            all(within(v, config.linearity_slope) for v in s3),
        )
    ]


def rates_statements(r: dict, config) -> list[dict]:
    rate = r["rates"]
    return [
        statement(
            5,
            "size ~ 1/sqrt(t) keeps the clean SGD rate; a constant size plateaus at a "
            "level ~ size^2",
            {
                "slope_clean": rate["slope_clean"],
                "slope_decaying": rate["slope_decaying"],
                "plateau_exponent": rate["plateau_exponent"],
            },
            f"|slope gap| <= {config.rate_slope_gap}; exponent in "
            f"[{config.plateau_exponent[0]}, {config.plateau_exponent[1]}]",
            abs(rate["slope_decaying"] - rate["slope_clean"]) <= config.rate_slope_gap
            and within(rate["plateau_exponent"], config.plateau_exponent),
        )
    ]


def recovery_statements(r: dict, config) -> list[dict]:
    rec = r["recovery"]
    slope_ratio = rec["fitted_slope"] / rec["predicted_slope"]
    return [
        statement(
            6,
            "a one-off spike of size S is recovered in time a + log(S) / -log(1 - eta mu)",
            {
                "fitted_slope": rec["fitted_slope"],
                "predicted_slope": rec["predicted_slope"],
                "r2": rec["r2"],
                "recovered": f"{sum(t >= 0 for t in rec['recovery_time'])}/{len(rec['sizes'])}",
            },
            f"R^2 >= {config.recovery_r2}; fitted / predicted in "
            f"[{config.recovery_slope_ratio[0]}, {config.recovery_slope_ratio[1]}]",
            rec["r2"] >= config.recovery_r2 and within(slope_ratio, config.recovery_slope_ratio),
        )
    ]


def threshold_statements(r: dict, config) -> list[dict]:
    thr = r["threshold"]
    return [
        threshold_statement(
            "7a",
            "a persistent systematic error stalls or diverges SGD once the relative "
            "gradient error reaches about 1",
            thr["systematic"],
            config,
        ),
        threshold_statement(
            "7b",
            "the same for random relative noise at every operator's cotangent",
            thr["random"],
            config,
        ),
    ]


# Which section each group of statements needs, in the order of the statements' ids.
STATEMENTS = (
    ("zero_cost", zero_cost_statements),
    ("locality", locality_statements),
    ("depth", depth_statements),
    ("linearity", linearity_statements),
    ("rates", rates_statements),
    ("recovery", recovery_statements),
    ("threshold", threshold_statements),
)


def statements(r: dict, config) -> list[dict]:
    """The table of measured statements from the raw measurements ``r``: those of the
    sections that ran, ordered by id."""
    ran = set(r) | set(r["per_seed"][0])
    found = [s for section, build in STATEMENTS if section in ran for s in build(r, config)]
    order = ["0", "1", "2", "3", "4", "5", "6", "7a", "7b"]
    return sorted(found, key=lambda s: order.index(str(s["id"])))


PROBES = (
    ("locality", backward_locality),
    ("depth", depth_sensitivity),
    ("linearity", linearity),
)
SECTIONS = (
    ("rates", rates),
    ("recovery", recovery),
    ("threshold", threshold),
    ("example", example_run),
    ("zero_cost", zero_scale_cost),
)
ALL_SECTIONS = tuple(name for name, _ in PROBES + SECTIONS)


def run(
    config: ml_collections.ConfigDict,
    *,
    checkpoint_dir: Any = None,
    mesh: Any = "auto",
    fsdp: bool = False,
) -> dict:
    """Runs every measurement and returns the result dict (``summary`` + raw data).

    Args:
      config: ``configs/perturbed_sgd.py``'s ``get_config(size)``.
        ``config.sections`` names the sections to run (all by default; the statements
        of the others are left out).
      checkpoint_dir: None, a directory or a :class:`benchmarks.resume.Checkpointer`:
        each section (``PROBES`` and ``SECTIONS``) is saved when it finishes, and a
        rerun with the same config picks up after the last finished section.
      mesh: see :mod:`benchmarks.parallel` (``"auto"``: data parallel over all
        devices when there are several). ``probe_batch``, ``rate_batch`` and
        ``threshold_batch`` must be divisible by the number of devices on the
        ``data`` axis (else a ValueError).
      fsdp: accepted for the common interface; it changes nothing here (see the
        module docstring).
    """
    unknown = set(config.sections) - {name for name, _ in PROBES + SECTIONS}
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {ALL_SECTIONS}")
    checkpointer = resume.open_checkpointer(checkpoint_dir, "perturbed_sgd", config)
    mesh = parallel.resolve_mesh(mesh)
    del fsdp
    split = data_lib.breast_cancer(config.split_seed, config.test_fraction)
    x_all, y_all = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
    x_probe, y_probe = x_all[: config.probe_batch], y_all[: config.probe_batch]
    keys = seed_keys(config)
    timings = {}

    def section(name, compute):
        start = time.perf_counter()
        value = checkpointer.stage(name, compute)
        timings[f"{name}_s"] = time.perf_counter() - start
        return value

    def chosen(sections):
        return [(name, fn) for name, fn in sections if name in config.sections]

    probes = {}
    for name, fn in tqdm(chosen(PROBES), desc="statements 1-4", leave=False):
        probes[name] = section(name, lambda fn=fn: fn(config, x_probe, y_probe, keys, mesh))
    per_seed = [{name: probes[name][seed] for name in probes} for seed in range(len(keys))]
    raw = {"per_seed": per_seed}
    for name, fn in tqdm(chosen(SECTIONS), desc="statements 0, 5-7", leave=False):
        raw[name] = section(name, lambda fn=fn: fn(config, x_all, y_all, mesh))
    name_outcomes(raw)
    result_statements = statements(raw, config)
    result = reporting.to_jsonable(
        {
            "study": "perturbed_sgd",
            "config": config,
            "environment": reporting.environment(),
            "mesh": parallel.describe(mesh),
            "summary": {
                "statements": result_statements,
                "passed": sum(bool(s["passed"]) for s in result_statements),
                "total": len(result_statements),
            },
            "timings_s": timings,
            "raw": raw,
        },
        digits=6,
    )
    checkpointer.finish()
    return result


def name_outcomes(raw: dict) -> None:
    """Replaces the outcome codes of the recovery and example sections by their names
    (checkpointed stages hold numbers only)."""
    if "recovery" in raw:
        recovery = raw["recovery"]
        recovery["outcome"] = [perturb.OUTCOMES[int(o)] for o in recovery["outcome"]]
    for example in raw.get("example", {}).values():
        example["outcome"] = perturb.OUTCOMES[int(example["outcome"])]


def _short(value: Any) -> str:
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                continue
            parts.append(f"{k}={reporting.format_value(v)}")
        return ", ".join(parts)
    return reporting.format_value(value)


def table(result: dict) -> str:
    """One row per statement: id, pass/fail, measured (scalars), expected."""
    rows = [
        [s["id"], "pass" if s["passed"] else "FAIL", _short(s["measured"]), s["expected"]]
        for s in result["summary"]["statements"]
    ]
    lines = [
        reporting.format_table(["id", "result", "measured", "expected"], rows),
        f"{result['summary']['passed']}/{result['summary']['total']} statements pass",
    ]
    for s in result["summary"]["statements"]:
        if s["id"] != 4:
            continue
        for kind, ratios in s["measured"]["median_ratio_fwd_over_bwd"].items():
            cells = " ".join(f"{v:.3g}" for v in ratios)
            lines.append(f"statement 4, {kind}: fwd/bwd ratio per operator 1..N: {cells}")
    return "\n".join(lines)


def plot(result: dict, path) -> Any:
    """Four panels: loss curves with spikes, depth sensitivity, recovery vs log S, sweep.

    A panel stays empty when its sections did not run (``config.sections``).
    """
    reporting.plot_style()
    import matplotlib.pyplot as plt

    raw = result["raw"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    ax = axes[0, 0]
    if "example" in raw or "recovery" in raw:
        if "example" in raw:
            example = raw["example"]
            first = example["output_operator"]
            steps = np.arange(len(first["loss"]))
            ax.plot(steps, first["clean"], label="tanh chain, clean", lw=1.0)
            for name, run in example.items():
                ax.plot(
                    steps,
                    run["loss"],
                    lw=1.0,
                    label=f"spikes at {name.replace('_', ' ')}: {run['outcome']}",
                )
            for t in steps[np.asarray(first["spike"], bool)]:
                ax.axvline(t, color="tab:red", alpha=0.15, lw=0.8)
        if "recovery" in raw:
            rec = raw["recovery"]
            t0 = result["config"]["spike_t0"]
            for size, loss in zip(rec["curves"]["sizes"], rec["curves"]["loss"], strict=True):
                ax.plot(
                    np.arange(len(loss)), loss, lw=0.8, ls="--", label=f"convex, spike S={size:g}"
                )
            ax.axvline(t0, color="k", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("loss, clean vs perturbed (red: spike steps; dotted: convex spike t0)")
        ax.legend(fontsize=7)

    ax = axes[0, 1]
    if "depth" in raw["per_seed"][0]:
        seeds = raw["per_seed"]
        for kind, color in zip(PROBLEMS, ("tab:blue", "tab:orange"), strict=True):
            fwd = np.median([s["depth"][kind]["forward_relative_error"] for s in seeds], axis=0)
            bwd = np.median([s["depth"][kind]["backward_relative_error"] for s in seeds], axis=0)
            ops = np.arange(1, len(fwd) + 1)
            ax.plot(ops, fwd, "o-", color=color, label=f"{kind}: forward")
            ax.plot(ops, bwd, "s--", color=color, label=f"{kind}: backward")
        ax.set_yscale("log")
        ax.set_xlabel("perturbed operator k (N = output)")
        ax.set_ylabel("||dg|| / ||g|| at relative size " + f"{result['config']['probe_size']:g}")
        ax.set_title("sensitivity vs depth (statements 2 and 4)")
        ax.legend(fontsize=7)

    ax = axes[1, 0]
    if "recovery" in raw:
        rec = raw["recovery"]
        sizes = np.asarray(rec["sizes"])
        times = np.asarray(rec["recovery_time"], float)
        ok = times >= 0
        ax.plot(np.log(sizes[ok]), times[ok], "o", label="measured")
        grid = np.linspace(np.log(sizes.min()), np.log(sizes.max()), 50)
        ax.plot(
            grid,
            rec["fitted_intercept"] + rec["fitted_slope"] * grid,
            "-",
            label=f"fit: slope {rec['fitted_slope']:.1f}, R^2 {rec['r2']:.3f}",
        )
        ax.plot(
            grid,
            rec["fitted_intercept"] + rec["predicted_slope"] * grid,
            ":",
            label=f"predicted slope 1/-log(1-eta mu) = {rec['predicted_slope']:.1f}",
        )
        ax.set_xlabel("log S")
        ax.set_ylabel("recovery time (steps)")
        ax.set_title("recovery time of a one-off spike (statement 6)")
        ax.legend(fontsize=7)

    ax = axes[1, 1]
    if "threshold" in raw:
        thr = raw["threshold"]
        for kind, marker in (("systematic", "o"), ("random", "s")):
            err = np.asarray(thr[kind]["relative_error"], float)
            progress = np.clip(np.asarray(thr[kind]["progress"], float), -0.5, 1.5)
            ax.plot(err, progress, marker + "-", label=kind)
        ax.axvline(1.0, color="k", lw=0.6, ls=":")
        ax.axhline(result["config"]["stall_fraction"], color="tab:red", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("median relative gradient error ||g_hat - g|| / ||g||")
        ax.set_ylabel("progress (1 = clean run's loss decrease)")
        ax.set_title("persistent perturbation sweep (statement 7)")
        ax.legend(fontsize=7)
    return reporting.save_figure(fig, path)
