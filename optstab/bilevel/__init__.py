"""Single-loop stochastic bilevel optimisation: SOBA, MA-SOBA, BROS and D-SOBA.

All are Optax transforms over the upper variable ``x``; see :mod:`optstab.bilevel.soba`,
:mod:`optstab.bilevel.bros` and, for the decentralized D-SOBA over a graph of nodes,
:mod:`optstab.bilevel.dsoba`, :mod:`optstab.bilevel.topology` and
:mod:`optstab.bilevel.mixing` (``gossip``).
"""

from optstab.bilevel import mixing, oracles, subspace, topology
from optstab.bilevel.bros import bros
from optstab.bilevel.dsoba import consensus_error, dsoba
from optstab.bilevel.mixing import gossip
from optstab.bilevel.problem import BilevelProblem, BilevelState
from optstab.bilevel.soba import find_bilevel_state, inner_params, ma_soba, soba

__all__ = [
    "BilevelProblem",
    "BilevelState",
    "bros",
    "consensus_error",
    "dsoba",
    "find_bilevel_state",
    "gossip",
    "inner_params",
    "ma_soba",
    "mixing",
    "oracles",
    "soba",
    "subspace",
    "topology",
]
