"""Communication graphs for decentralized optimisation: mixing matrix, neighbours, gap.

A :class:`Topology` describes ``n`` nodes that average with their neighbours: node ``i``
replaces a value by ``sum_j W[i, j] * value_j``. ``W`` is doubly stochastic (rows and
columns sum to one, entries >= 0), so averaging keeps the mean over nodes, and its graph
is connected, so repeated averaging reaches consensus at the rate
``rho = ||W - 11^T / n||_2`` per round. The *spectral gap* ``1 - rho`` is the usual
measure of how well a graph mixes (1 for the complete graph, ``O(1/n^2)`` for a ring).
For a symmetric ``W``, ``rho`` is the second-largest eigenvalue modulus.

The undirected graphs (:func:`ring`, :func:`torus`, :func:`complete`) use
Metropolis-Hastings weights ``W[i, j] = 1 / (1 + max(deg_i, deg_j))`` on each edge and
the rest on the diagonal: symmetric, doubly stochastic on any graph, and uniform
(``1 / (deg + 1)``) on regular ones, so a ring puts 1/3 on a node and each neighbour.
:func:`exponential` is the static exponential graph (node ``i`` averages itself and
the nodes ``i + 2^k mod n``, ``k < ceil(log2 n)``, with equal weights), which is
directed but doubly stochastic. :func:`from_matrix` takes any ``W`` and checks it.

For execution on a device mesh the matrix is split into *shifts*: for each offset
``s``, the weights ``W[i, (i + s) mod n]``. Every shift is a (partial) permutation of
the nodes, which is what ``jax.lax.ppermute`` sends, so a mixing round is one
``ppermute`` per offset that carries weight, each node sending only to its neighbours.

These are ours (the D-SOBA paper's full text is not available): the Metropolis weights,
the exponential graph's directed form (as in Ying et al. 2021,
https://arxiv.org/abs/2110.13363) and the torus shape (the most square factorisation).

Example:
  >>> from optstab.bilevel import topology
  >>> ring = topology.ring(8)
  >>> ring.matrix[0, :3].round(4), ring.neighbors[0]
  (array([0.3333, 0.3333, 0.    ]), (1, 7))
  >>> round(ring.spectral_gap, 4)  # 1 - (1/3 + 2/3 cos(2 pi / 8))
  0.1953
  >>> round(topology.exponential(8).spectral_gap, 4), topology.complete(8).spectral_gap
  (0.5, 1.0)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

_ATOL = 1e-6  # float32-entered matrices: row sums of a few float32 weights drift ~1e-7


@dataclasses.dataclass(frozen=True, eq=False)
class Topology:
    """A doubly stochastic mixing matrix of a connected graph over ``num_nodes`` nodes.

    Attributes:
      name: a label such as ``"ring"`` (used in reports).
      matrix: ``(n, n)`` float64, read-only: ``W[i, j]`` is the weight node ``i``
        gives to node ``j``'s value.
      neighbors: for each node ``i``, the nodes ``j != i`` it receives from
        (``W[i, j] > 0``), ascending.
      out_neighbors: for each node ``j``, the nodes ``i != j`` it sends to.
      spectral_gap: ``1 - ||W - 11^T / n||_2`` in ``(0, 1]``.
      self_weights: ``(n,)`` float64, the diagonal of ``W``.
      shifts: ``((s, weights), ...)`` for every offset ``s`` in ``1..n-1`` that carries
        weight, ``weights[i] = W[i, (i + s) mod n]`` (``(n,)`` float64).
    """

    name: str
    matrix: np.ndarray
    neighbors: tuple[tuple[int, ...], ...]
    out_neighbors: tuple[tuple[int, ...], ...]
    spectral_gap: float
    self_weights: np.ndarray
    shifts: tuple[tuple[int, np.ndarray], ...]

    @property
    def num_nodes(self) -> int:
        return self.matrix.shape[0]

    @property
    def max_degree(self) -> int:
        """The most nodes any node sends to in one round."""
        return max((len(out) for out in self.out_neighbors), default=0)

    def __repr__(self) -> str:
        return (
            f"Topology({self.name!r}, num_nodes={self.num_nodes}, "
            f"max_degree={self.max_degree}, spectral_gap={self.spectral_gap:.4g})"
        )


def from_matrix(matrix, name: str = "custom") -> Topology:
    """A :class:`Topology` from a user's mixing matrix, after checking it.

    Args:
      matrix: ``(n, n)`` array-like, nonnegative, rows and columns summing to one
        (within ``1e-6``), with a connected graph (every node reaches every other
        through entries ``> 0``) whose averaging converges (spectral gap ``> 0``).
      name: a label for reports.

    Raises:
      ValueError: naming what is wrong (shape, a negative or non-finite entry, the row
        or column whose sum is off, a node that cannot be reached, a zero gap).
    """
    w = np.array(matrix, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
        raise ValueError(f"a mixing matrix must be square (n, n) with n >= 1, got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("the mixing matrix has non-finite entries")
    if np.any(w < 0):
        i, j = np.argwhere(w < 0)[0]
        raise ValueError(f"the mixing matrix must be nonnegative: W[{i}, {j}] = {w[i, j]}")
    for axis, what in ((1, "row"), (0, "column")):
        sums = w.sum(axis=axis)
        bad = np.flatnonzero(np.abs(sums - 1.0) > _ATOL)
        if bad.size:
            raise ValueError(
                f"the mixing matrix is not doubly stochastic: {what} {bad[0]} sums to "
                f"{sums[bad[0]]:.6g} (every row and column must sum to 1)"
            )
    _check_connected(w > 0)
    gap = 1.0 - float(np.linalg.norm(w - 1.0 / w.shape[0], ord=2))
    if gap <= 1e-12:
        raise ValueError(
            "averaging with this matrix never reaches consensus (spectral gap 0, e.g. a "
            "periodic graph): give the nodes some weight on themselves"
        )
    return _build(name, w, gap)


def ring(n: int) -> Topology:
    """A cycle of ``n`` nodes (each talks to the next and the previous one)."""
    _check_nodes(n)
    edges = [(i, (i + 1) % n) for i in range(n)] if n > 1 else []
    return from_matrix(_metropolis(n, edges), "ring")


def torus(n: int, rows: int | None = None) -> Topology:
    """A 2-D torus of ``rows x (n / rows)`` nodes (four neighbours, wrapping around).

    Args:
      n: number of nodes.
      rows: number of rows, a divisor of ``n`` in ``[2, n / 2]``; default the largest
        divisor of ``n`` that is at most ``sqrt(n)`` (the most square grid).
    """
    _check_nodes(n)
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if not isinstance(rows, int) or rows < 2 or n % rows or n // rows < 2:
        raise ValueError(
            f"a torus of {n} nodes needs rows dividing n with 2 <= rows <= n / 2, got "
            f"rows={rows!r} (a prime n has no such grid: use ring({n}))"
        )
    cols = n // rows
    index = lambda r, c: (r % rows) * cols + (c % cols)
    edges = []
    for r in range(rows):
        for c in range(cols):
            edges += [(index(r, c), index(r, c + 1)), (index(r, c), index(r + 1, c))]
    return from_matrix(_metropolis(n, edges), f"torus{rows}x{cols}")


def exponential(n: int) -> Topology:
    """The static exponential graph: node ``i`` averages itself and ``i + 2^k mod n``.

    ``k = 0 .. ceil(log2 n) - 1``, all with weight ``1 / (1 + ceil(log2 n))``. For ``n`` a
    power of two its spectral gap is ``2 / (1 + log2 n)``.
    """
    _check_nodes(n)
    tau = math.ceil(math.log2(n)) if n > 1 else 0
    w = np.zeros((n, n))
    for i in range(n):
        for offset in [0] + [2**k for k in range(tau)]:
            w[i, (i + offset) % n] += 1.0 / (tau + 1)
    return from_matrix(w, "exponential")


def complete(n: int) -> Topology:
    """Every node averages all nodes equally (``W = 11^T / n``): exact averaging."""
    _check_nodes(n)
    return from_matrix(np.full((n, n), 1.0 / n), "complete")


# ----------------------------------------------------------------------------- helpers


def _check_nodes(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of nodes must be an int >= 1, got {n!r}")


def _metropolis(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """Metropolis-Hastings weights of the undirected graph with these edges."""
    adjacency = np.zeros((n, n), bool)
    for i, j in edges:
        if i != j:
            adjacency[i, j] = adjacency[j, i] = True
    degree = adjacency.sum(axis=1)
    w = np.where(adjacency, 1.0 / (1.0 + np.maximum(degree[:, None], degree[None, :])), 0.0)
    w[np.diag_indices(n)] = 1.0 - w.sum(axis=1)
    return w


def _check_connected(support: np.ndarray) -> None:
    """Every node reaches every other along edges (both directions: strongly connected)."""
    n = support.shape[0]
    for graph, direction in ((support, "from"), (support.T, "to")):
        seen = np.zeros(n, bool)
        seen[0] = True
        frontier = [0]
        while frontier:
            nxt = np.flatnonzero(graph[frontier].any(axis=0) & ~seen)
            seen[nxt] = True
            frontier = list(nxt)
        if not seen.all():
            missing = int(np.flatnonzero(~seen)[0])
            other = (
                f"node {missing} cannot be reached from node 0"
                if direction == "from"
                else (f"node 0 cannot be reached from node {missing}")
            )
            raise ValueError(f"the graph of the mixing matrix is not connected: {other}")


def _build(name: str, w: np.ndarray, gap: float) -> Topology:
    n = w.shape[0]
    off = w > 0
    np.fill_diagonal(off, False)
    shifts = []
    for s in range(1, n):
        weights = w[np.arange(n), (np.arange(n) + s) % n]
        if np.any(weights > 0):
            shifts.append((s, _frozen(weights)))
    return Topology(
        name=name,
        matrix=_frozen(w),
        neighbors=tuple(tuple(int(j) for j in np.flatnonzero(off[i])) for i in range(n)),
        out_neighbors=tuple(tuple(int(i) for i in np.flatnonzero(off[:, j])) for j in range(n)),
        spectral_gap=min(gap, 1.0),
        self_weights=_frozen(np.diag(w).copy()),
        shifts=tuple(shifts),
    )


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a
