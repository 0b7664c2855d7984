"""Trains the lowprec_lm study's model on 8 simulated CPU devices and on one; writes a .npz.

Started by ``test_lowprec_lm.py::test_data_parallel_matches_one_device`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``::

    python tests/benchmarks/_lowprec_sharded_worker.py OUT.npz

For ``none`` and ``gnmr_precision`` it runs the study's ``train_method`` on a tiny
config twice: with the batch sharded over a ``("data",)`` mesh of 8 devices, and with no
mesh; then ``none`` on a wider model with its large kernels split over the devices
(FSDP). Keys ``<method>/<sharded|single>/<trace>`` and ``fsdp/...``; ``error`` holds a
traceback instead if the run raised.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from lowprec_tiny import tiny_config  # noqa: E402

from benchmarks import lm, lowprec_lm, parallel  # noqa: E402


def main(out: str) -> None:
    results: dict[str, np.ndarray] = {}
    try:
        assert jax.device_count() == 8, jax.devices()
        config = tiny_config()
        corpus = lm.stdlib_corpus(config.val_fraction)
        val = lm.val_windows(corpus.val, config.val_windows, config.context + 1)
        inputs = lowprec_lm.make_inputs(config, corpus, bursts=True)
        quant = lowprec_lm.lowprec.quant_config(**config.quant)
        mesh = parallel.data_mesh()
        assert mesh is not None and mesh.devices.size == 8
        for name in ("none", "gnmr_precision"):
            for label, m in (("sharded", mesh), ("single", None)):
                out_m = lowprec_lm.train_method(name, config, quant, inputs, val, mesh=m)
                for key in ("val_curve", "loss", "high_precision"):
                    results[f"{name}/{label}/{key}"] = np.asarray(out_m[key])
        # FSDP: a wider model whose MLP kernels (64 x 256) are split over the 8 devices.
        config.width, config.mlp_width = 64, 256
        model = lowprec_lm.model_fns(config, quant)
        shardings = parallel.param_shardings(model.initial[0], mesh, fsdp=True, leading_axes=1)
        specs = [s.spec for s in jax.tree.leaves(shardings)]
        results["fsdp/split_leaves"] = np.array(sum(parallel.DATA in spec for spec in specs))
        for label, m in (("sharded", mesh), ("single", None)):
            out_m = lowprec_lm.train_method("none", config, quant, inputs, val, mesh=m, fsdp=True)
            results[f"fsdp/{label}/val_curve"] = np.asarray(out_m["val_curve"])
    except Exception:  # noqa: BLE001 - reported to the test through the file
        results = {"error": np.array(traceback.format_exc())}
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
