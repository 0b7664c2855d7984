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
0. Idle perturbation points cost nothing: points that a ``Perturbation`` does not name
   are not built, so the tanh chain's full-batch step with them is bit-identical to the
   step without points (``bit_steps`` steps from the same parameters) and its median
   time is within ``zero_cost_ratio`` of it. Also checked: points that are built and
   named at a traced size 0 return their input exactly. Reported beside it, clearly
   apart (extra information, not idle points): the step time with every point named at
   size 0 (each a ``lax.cond``) and at a small size.
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
7. A persistent perturbation makes SGD stall or diverge (size sweep, tanh chain,
   non-convex regulariser). (a) A systematic error (bias mode at the output cotangent:
   every block's data gradient is scaled by 1 - c) breaks SGD once the relative
   gradient error reaches about 1 (the step then no longer points downhill). (b) Random
   relative noise at every operator's cotangent is zero-mean, so the step still points
   downhill on average; what it adds is variance. With ``E g_hat = g`` and
   ``E ||g_hat||^2 = (1 + eps^2) ||g||^2`` (``eps`` the root mean square relative
   error), the descent lemma on a problem whose Hessian's largest eigenvalue is ``L``
   along the step gives ``E f(w - eta g_hat) <= f(w) - eta ||g||^2 (1 - (1 + eps^2)
   eta L / 2)``: descent is guaranteed while ``(1 + eps^2) eta L < 2``, that is below
   ``eps* = sqrt(2 / (eta L) - 1)``, and is lost just above it only when the error
   points along the top curvature direction. Noise of relative size ``c`` at each of
   ``N`` cotangents compounds: the cotangent reaching block ``j`` has passed
   ``N - j + 1`` independent factors, each multiplying its expected squared norm by
   ``1 + c^2``, so ``eps`` grows up to ``sqrt((1 + c^2)^N - 1)`` and the bound in
   terms of ``c`` is ``(1 + c^2)^N eta L = 2``. The study measures ``eps`` per step
   rather than inferring it from ``c`` (the map from a cotangent to a weight gradient,
   ``z^T delta``, passes random noise far more weakly than the signal it is aligned
   with, so the compounded bound overstates ``eps`` several times), and ``L`` by power
   iteration on Hessian-vector products of the training objective at the runs' start
   and at the clean run's end (the larger). Prediction: the first size at which every
   run stalls or diverges has a median-over-seeds rms error near ``eps*``; the
   statement passes when their ratio is within ``prediction_ratio_range`` (a factor 2,
   as 7a). Reported beside it: whether any run failed below ``eps*`` (the descent
   lemma's guarantee), and the curvature the gradient error actually sees,
   ``kappa = d.Hd / d.d``. To second order the expected change is ``-eta ||g||^2 (1 -
   eta (g.Hg / g.g + kappa eps^2) / 2)``, so with ``kappa`` near 0 or below (the error
   lies in flat directions) the noise adds no loss at second order, the bound with
   ``L`` is loose, and the runs fail only where large, heavy-tailed kicks to the first
   blocks leave the quadratic model. Measured: ``kappa / L`` about -0.01 at both
   sizes; the first failing size's rms error is 16 ``eps*`` at quick size (the last
   size that held: 6.3) and 5.7 at full size (last held: 1.8, the sweep is coarse
   there): the statement fails.

Every run uses ``optstab.perturb``: the operators, ``Composite``, ``jacobian_norms`` and
``run_sgd`` (paired clean and perturbed runs sharing data order).

Stages: each section (locality, depth, linearity, rates, recovery, threshold, example,
zero_cost) is one checkpointed stage; every one draws its randomness from the config's
seeds alone, so a resumed run repeats the interrupted sections bit for bit (timings
aside).

Mesh: the probe batch of statements 1-4 and the SGD minibatches of statements 5 and 7
(and the example run) are split over the mesh's ``data`` axis. Passes over the whole
training split (full-batch gradient descent in statement 6 and for F*, the recorded
losses, statement 0's timed step) are not split: its 426 examples do not divide evenly
over a power of two. The parameter blocks (at most 30 x 30 entries) are far below
``parallel.FSDP_MIN_SIZE``, so they are replicated with or without ``fsdp``.

Modules: ``problems.py`` (the chains and shared probe pieces), ``probes.py``
(statements 1-4), ``runs.py`` (statements 0 and 5-7), ``statements.py`` (claims and
pass/fail), ``report.py`` (table and figure).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from benchmarks.harness import Context, Study, parallel, reporting
from benchmarks.harness.study import check_positive
from benchmarks.problems import data
from benchmarks.studies.perturbed_sgd import probes, runs
from benchmarks.studies.perturbed_sgd.problems import chain, convex, seed_keys
from benchmarks.studies.perturbed_sgd.report import plot, table
from benchmarks.studies.perturbed_sgd.statements import statements
from optstab import perturb

__all__ = ["STUDY", "plot", "run", "table"]

# Sections, each one stage: the single-step probes (statements 1-4) share one probe
# batch and give one record per seed; the others (statements 0, 5-7) one record each.
PROBES = (
    ("locality", probes.backward_locality),
    ("depth", probes.depth_sensitivity),
    ("linearity", probes.linearity),
)
SECTIONS = (
    ("rates", runs.rates),
    ("recovery", runs.recovery),
    ("threshold", runs.threshold),
    ("example", runs.example_run),
    ("zero_cost", runs.zero_scale_cost),
)
ALL_SECTIONS = tuple(name for name, _ in PROBES + SECTIONS)


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> None:
    """Checks the sections, sizes and batches, and builds the problems once."""
    unknown = set(config.sections) - set(ALL_SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {ALL_SECTIONS}")
    check_positive(config, "num_operators", "probe_keys", "rate_steps", "rate_seeds",
                   "spike_steps", "threshold_steps", "timing_repeats")  # fmt: skip
    for field in ("probe_batch", "rate_batch", "threshold_batch"):
        check_positive(config, field)
        parallel.check_batch(config[field], mesh, field)
    for kind in probes.PROBLEMS:
        chain(kind, config, forward_mode="relative", backward_mode="relative")
    convex(config, forward_mode="bias")


def name_outcomes(raw: dict) -> None:
    """Replaces the outcome codes of the recovery and example sections by their names
    (checkpointed stages hold numbers only)."""
    if "recovery" in raw:
        recovery = raw["recovery"]
        recovery["outcome"] = [perturb.OUTCOMES[int(o)] for o in recovery["outcome"]]
    for example in raw.get("example", {}).values():
        example["outcome"] = perturb.OUTCOMES[int(example["outcome"])]


def measure(plan: None, context: Context) -> dict:
    """Runs the chosen sections (one stage each) and judges the statements."""
    config, mesh = context.config, context.mesh
    split = data.breast_cancer(config.split_seed, config.test_fraction)
    x_all, y_all = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
    x_probe, y_probe = x_all[: config.probe_batch], y_all[: config.probe_batch]
    keys = seed_keys(config)
    chosen = [name for name in ALL_SECTIONS if name in config.sections]
    found = {}
    for name in context.each(chosen, desc="perturbed_sgd sections"):
        fn = dict(PROBES + SECTIONS)[name]
        args = (x_probe, y_probe, keys) if name in dict(PROBES) else (x_all, y_all)
        found[name] = context.stage(name, lambda fn=fn, args=args: fn(config, *args, mesh))
    per_seed = [
        {name: found[name][seed] for name, _ in PROBES if name in found}
        for seed in range(len(keys))
    ]
    raw = {"per_seed": per_seed, **{name: found[name] for name, _ in SECTIONS if name in found}}
    name_outcomes(raw)
    result_statements = statements(raw, config)
    summary = {
        "statements": result_statements,
        "passed": sum(bool(s["passed"]) for s in result_statements),
        "total": len(result_statements),
    }
    return reporting.to_jsonable({"summary": summary, "raw": raw}, digits=6)


STUDY = Study("perturbed_sgd", prepare, measure, table, plot)
run = STUDY.run
