"""Statements 0 and 5 to 7 of ``perturbed_sgd``: SGD runs (rates, spike recovery, the
divergence threshold), the example curves, and the cost of idle perturbation points."""

from __future__ import annotations

import re
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
    """Statement 7: persistent backward perturbation, systematic and random, size sweep.

    Per kind and size (seeds as rows): the outcome, the median and the root mean square
    over steps of the relative gradient error, and progress. For the random kind, also
    the curvature figures of statement 7b's prediction (:func:`smoothness_prediction`).
    """
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
                jnp.sqrt(jnp.mean(jnp.square(trace.relative_grad_error))),
                trace.loss[-1],
                trace.loss_clean[-1],
                trace.loss[0],
                result.params_clean,
            )

        keys = seed_keys(config)
        sweep = jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))
        *found, params_clean = sweep(sizes, keys)
        outcome, rel_err, rms_err, final, clean_final, initial = (np.asarray(v) for v in found)
        progress = (initial - final) / (initial - clean_final)
        failed = (
            (outcome == perturb.DIVERGED)
            | ~np.isfinite(final)
            | (np.nan_to_num(progress, nan=-1.0) < config.stall_fraction)
        )
        failed_all = failed.all(axis=1)  # per size: every seed stalled or diverged
        median_err = np.median(rel_err, axis=1)
        median_rms = np.median(rms_err, axis=1)
        first = int(np.argmax(failed_all)) if failed_all.any() else None
        out[kind] = {
            "relative_error": median_err.tolist(),
            "rms_relative_error": median_rms.tolist(),
            "rms_per_run": rms_err,  # (sizes, seeds)
            "failed_per_run": failed,  # (sizes, seeds)
            "progress": np.median(np.where(np.isfinite(progress), progress, -np.inf), 1).tolist(),
            "diverged": (outcome == perturb.DIVERGED).mean(axis=1).tolist(),
            "failed": failed_all.tolist(),
            "threshold_error": None if first is None else float(median_err[first]),
            "last_ok_error": None if first is None or first == 0 else float(median_err[first - 1]),
            "threshold_rms_error": None if first is None else float(median_rms[first]),
            "last_ok_rms_error": (
                None if first is None or first == 0 else float(median_rms[first - 1])
            ),
        }
        if kind == "random":
            clean_end = jax.tree.map(lambda v: v[0, 0], params_clean)  # the clean run
            out["prediction"] = smoothness_prediction(model, params, clean_end, x, y, config)
    return out


def _flat_hvp(model, params, x, y):
    """The flattened parameters and ``v -> H v``, ``H`` the training objective's Hessian."""
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(lambda v: model.loss(unravel(v), x, y))
    return flat, lambda v: jax.jvp(grad, (flat,), (v,))[1]


def _power(op, v0, iters):
    tiny = jnp.finfo(jnp.float32).tiny
    body = lambda _, v: (lambda w: w / jnp.maximum(jnp.linalg.norm(w), tiny))(op(v))  # noqa: E731
    return jax.lax.fori_loop(0, iters, body, v0 / jnp.linalg.norm(v0))


def top_curvature(model, params, x, y, key, iters: int):
    """``(lambda_max, rho, residual)`` of the Hessian of the training objective at
    ``params``: power iteration on Hessian-vector products gives ``rho = max |lambda|``
    (from ``||H v||``, which converges even when ``+rho`` and ``-rho`` are both
    eigenvalues), then on ``H + rho I``, whose eigenvalues are ``>= 0`` with the top
    one ``lambda_max + rho``. The Rayleigh quotient is a lower bound on ``lambda_max``
    for any vector; ``residual = ||H v - lambda_max v|| / rho`` says how far from an
    eigenvector the last iterate is."""
    flat, hvp = _flat_hvp(model, params, x, y)
    v0 = jax.random.normal(key, flat.shape, jnp.float32)
    rho = jnp.linalg.norm(hvp(_power(hvp, v0, iters)))
    v = _power(lambda v: hvp(v) + rho * v, v0, iters)
    hv = hvp(v)
    top = v @ hv
    return top, rho, jnp.linalg.norm(hv - top * v) / rho


def noise_curvature(model, params, x, y, size, keys):
    """Rayleigh quotients of the Hessian along the gradient and along the gradient
    error of relative noise of ``size`` at every cotangent (pooled over ``keys``):
    ``(g.Hg / g.g, sum d.Hd / sum d.d)``, full batch."""
    n = model.num_operators
    flat, hvp = _flat_hvp(model, params, x, y)
    gradient = ravel_pytree(model.gradient(params, x, y))[0]

    def error(key):
        injection = perturb.Perturbation(backward=size).injection(
            perturb.operator_keys(key, 0, n), 0, n
        )
        return ravel_pytree(model.gradient(params, x, y, injection))[0] - gradient

    d = jax.vmap(error)(keys)
    hd = jax.vmap(hvp)(d)
    del flat
    return gradient @ hvp(gradient) / (gradient @ gradient), jnp.sum(d * hd) / jnp.sum(d * d)


def smoothness_prediction(model, params, params_end, x, y, config) -> dict:
    """Statement 7b's prediction for zero-mean multiplicative noise (see the study's
    docstring): ``eps* = sqrt(2 / (eta L) - 1)`` with ``L`` the largest Hessian
    eigenvalue of the training objective at the start of the runs and at the end of the
    clean run (the larger); and, to explain it, the curvature the noise sees."""
    key = jax.random.key(config.seed + 11)
    iters = config.power_iterations
    curvature = jax.jit(lambda p: top_curvature(model, p, x, y, key, iters))
    top_start, rho_start, res_start = (float(v) for v in curvature(params))
    top_end, _, res_end = (float(v) for v in curvature(params_end))
    smoothness = max(top_start, top_end)
    eta, n = config.threshold_lr, config.num_operators
    margin = 2.0 / (eta * smoothness)
    keys = jax.random.split(jax.random.key(config.seed + 12), config.curvature_draws)
    sizes = jnp.asarray(config.threshold_sizes, jnp.float32)
    kappa_g, kappa_d = jax.jit(
        jax.vmap(lambda size: noise_curvature(model, params, x, y, size, keys))
    )(sizes)
    return {
        "smoothness": smoothness,
        "smoothness_start": top_start,
        "smoothness_end": top_end,
        "largest_abs_eigenvalue_start": rho_start,
        "power_residual": max(res_start, res_end),
        "predicted_error": float(np.sqrt(max(margin - 1.0, 0.0))),
        # The same bound read as a size, if each cotangent's noise compounded fully:
        # (1 + c^2)^N eta L = 2.
        "size_by_compounding": float(np.sqrt(max(margin ** (1.0 / n) - 1.0, 0.0))),
        "gradient_curvature": float(np.asarray(kappa_g)[0]),
        "noise_curvature": np.asarray(kappa_d),  # per size
    }


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


def program_text(compiled) -> str:
    """The optimized HLO of a compiled function without its module name and source
    locations (which name the Python lines that built it)."""
    lines = compiled.as_text().splitlines()
    kept = [line for line in lines if not re.match(r"HloModule |\d+ \{file_name_id=", line)]
    return re.sub(r", metadata=\{[^}]*\}", "", "\n".join(kept))


def zero_scale_cost(config, x, y, mesh=None) -> dict:
    """Statement 0: idle perturbation points cost nothing.

    Times one jitted full-batch SGD step of the tanh chain without perturbation points
    (``injection=None``) and with the injection of a :class:`perturb.Perturbation` that
    names no point (``Perturbation().injection``: its ``2N`` points are idle, so none is
    built), medians of interleaved rounds after compilation, as a ratio to the step
    without points in the same run. Bits: ``bit_steps`` steps of each from the same
    parameters give the same parameters bit for bit. Also reported: whether the two
    compile to the same optimized program (source locations aside).

    Extra information, not idle points: the same step with every point *named* at a
    traced size 0 (each point built, an exact identity behind a ``lax.cond``; its bits
    are checked on every operator output) and at size ``probe_size``.
    """
    del mesh  # the timed step is full-batch on the whole training split: not sharded
    n = config.num_operators
    model = chain("tanh", config, forward_mode="relative", backward_mode="relative")
    params = model.init(jax.random.key(config.seed), x.shape[1])
    noise = perturb.operator_keys(jax.random.key(config.seed + 7), 0, n)

    def make_step(injection_of):
        def step(state):
            params, sizes = state
            grads = model.gradient(params, x, y, injection_of(sizes))
            return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), sizes

        return step

    zeros = jnp.zeros((n,), jnp.float32)
    variants = {  # name: (injection from the traced sizes, sizes)
        "no_points": (lambda sizes: None, zeros),
        "idle": (lambda sizes: perturb.Perturbation().injection(noise, 0, n), zeros),
        "named_0": (lambda sizes: model.make_injection(noise, sizes, sizes), zeros),
        "named_small": (
            lambda sizes: model.make_injection(noise, sizes, sizes),
            jnp.full((n,), config.probe_size, jnp.float32),
        ),
    }
    steps, compile_s, states = {}, {}, {}
    for name, (injection_of, sizes) in variants.items():
        states[name] = (params, sizes)
        steps[name], compile_s[name] = measure.compile_timed(make_step(injection_of), states[name])
    times, _ = measure.interleaved_times(
        steps, states, repeats=config.timing_repeats, warmup=5, desc="idle-point cost"
    )
    medians = {name: measure.median(t) for name, t in times.items()}

    def after_steps(name):
        state = states[name]
        for _ in range(config.bit_steps):
            state = steps[name](state)
        return jax.tree.leaves(state[0])

    same_bits = all(
        np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
        for a, b in zip(after_steps("idle"), after_steps("no_points"), strict=True)
    )
    same_program = program_text(steps["idle"]) == program_text(steps["no_points"])

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
        "time_ratio_idle": medians["idle"] / medians["no_points"],
        "time_ratio_named_0": medians["named_0"] / medians["no_points"],
        "time_ratio_named_small": medians["named_small"] / medians["no_points"],
        "idle_same_bits": bool(same_bits),
        "idle_same_program": bool(same_program),
        "named_0_identity_bits": bool(points_return_input(zeros)),
    }
