"""optstab: JAX/Optax toolkit for optimizer stability research.

The methods are reconstructed from the papers' abstracts (their full texts and code
are not available); see each module's docstring for what is ours.
"""

from optstab import bilevel, checkpoint, lowprec, perturb, tree, units
from optstab.stability import baselines
from optstab.stability.baselines import adagc, skip_step, spam, zclip
from optstab.stability.gnmr import (
    GNMRState,
    GNMRWrapState,
    find_gnmr_state,
    gnmr,
    gnmr_metrics,
    gnmr_wrap,
    recovery_mask,
)

__version__ = "0.1.0"

__all__ = [
    "GNMRState",
    "GNMRWrapState",
    "adagc",
    "bilevel",
    "baselines",
    "checkpoint",
    "find_gnmr_state",
    "gnmr",
    "gnmr_metrics",
    "gnmr_wrap",
    "lowprec",
    "perturb",
    "recovery_mask",
    "skip_step",
    "spam",
    "tree",
    "units",
    "zclip",
]
