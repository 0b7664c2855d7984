"""Statements 0 and 5 to 7 of ``perturbed_sgd``: SGD runs (rates, spike recovery, the
divergence threshold), the example curves, and the cost of idle perturbation points."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from benchmarks.harness import measure
from benchmarks.studies.perturbed_sgd.problems import chain, composite, convex, fit_line, seed_keys
from optstab import perturb


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
