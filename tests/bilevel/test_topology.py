"""Topologies: closed-form spectral gaps, double stochasticity, neighbours, bad matrices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optstab import bilevel
from optstab.bilevel import mixing, topology

EPS32 = float(np.finfo(np.float32).eps)


def _ring_gap(n: int) -> float:
    """Ring with weights 1/3: eigenvalues 1/3 + 2/3 cos(2 pi k / n); rho over k != 0."""
    eig = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(1, n)]
    return 1.0 - max(abs(e) for e in eig)


def _torus_gap(rows: int, cols: int) -> float:
    """rows, cols >= 3: weights 1/5; eigenvalues 1/5 + 2/5 cos(2pi k/rows) + 2/5 cos(2pi l/cols)."""
    eig = [
        0.2 + 0.4 * math.cos(2 * math.pi * k / rows) + 0.4 * math.cos(2 * math.pi * l / cols)
        for k in range(rows)
        for l in range(cols)  # noqa: E741
        if (k, l) != (0, 0)
    ]
    return 1.0 - max(abs(e) for e in eig)


# Closed forms are evaluated in float64 like the library's numpy: they agree to ~1e-12.
@pytest.mark.parametrize("n", [3, 4, 5, 8, 16, 64])
def test_ring_gap_matches_its_closed_form(n):
    assert topology.ring(n).spectral_gap == pytest.approx(_ring_gap(n), abs=1e-12)


@pytest.mark.parametrize(("n", "rows"), [(9, 3), (12, 3), (16, 4), (64, 8)])
def test_torus_gap_matches_its_closed_form(n, rows):
    topo = topology.torus(n, rows)
    assert topo.spectral_gap == pytest.approx(_torus_gap(rows, n // rows), abs=1e-12)
    assert all(len(nb) == 4 for nb in topo.neighbors)


@pytest.mark.parametrize("n", [2, 4, 8, 16, 64])
def test_exponential_gap_is_two_over_one_plus_log2_n(n):
    # Ying et al. 2021: for n a power of two the static exponential graph has
    # spectral gap 2 / (1 + log2 n).
    topo = topology.exponential(n)
    assert topo.spectral_gap == pytest.approx(2 / (1 + math.log2(n)), abs=1e-12)
    assert topo.max_degree == int(math.log2(n))


def test_complete_graph_averages_exactly_and_has_gap_one():
    topo = topology.complete(5)
    assert topo.spectral_gap == pytest.approx(1.0, abs=1e-12)
    assert topo.neighbors[2] == (0, 1, 3, 4)


@pytest.mark.parametrize(
    "topo",
    [topology.ring(7), topology.torus(12), topology.exponential(6), topology.complete(4)],
    ids=lambda t: t.name,
)
def test_every_topology_is_doubly_stochastic_and_lists_its_neighbours(topo):
    w = topo.matrix
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(w >= 0)
    for i in range(topo.num_nodes):
        expected = tuple(j for j in range(topo.num_nodes) if j != i and w[i, j] > 0)
        assert topo.neighbors[i] == expected
    if topo.name != "exponential":  # the undirected graphs are symmetric
        np.testing.assert_array_equal(w, w.T)


def test_ring_weights_are_one_third():
    w = topology.ring(6).matrix
    np.testing.assert_allclose(w[0], [1 / 3, 1 / 3, 0, 0, 0, 1 / 3], atol=1e-15)


def test_user_matrix_is_accepted_and_checked():
    w = np.array([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [0.25, 0.25, 0.5]])
    topo = topology.from_matrix(w, name="mine")
    assert topo.name == "mine" and topo.neighbors == ((1,), (0, 2), (0, 1))
    with pytest.raises(ValueError, match="column 0 sums to 1.5"):
        topology.from_matrix([[0.5, 0.5], [1.0, 0.0]])
    with pytest.raises(ValueError, match="row 0 sums to 0.9"):
        topology.from_matrix([[0.4, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="nonnegative"):
        topology.from_matrix([[1.5, -0.5], [-0.5, 1.5]])
    with pytest.raises(ValueError, match="not connected: node 2 cannot be reached"):
        topology.from_matrix(np.kron(np.eye(2), np.full((2, 2), 0.5)))
    with pytest.raises(ValueError, match="spectral gap 0"):
        topology.from_matrix([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="square"):
        topology.from_matrix(np.ones((2, 3)) / 3)


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="number of nodes"):
        topology.ring(0)
    with pytest.raises(ValueError, match="use ring\\(7\\)"):
        topology.torus(7)


def _random_tree(n):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"a": jax.random.normal(k1, (n, 3, 2)), "b": jax.random.normal(k2, (n,))}


@pytest.mark.parametrize(
    "topo", [topology.ring(8), topology.torus(8), topology.exponential(8)], ids=lambda t: t.name
)
def test_mixing_is_the_matrix_product(topo):
    tree = _random_tree(topo.num_nodes)
    mixed = jax.jit(lambda t: mixing.mix(topo, t))(tree)
    for got, leaf in zip(jax.tree.leaves(mixed), jax.tree.leaves(tree), strict=True):
        x = np.asarray(leaf, np.float64)
        want = np.einsum("ij,j...->i...", topo.matrix, x)
        # float32: each weight is rounded (eps/2 relative), each product and each of the
        # <= max_degree additions rounds once: |err| <= (deg + 2) eps sum_j w_ij |x_j|.
        bound = (topo.max_degree + 2) * EPS32 * np.einsum("ij,j...->i...", topo.matrix, abs(x))
        assert np.all(np.abs(np.asarray(got) - want) <= bound)


def test_gossip_mixes_params_plus_updates():
    topo = topology.ring(4)
    x = jnp.array([[0.0], [3.0], [6.0], [9.0]])
    u = jnp.ones_like(x)
    tx = bilevel.gossip(topo)
    out, _ = tx.update(u, tx.init(x), x)
    new = optax.apply_updates(x, out)
    want = topo.matrix @ np.asarray(x + u, np.float64)
    # Two float32 roundings of values <= 10 (the mix, then x + (mix - x)).
    np.testing.assert_allclose(new, want, rtol=0, atol=4 * EPS32 * 10)


def test_gossip_and_mix_reject_a_wrong_node_axis():
    tx = bilevel.gossip(topology.ring(4))
    x = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match="leading node axis of size 4"):
        tx.update(x, tx.init(x), x)
    with pytest.raises(ValueError, match="Topology"):
        bilevel.gossip(np.eye(3))
