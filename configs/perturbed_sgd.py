"""Config of the perturbed forward-backward SGD study (``benchmarks/studies/perturbed_sgd``).

    python -m benchmarks.run perturbed_sgd --config quick   # or tiny, full

How the numbers were set. Learning rates come from the Hessian's extreme eigenvalues
of the L2-regularised logistic problem on the training split (largest about 0.6,
smallest 0.1 at lambda = 0.05); step counts let the clean runs converge; sizes span
"harmless" to "broken". The settings of statements 5-7 were chosen in small prototypes
in which the measured values were visible; none was changed afterwards to move a
pass/fail. Changes made after the first full study run, and why: statement 4's
criterion (see the study's docstring), the number of data orders averaged in
statement 5 (``rate_seeds``, noise), and the quick sweep's ``threshold_steps`` (1500 ->
1000, run time; no statement changed outcome). Later (issue 17): statement 0 now times
idle points (not named, so not built) instead of points named at size 0, which the
library now builds only when named; statement 7b's expectation, written for a
systematic error, was replaced by the threshold derived for zero-mean noise (the
study's docstring), judged in the issue's factor-2 window, with no setting of the sweep
changed.
"""

from __future__ import annotations

import ml_collections

from configs import new_config

SECTIONS = (
    "locality",  # statement 1
    "depth",  # statements 2 and 4
    "linearity",  # statement 3
    "rates",  # statement 5
    "recovery",  # statement 6
    "threshold",  # statement 7
    "example",  # the plot's loss curves
    "zero_cost",  # statement 0
)


def get_config(size: str = "quick") -> ml_collections.ConfigDict:
    """``size`` is ``"tiny"`` (seconds), ``"quick"`` (CPU, under 3 minutes) or ``"full"``."""
    if size == "tiny":  # the quick config, made small; its batches divide by 8
        c = get_config("quick")
        c.size = "tiny"
        c.num_seeds, c.num_operators, c.probe_keys, c.probe_batch = 2, 3, 2, 8
        c.rate_steps, c.rate_seeds, c.optimum_steps = 300, 2, 300
        c.plateau_sizes, c.plateau_window = (0.1, 0.4), 20
        c.spike_steps, c.spike_t0, c.spike_sizes = 200, 20, (1.0, 10.0, 100.0)
        c.threshold_steps, c.threshold_sizes = 60, (0.5, 2.0)
        c.power_iterations, c.curvature_draws = 20, 2
        c.timing_repeats, c.bit_steps = 3, 2
        return c
    c = new_config(size)
    quick = size == "quick"
    c.seed = 0
    c.num_seeds = 3 if quick else 10
    c.split_seed = 0
    c.test_fraction = 0.25
    # The sections to run (each one checkpointed stage); a statement is reported when
    # the sections it needs ran. Fewer sections: a faster partial run (tests).
    c.sections = SECTIONS

    # The N-operator chains (statements 1-4, 7): N - 1 square operators on the 30
    # features, then a logistic head. "deep_linear": bias-free factors initialised as
    # gain x orthogonal (every L_i = gain > 1 at initialisation); "tanh": dense + tanh.
    c.num_operators = 6 if quick else 10
    c.linear_gain = 1.3
    c.probe_batch = 32  # examples in the single-step probes (exact Jacobian norms)
    c.probe_keys = 4 if quick else 16  # noise draws averaged per probe
    c.probe_size = 1e-3  # small perturbation of the depth and ratio probes (statements 2, 4)
    c.linearity_sizes = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # statement 3 fit range
    c.linearity_plot_sizes = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)

    # Convex problem (statements 5, 6): the chain with N = 1 (a logistic head), L2.
    c.l2_strength = 0.05
    # Statement 5: minibatch SGD with lr = 1 / (mu (t + lr_shift)), mu = 2 lambda; forward
    # bias-mode perturbation of the logit, constant or c / sqrt(t).
    c.rate_steps = 4000 if quick else 20000
    # Data orders averaged for the excess-loss curves. A single SGD curve is too noisy for
    # a slope: at 3 orders the clean slope came out -1.33 on the first quick run (8 orders
    # in a pre-run: -0.97), so the curves are averaged over more orders than the seeds of
    # statements 1-4.
    c.rate_seeds = 16 if quick else 64
    c.rate_batch = 16
    c.rate_lr_shift = 20.0
    c.rate_decay_size = 0.5
    c.plateau_sizes = (0.05, 0.1, 0.2, 0.4)
    c.plateau_window = 200  # steps averaged for the plateau level
    c.optimum_steps = 4000  # full-batch GD steps to find F*
    # Statement 6: full-batch GD, a one-off backward spike (absolute size S) at t0.
    c.spike_lr = 0.25
    c.spike_t0 = 300
    c.spike_steps = 1500 if quick else 3000
    c.spike_sizes = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4)
    c.tolerance = 0.05  # "recovered": loss within 5% of the clean run's
    c.divergence_factor = 10.0
    # Statement 7: SGD on the tanh chain with the non-convex regulariser, a persistent
    # perturbation of the backward pass; the size sweep is shared by both kinds.
    c.nonconvex_strength = 1e-3
    c.threshold_lr = 0.1
    c.threshold_batch = 32
    c.threshold_steps = 1000 if quick else 5000
    c.threshold_sizes = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 1.1, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0)
    c.stall_fraction = 0.5  # stalled: less than half of the clean run's loss decrease made
    # Statement 7b's prediction: power iterations on Hessian-vector products (the full
    # training objective, 4.7k / 8.4k parameters at quick / full), and noise draws for
    # the curvature along the gradient error.
    c.power_iterations = 300
    c.curvature_draws = 4

    # Example run for the loss-curve plot: Poisson spikes on the tanh chain.
    c.example_rate = 0.01
    c.example_size = 30.0
    c.example_duration = 3

    # Statement 0: timed rounds of the full-batch step (medians after compilation), and
    # the steps run from the same parameters with and without idle points (bits).
    c.timing_repeats = 100 if quick else 500
    c.bit_steps = 5

    # Pass criteria of the statements.
    c.zero_cost_ratio = 1.05  # statement 0: step time with idle points / without
    c.bound_tolerance = 1e-3  # statement 1: measured / bound <= 1 + this
    c.linearity_slope = (0.95, 1.05)  # statement 3
    c.rate_slope_gap = 0.2  # statement 5: |slope(decaying) - slope(clean)|
    c.plateau_exponent = (1.6, 2.4)  # statement 5
    c.recovery_r2 = 0.95  # statement 6
    c.recovery_slope_ratio = (0.8, 1.25)  # statement 6: fitted / predicted
    c.threshold_range = (0.5, 2.0)  # statement 7a: relative error at the break
    # Statement 7b: the first failing rms relative error over the predicted eps*: the
    # factor-2 window the issue gave the old criterion, kept as it was (the measured
    # ratio, about 16 at quick size, was known when it was chosen and fails it).
    c.prediction_ratio_range = (0.5, 2.0)
    return c
