"""Perturbed forward-backward SGD lab (arXiv 2602.20646, reconstructed).

* :mod:`~optstab.perturb.ops`: :func:`forward` / :func:`backward` perturbation operators.
* :mod:`~optstab.perturb.schedules`: perturbation-size schedules and per-step keys.
* :mod:`~optstab.perturb.composite`: :class:`Composite` models of N operators.
* :mod:`~optstab.perturb.sgd`: :func:`run_sgd`, paired clean/perturbed SGD runs.
* :mod:`~optstab.perturb.updates`: :func:`perturbed_updates`, an Optax transform.
"""

from optstab.perturb.composite import (
    Composite,
    Injection,
    Operator,
    Points,
    block_errors,
    block_norms,
    dense,
    jacobian_norms,
    linear,
    logistic_head,
)
from optstab.perturb.ops import MODES, PerturbSpec, backward, forward, make_spec, perturbation
from optstab.perturb.schedules import (
    as_schedule,
    constant,
    inverse,
    inverse_sqrt,
    operator_keys,
    poisson_spikes,
    spike,
)
from optstab.perturb.sgd import (
    DIVERGED,
    LINGERING,
    OUTCOMES,
    RECOVERED,
    Perturbation,
    SGDResult,
    SGDTrace,
    classify_outcome,
    run_sgd,
)
from optstab.perturb.updates import PerturbedUpdatesState, perturbed_updates

__all__ = [
    "DIVERGED",
    "LINGERING",
    "MODES",
    "OUTCOMES",
    "RECOVERED",
    "Composite",
    "Injection",
    "Operator",
    "Perturbation",
    "PerturbSpec",
    "Points",
    "PerturbedUpdatesState",
    "SGDResult",
    "SGDTrace",
    "as_schedule",
    "backward",
    "block_errors",
    "block_norms",
    "classify_outcome",
    "constant",
    "dense",
    "forward",
    "inverse",
    "inverse_sqrt",
    "jacobian_norms",
    "linear",
    "logistic_head",
    "make_spec",
    "operator_keys",
    "perturbation",
    "perturbed_updates",
    "poisson_spikes",
    "run_sgd",
    "spike",
]
