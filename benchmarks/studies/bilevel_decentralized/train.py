"""Runs of the decentralized study: D-SOBA on a topology, or centralized MA-SOBA.

A :class:`Run` names one configuration: a topology (or ``"centralized"``), the node
count, the heterogeneity and the D-SOBA variant. Every seed of a run deals and corrupts
its own data (:func:`problem.split_nodes`) and draws its own minibatches; the
centralized run of the same ``(n, h)`` and seed sees exactly the decentralized runs'
minibatches, concatenated (the same samples per step in total). The training loop is a
``lax.scan`` over evaluation chunks of ``eval_every`` steps, one compilation per run.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.studies.bilevel_decentralized import problem
from optstab import bilevel
from optstab.bilevel import topology

CENTRALIZED = "centralized"
TOPOLOGIES = {
    "ring": topology.ring,
    "torus": topology.torus,
    "exponential": topology.exponential,
    "complete": topology.complete,
}


class Run(NamedTuple):
    """One configuration of the study."""

    graph: str  # a key of TOPOLOGIES, or CENTRALIZED
    nodes: int
    heterogeneity: float
    first_order: bool = False

    @property
    def name(self) -> str:
        variant = "" if self.graph == CENTRALIZED else ("-fo" if self.first_order else "-so")
        return f"{self.graph}{variant}-n{self.nodes}-h{self.heterogeneity:g}"

    @property
    def reference(self) -> Run:
        """The centralized run this one is compared with."""
        return Run(CENTRALIZED, self.nodes, self.heterogeneity)


def build_topology(run: Run) -> topology.Topology:
    return TOPOLOGIES[run.graph](run.nodes)


def node_mesh(n: int, run_mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh | None:
    """A ``("nodes",)`` mesh of one device per node, taken from the run's devices (the
    harness's mesh; ``None``: one device), when it has at least ``n`` of them."""
    if run_mesh is None or n < 2 or run_mesh.devices.size < n:
        return None
    return jax.make_mesh((n,), ("nodes",), devices=list(run_mesh.devices.flat)[:n])


def schedule(initial: float, decay_steps: int):
    return lambda count: initial / jnp.sqrt(1.0 + count / decay_steps)


def optimizer(run: Run, config, lr: float, mesh) -> optax.GradientTransformationExtraArgs:
    """The bilevel solver of ``run`` chained with its outer SGD (and gossip)."""
    spec = problem.problem(config.l2)
    inner = schedule(lr, config.decay_steps)
    outer = optax.sgd(schedule(config.outer_lr, config.decay_steps))
    if run.graph == CENTRALIZED:
        return optax.chain(bilevel.ma_soba(spec, inner, inner, config.average), outer)
    graph = build_topology(run)
    solver = bilevel.dsoba(
        spec, graph, inner, inner, config.average, first_order=run.first_order, mesh=mesh
    )
    return optax.chain(solver, outer, bilevel.gossip(graph, mesh=mesh))


def _batches(key, nodes: problem.NodeData, config):
    """This step's per-node minibatches: ``(idx, features, labels)`` and ``(features,
    labels)``, each with a leading node axis."""
    n, per_node = nodes.labels.shape
    k_in, k_out = jax.random.split(key)
    local = jax.random.randint(k_in, (n, config.inner_batch), 0, per_node)
    val = jax.random.randint(k_out, (n, config.outer_batch), 0, nodes.val_labels.shape[1])
    take = lambda a, i: jnp.take_along_axis(a, i.reshape(i.shape + (1,) * (a.ndim - 2)), axis=1)
    inner = (
        local + per_node * jnp.arange(n)[:, None],
        take(nodes.features, local),
        take(nodes.labels, local),
    )
    outer = (take(nodes.val_features, val), take(nodes.val_labels, val))
    return inner, outer


def _pooled(tree):
    """Node-axis batches concatenated into one batch (the centralized run's)."""
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), tree)


def make_train(run: Run, config, lr: float, mesh):
    """``train(nodes, key) -> records``: the whole run, jitted once."""
    tx = optimizer(run, config, lr, mesh)
    central = run.graph == CENTRALIZED
    chunks = config.num_steps // config.eval_every

    def evaluate(x, state, nodes):
        y = bilevel.inner_params(state)
        x_mean = x if central else jnp.mean(x, axis=0)
        hypergradient = problem.exact_hypergradient(x_mean, nodes, config.l2)
        per_node = lambda xi: jnp.sum(problem.exact_hypergradient(xi, nodes, config.l2) ** 2)
        return {
            "hypergradient_sq": jnp.sum(hypergradient**2),
            # What each node's own x is worth: (1/n) sum_i |grad F(x_i)|^2.
            "node_hypergradient_sq": (
                jnp.sum(hypergradient**2) if central else jnp.mean(jax.vmap(per_node)(x))
            ),
            "consensus_x": jnp.zeros(()) if central else bilevel.consensus_error(x),
            "consensus_y": jnp.zeros(()) if central else bilevel.consensus_error(y),
        }

    def train(nodes: problem.NodeData, key: jax.Array) -> dict[str, Any]:
        n, per_node = nodes.labels.shape
        x = jnp.zeros(n * per_node) if central else jnp.zeros((n, n * per_node))
        state = tx.init(x)

        def step(carry, t):
            x, state = carry
            inner, outer = _batches(jax.random.fold_in(key, t), nodes, config)
            if central:
                inner, outer = _pooled(inner), _pooled(outer)
            updates, state = tx.update(x, state, x, inner_batch=inner, outer_batch=outer)
            return (optax.apply_updates(x, updates), state), None

        def chunk(carry, c):
            steps = c * config.eval_every + jnp.arange(config.eval_every)
            carry, _ = jax.lax.scan(step, carry, steps)
            return carry, evaluate(*carry, nodes)

        (x, state), curves = jax.lax.scan(chunk, (x, state), jnp.arange(chunks))
        y = bilevel.inner_params(state)
        y_mean = y if central else jnp.mean(y, axis=0)
        x_mean = x if central else jnp.mean(x, axis=0)
        clean = ~jnp.asarray(nodes.corrupted).reshape(-1)
        weight = jax.nn.sigmoid(x_mean)
        final = {
            "test_acc": problem.test_accuracy(y_mean, nodes),
            "node_test_acc": (
                problem.test_accuracy(y, nodes)
                if central
                else jnp.mean(jax.vmap(lambda w: problem.test_accuracy(w, nodes))(y))
            ),
            "clean_weight": jnp.sum(weight * clean) / jnp.sum(clean),
            "corrupted_weight": jnp.sum(weight * ~clean) / jnp.maximum(jnp.sum(~clean), 1),
            "upper_objective": problem.upper_objective(x_mean, nodes, config.l2),
            "nonfinite": jnp.sum(bilevel.find_bilevel_state(state).nonfinite),
        }
        return {"curves": curves, "final": final}

    return jax.jit(train)


def seed_data(run: Run, config, seed: int) -> problem.NodeData:
    return problem.split_nodes(run.nodes, run.heterogeneity, config.noise, seed)


def inner_lr(nodes: problem.NodeData, config) -> float:
    """``beta = gamma = 1 / L`` (the config's rule)."""
    return 1.0 / problem.smoothness_bound(nodes, config.l2, config.inner_batch)


def train_run(run: Run, config, seeds: list[int], mesh) -> dict[str, Any]:
    """Every seed of ``run``; plain numpy records (curves per seed, finals per seed)."""
    datasets = [seed_data(run, config, seed) for seed in seeds]
    lr = min(inner_lr(nodes, config) for nodes in datasets)  # one step size per run
    train = make_train(run, config, lr, mesh)
    records = [
        jax.device_get(train(nodes, jax.random.key(seed)))
        for nodes, seed in zip(datasets, seeds, strict=True)
    ]
    stack = lambda *a: np.stack(a)
    out = jax.tree.map(stack, *records)
    out["inner_lr"] = lr
    out["zeta_sq"] = [problem.heterogeneity_measure(nodes, config.l2) for nodes in datasets]
    out["on_mesh"] = mesh is not None
    out["x_size"] = int(datasets[0].labels.size)  # one logit per training sample
    out["y_size"] = int(np.prod(problem.problem(config.l2).inner_init.shape))
    return out
