"""Runs D-SOBA on 8 simulated CPU devices (one node each) and on one device.

Started by tests/bilevel/test_dsoba.py in a subprocess with
``--xla_force_host_platform_device_count=8``; writes the final x of both executions and
the collective ops of the compiled mesh program as JSON.
"""

import json
import sys

import jax

from optstab.bilevel import topology

HERE = __file__.rsplit("/", 1)[0]
sys.path[:0] = [HERE, HERE.rsplit("/", 1)[0]]  # tests/bilevel (test_dsoba), tests (conformance)
import test_dsoba as t  # noqa: E402


def collective_ops(topo, mesh, inner_batch, outer_batch) -> dict[str, int]:
    import jax.numpy as jnp
    import optax

    from optstab import bilevel

    tx = optax.chain(
        bilevel.dsoba(t.PROBLEM, topo, 0.2, 0.2, 0.5, mesh=mesh),
        optax.sgd(0.2),
        bilevel.gossip(topo, mesh=mesh),
    )
    x = jnp.zeros((topo.num_nodes, t.DIM))
    step = jax.jit(
        lambda x, s: tx.update(x, s, x, inner_batch=inner_batch, outer_batch=outer_batch)
    )
    text = step.lower(x, tx.init(x)).compile().as_text()
    names = ("collective-permute", "all-gather", "all-to-all", "all-reduce")
    return {name: text.count(f"{name}(") + text.count(f"{name}-start(") for name in names}


def main(path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("nodes",))
    inner_batch, outer_batch, _ = t.heterogeneous_nodes(8)
    result = {}
    cases = (
        ("ring", topology.ring(8), False),
        ("exponential", topology.exponential(8), False),
        ("ring_fo", topology.ring(8), True),
    )
    for name, topo, first_order in cases:
        kw = {"first_order": first_order}
        one, _ = t.run(topo, 0.2, 20, inner_batch, outer_batch, **kw)
        on_mesh, _ = t.run(topo, 0.2, 20, inner_batch, outer_batch, mesh=mesh, **kw)
        result[name] = {"one": one.tolist(), "mesh": on_mesh.tolist()}
        if not first_order:
            result[name]["ops"] = collective_ops(topo, mesh, inner_batch, outer_batch)
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
