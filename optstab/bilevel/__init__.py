"""Single-loop stochastic bilevel optimisation: SOBA, MA-SOBA and BROS.

All three are Optax transforms over the upper variable ``x``; see
:mod:`optstab.bilevel.soba` and :mod:`optstab.bilevel.bros`.
"""

from optstab.bilevel import oracles, subspace
from optstab.bilevel.bros import bros
from optstab.bilevel.problem import BilevelProblem, BilevelState
from optstab.bilevel.soba import find_bilevel_state, inner_params, ma_soba, soba

__all__ = [
    "BilevelProblem",
    "BilevelState",
    "bros",
    "find_bilevel_state",
    "inner_params",
    "ma_soba",
    "oracles",
    "soba",
    "subspace",
]
