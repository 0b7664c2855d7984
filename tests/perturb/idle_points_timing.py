"""Step time of idle perturbation points against a model without points (not a test).

The model and step are those of statement 0 of ``benchmarks/perturbed_sgd.py`` (quick
size): a chain of 5 dense + tanh operators of width 30 and a logistic head, one
full-batch SGD step on 426 examples of 30 features. Variants:

* ``no_points``: ``model.gradient(params, x, y)``, no injection at all;
* ``unnamed``: the injection of ``Perturbation()`` (no point named, none built);
* ``one_named``: ``Perturbation(backward={-1: size})`` at a traced size 0 (one point
  built, an exact identity behind one ``lax.cond``);
* ``all_named``: every one of the 2N points built at a traced size 0 (what statement 0
  times as ``size_0``).

Each variant is compiled once, then all are called round-robin (the order rotated each
round) for ``--rounds`` rounds after ``--warmup`` untimed ones; the report is the median
seconds per step and its ratio to ``no_points``.

Run: ``.venv/bin/python tests/perturb/idle_points_timing.py [--rounds 500]``
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from optstab import perturb

N, WIDTH, EXAMPLES = 6, 30, 426


def variants():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((EXAMPLES, WIDTH)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, EXAMPLES), jnp.int32)
    model = perturb.Composite(
        [perturb.dense(WIDTH, "tanh") for _ in range(N - 1)] + [perturb.logistic_head()],
        regularizer="l2",
        reg_strength=0.05,
    )
    params = model.init(jax.random.key(0), WIDTH)
    keys = perturb.operator_keys(jax.random.key(7), 0, N)

    def step_with(make_injection):
        def step(state):
            params, size = state
            injection = make_injection(size)
            grads = model.gradient(params, x, y, injection)
            return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), size

        return step

    zero = jnp.zeros((), jnp.float32)
    makers = {
        "no_points": lambda size: None,
        "unnamed": lambda size: perturb.Perturbation().injection(keys, 0, N),
        "one_named": lambda size: perturb.Perturbation(backward={-1: size}).injection(keys, 0, N),
        "all_named": lambda size: model.make_injection(keys, size, size),
    }
    return {name: (step_with(make), (params, zero)) for name, make in makers.items()}


def main(rounds: int, warmup: int) -> dict[str, float]:
    steps, states = {}, {}
    for name, (step, state) in variants().items():
        steps[name] = jax.jit(step).lower(state).compile()
        states[name] = state
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            states[name] = jax.block_until_ready(steps[name](states[name]))
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name, median in medians.items():
        ratio = median / medians["no_points"]
        print(f"{name:>10}: median {median * 1e6:8.1f} us/step, ratio {ratio:.3f}")
    return medians


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    main(args.rounds, args.warmup)
