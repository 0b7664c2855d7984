"""Statements 1 to 4 of ``perturbed_sgd``: single-step probes of the gradient's response
to forward and backward noise (locality and bounds, depth, linearity, asymmetry)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import parallel
from benchmarks.studies.perturbed_sgd.problems import (
    PROBLEMS,
    chain,
    changes_per_operator,
    fit_line,
    gradient_change,
    map_seeds,
    probe_keys,
)
from optstab import perturb


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
