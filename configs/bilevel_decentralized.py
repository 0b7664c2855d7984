"""Configuration of the decentralized bilevel study (``benchmarks/studies/bilevel_decentralized``).

    python -m benchmarks.run bilevel_decentralized --config quick   # or tiny, full

The problem is hyper-data cleaning of a ridge-regression classifier on digits, split over
``n`` nodes (see the study's docstring). Rules, written before any run was looked at:

* Heterogeneity ``h`` in [0, 1] (``heterogeneity``): node shards are contiguous chunks of
  the training (and validation) samples sorted by the key ``h * label + (1 - h) * 10 * u``
  (``u`` uniform per sample): ``h = 0`` is an iid split, ``h = 1`` gives each node one or
  two classes. Node ``i``'s label-noise rate is ``noise * (1 + h * (2 i / (n - 1) - 1))``
  (all ``noise`` when ``h = 0``, from 0 to ``2 noise`` when ``h = 1``).
* Step sizes: ``beta = gamma = 1 / L`` with ``L`` the data's bound on the minibatch
  smoothness of the lower problem (the largest node's ``lambda_max(A^T A / N)``, plus the
  largest squared feature norm over the batch size, plus ``l2``; the weights are at most
  1), all decaying as ``1 / sqrt(1 + t / decay_steps)`` (the setting in which a
  decentralized run catches up with a centralized one). ``outer_lr`` is the one value
  chosen by looking at a run: centralized MA-SOBA only, tuning seed 100, the iid split,
  final validation loss over ``{10, 30, 100, 300}`` at the quick size (30, 100 and 300
  within 1%; 100 kept); D-SOBA and the reported seeds were not looked at.
* Transient iterations: the first evaluated step after which the decentralized run's
  curve stays within a factor of the centralized run's on the same
  minibatches. The curve is what the nodes hold: ``(1/n) sum_i |grad F(x_i)|^2``, the
  exact hypergradient of the averaged problem at each node's own ``x``, its geometric
  mean over seeds, smoothed as a running geometric mean over ``smooth_evals``
  evaluations. The factor is a choice, so every factor of ``transient_factors`` is
  reported, each with its own fits. A run still outside at its last evaluation is
  censored (``null``); one never outside is within from the first evaluation (``<=
  eval_every``, reported as ``eval_every``). Neither enters a fit.

Sweeps. At 8 nodes every graph stays within a few percent of the centralized run on
this problem (a first look at the quick size, h = 0 and 1, batches 8 and 64: the
consensus error is small next to the minibatch noise), so the node-count sweep uses
rings, whose gap falls as ``1/n^2``, and the heterogeneity sweep runs on the ring of the
largest node count.
"""

from __future__ import annotations

import ml_collections

from configs import new_config


def get_config(size: str = "quick") -> ml_collections.ConfigDict:
    """``size`` is ``"tiny"`` (seconds), ``"quick"`` (2-core CPU, under 3 minutes) or
    ``"full"`` (one GPU host; up to 64 nodes)."""
    c = new_config(size)
    quick = size != "full"
    c.num_seeds = 3 if quick else 5
    c.num_nodes = 8  # the topology comparison (and D-SOBA-FO)
    c.topologies = ("ring", "torus", "exponential", "complete")
    c.sweep_heterogeneity = 0.5  # the h of the topology and node-count sweeps
    c.node_counts = (8, 16, 32) if quick else (8, 16, 32, 64)  # rings: gap 0.195 .. 0.003
    c.heterogeneity = (0.0, 0.5, 1.0)  # on the ring of the largest node count
    c.first_order = ("ring",)  # D-SOBA-FO beside -SO on these topologies (at n, sweep h)
    c.noise = 0.4  # mean label-noise rate
    c.l2 = 1e-2
    c.inner_batch = 8  # per node and step
    c.outer_batch = 8
    c.num_steps = 1500 if quick else 10000
    c.eval_every = 10 if quick else 25
    c.decay_steps = 100
    c.outer_lr = 100.0
    c.average = 0.1  # theta of the moving average (MA-SOBA's default)
    c.transient_factors = (1.1, 1.5, 2.0)
    c.smooth_evals = 10
    if size == "tiny":  # five runs: centralized, ring -SO/-FO, complete, exponential
        c.num_seeds = 2
        c.topologies = ("ring", "complete", "exponential")
        c.heterogeneity = (0.5,)
        c.node_counts = (8,)
        c.num_steps, c.eval_every, c.smooth_evals = 40, 10, 2
    return c
