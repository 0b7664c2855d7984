"""Decentralized bilevel optimisation: how topology, node count and heterogeneity delay D-SOBA.

Question. D-SOBA (:func:`optstab.bilevel.dsoba`, reconstructed from the abstract of
Kong, Zhu, Lu et al., https://arxiv.org/abs/2402.03167) runs single-loop bilevel steps on
``n`` nodes that only average with their graph neighbours. After a *transient* number of
iterations it should behave like the centralized solver on the pooled data; the paper's
analysis says the transient grows as the spectral gap shrinks, with ``n`` and with data
heterogeneity. This study measures those growths; it assumes no exponents.

Problem (:mod:`.problem`). Hyper-data cleaning of a ridge-regression classifier on
digits: the training and validation samples are dealt to the nodes with heterogeneity
``h`` (classes concentrated per node and per-node label-noise rates spread around
``noise``); ``x`` holds one weight logit per training sample, ``y`` the 65 x 10
classifier. The averaged lower problem has a closed-form solution, so the squared norm
of the exact hypergradient ``|grad F(mean_i x_i)|^2`` is the convergence measure.

Methods (:mod:`.train`). D-SOBA-SO (and -FO on ``config.first_order`` graphs) chained
with SGD on ``x`` and gossip, on ring, 2-D torus, exponential and complete graphs
(:mod:`optstab.bilevel.topology`); centralized MA-SOBA on the same minibatches pooled.
Decaying steps ``1 / sqrt(1 + t / decay_steps)``, step sizes by the config's rule.

Measured, per run and seed: the exact squared hypergradient norm, the consensus errors
of ``x`` and ``y`` every ``eval_every`` steps; test accuracy of the nodes' mean
classifier and of each node's own; the mean weight of clean and of corrupted samples;
the transient iterations against the centralized run of the same ``(n, h)`` and seed at
each factor of ``config.transient_factors`` (:func:`.report.transient_step`); bytes sent
per node per step; the measured heterogeneity ``zeta^2``
(:func:`.problem.heterogeneity_measure`). Fitted, per factor: power laws of
the transient against ``1 / gap`` (the graphs at ``num_nodes`` and the rings of the node
sweep; the complete graph left out: its gap is 1 and its run is the centralized one up to
rounding), against ``n`` (rings: ``n`` and the gap move together) and against ``zeta^2``
(the ring of the largest node count over ``heterogeneity``).

Devices. When the run has a mesh (``--mesh auto``, the default, with several devices)
of at least ``n`` devices, D-SOBA runs on a ``("nodes",)`` mesh of them, one node per
device (``shard_map`` + ``ppermute``); otherwise (``--mesh none``, or fewer devices than
nodes) the nodes are vmapped on one device. The two give the same numbers up to float32
reassociation (tests/benchmarks/studies/test_bilevel_decentralized.py).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from benchmarks.harness import Context, Study
from benchmarks.harness.study import check_positive
from benchmarks.studies.bilevel_decentralized import report, train
from benchmarks.studies.bilevel_decentralized.report import plot, table
from benchmarks.studies.bilevel_decentralized.train import CENTRALIZED, Run

__all__ = ["STUDY", "plot", "run", "table"]


def plan_runs(config: ml_collections.ConfigDict) -> dict[str, list[Run]]:
    """The runs of each sweep (a run may appear in several; it is trained once)."""
    n, h = config.num_nodes, config.sweep_heterogeneity
    return {
        "topology_sweep": [Run(g, n, h) for g in config.topologies],
        "node_sweep": [Run("ring", count, h) for count in config.node_counts],
        "heterogeneity_sweep": [
            Run("ring", max(config.node_counts, default=n), level) for level in config.heterogeneity
        ],
        "first_order": [Run(g, n, h, first_order=True) for g in config.first_order],
    }


def all_runs(config: ml_collections.ConfigDict) -> list[Run]:
    """Every distinct run, the centralized references included, in a fixed order."""
    runs: list[Run] = []
    for sweep in plan_runs(config).values():
        for r in sweep:
            for candidate in (r.reference, r):
                if candidate not in runs:
                    runs.append(candidate)
    return runs


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> list[Run]:
    """Checks the config and builds every graph and solver; returns the runs."""
    del mesh  # measure builds ("nodes",) meshes from the run's devices
    check_positive(config, "num_nodes", "node_counts", "inner_batch", "outer_batch")
    check_positive(config, "num_steps", "eval_every", "decay_steps", "outer_lr", "l2")
    check_positive(config, "smooth_evals")
    if not config.transient_factors or min(config.transient_factors) <= 1.0:
        raise ValueError(
            f"config.transient_factors must be factors > 1, got {config.transient_factors}"
        )
    if config.num_steps % config.eval_every:
        raise ValueError("config.num_steps must be a multiple of config.eval_every")
    if not 0.0 <= min(config.heterogeneity) <= max(config.heterogeneity) <= 1.0:
        raise ValueError(
            f"config.heterogeneity levels must be in [0, 1], got {config.heterogeneity}"
        )
    if not 0.0 <= config.noise < 1.0:
        raise ValueError(f"config.noise must be in [0, 1), got {config.noise}")
    unknown = set(config.topologies) | set(config.first_order)
    unknown -= set(train.TOPOLOGIES)
    if unknown:
        raise ValueError(
            f"unknown topologies {sorted(unknown)}; choose from {list(train.TOPOLOGIES)}"
        )
    runs = all_runs(config)
    for r in runs:
        if r.graph != CENTRALIZED:
            train.build_topology(r)  # a torus of a prime n, say, fails here
        train.optimizer(r, config, 0.1, None)
    return runs


def measure(runs: list[Run], context: Context) -> dict:
    config = context.config
    seeds = list(range(config.num_seeds))
    raw = {}
    for r in context.each(runs, lambda r: r.name):
        mesh = None if r.graph == CENTRALIZED else train.node_mesh(r.nodes, context.mesh)
        raw[r.name] = context.stage(
            r.name, lambda r=r, mesh=mesh: train.train_run(r, config, seeds, mesh)
        )
    summaries = {r.name: summarize(r, raw, config) for r in runs}
    sweeps = {}
    for key, sweep in plan_runs(config).items():
        names = [r.name for r in sweep]
        xs = {
            "topology_sweep": [1.0 / summaries[n]["spectral_gap"] for n in names],
            "heterogeneity_sweep": [summaries[n]["zeta_sq"] for n in names],
            "node_sweep": [float(r.nodes) for r in sweep],
            "first_order": [0.0 for _ in names],
        }[key]
        sweeps[key] = {
            "runs": names,
            "reference": sweep[0].reference.name if sweep else None,
            "x": xs,
            "transient": {
                f: [summaries[n]["transient_steps"][f] for n in names]
                for f in transient_keys(config)
            },
        }
    summary = {"runs": summaries, **sweeps, "fits": fit_transients(config, summaries, sweeps)}
    return {"summary": summary, "raw": raw}


def transient_keys(config) -> list[str]:
    """The summary's keys of ``config.transient_factors`` ("1.1", "2", ...)."""
    return [f"{f:g}" for f in config.transient_factors]


def fit_transients(config, summaries: dict, sweeps: dict) -> dict:
    """Per factor: power laws of the measured transients against ``1 / gap`` (the
    graphs at ``num_nodes`` and the rings of the node sweep, the complete graph left
    out), ``n`` (rings) and ``zeta^2`` (the heterogeneity sweep). Transients that are
    censored or within from the first evaluation are not measurements and are left out."""
    gap_runs = [
        n
        for n in dict.fromkeys(sweeps["topology_sweep"]["runs"] + sweeps["node_sweep"]["runs"])
        if summaries[n]["graph"] != "complete"
    ]

    def measured(name, factor):
        steps = summaries[name]["transient_steps"][factor]
        return steps if steps is not None and steps > config.eval_every else None

    fits = {}
    for f in transient_keys(config):
        fits[f] = {
            "inverse_gap": report.power_fit(
                [1.0 / summaries[n]["spectral_gap"] for n in gap_runs],
                [measured(n, f) for n in gap_runs],
            ),
            "nodes": report.power_fit(
                sweeps["node_sweep"]["x"], [measured(n, f) for n in sweeps["node_sweep"]["runs"]]
            ),
            "heterogeneity": report.power_fit(
                sweeps["heterogeneity_sweep"]["x"],
                [measured(n, f) for n in sweeps["heterogeneity_sweep"]["runs"]],
            ),
        }
    return fits


def summarize(r: Run, raw: dict, config) -> dict[str, Any]:
    """One run's medians over seeds, and its transient against its centralized run (on
    the seeds' geometric-mean curves; per seed too)."""
    data, final = raw[r.name], raw[r.name]["final"]
    curves = np.asarray(data["curves"]["node_hypergradient_sq"])
    smooth = [np.exp(report.smoothed_log(c, config.smooth_evals))[-1] for c in curves]
    central = r.graph == CENTRALIZED
    if central:
        transient, transients, gap, sent = None, None, None, None
    else:
        reference = np.asarray(raw[r.reference.name]["curves"]["node_hypergradient_sq"])

        def steps(run_curve, reference_curve, factor):
            return report.transient_step(
                run_curve, reference_curve, config.eval_every, factor, config.smooth_evals
            )

        run_mean, reference_mean = report.geometric_mean(curves), report.geometric_mean(reference)
        factors = zip(transient_keys(config), config.transient_factors, strict=True)
        transient, transients = {}, {}
        for key, f in factors:
            transient[key] = steps(run_mean, reference_mean, f)
            transients[key] = [steps(c, ref, f) for c, ref in zip(curves, reference, strict=True)]
        graph = train.build_topology(r)
        gap = graph.spectral_gap
        sent = report.bytes_per_node_step(graph, data["x_size"], data["y_size"])
    median = lambda v: float(np.median(np.asarray(v)))
    return {
        "graph": r.graph,
        "nodes": r.nodes,
        "heterogeneity": r.heterogeneity,
        "first_order": r.first_order,
        "spectral_gap": gap,
        "zeta_sq": median(data["zeta_sq"]),
        "inner_lr": data["inner_lr"],
        "on_mesh": bool(data["on_mesh"]),
        "test_acc": median(final["test_acc"]),
        "node_test_acc": median(final["node_test_acc"]),
        "clean_weight": median(final["clean_weight"]),
        "corrupted_weight": median(final["corrupted_weight"]),
        "consensus_x": median(np.asarray(data["curves"]["consensus_x"])[:, -1]),
        "consensus_y": median(np.asarray(data["curves"]["consensus_y"])[:, -1]),
        "final_hypergradient_sq": median(smooth),
        "transient_steps": transient,
        "transient_per_seed": transients,
        "bytes_per_node_step": sent,
        "nonfinite_steps": int(np.sum(final["nonfinite"])),
    }


STUDY = Study("bilevel_decentralized", prepare, measure, table, plot)
run = STUDY.run
