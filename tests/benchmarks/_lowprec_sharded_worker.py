"""Trains the lowprec_lm study's model on 8 simulated CPU devices and on one; writes a .npz.

Started by ``test_lowprec_lm.py::test_data_parallel_and_fsdp_match_one_device`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``::

    python tests/benchmarks/_lowprec_sharded_worker.py OUT.npz

On the tiny config it runs the study's ``train_method`` for ``reference`` (float32)
and ``none`` (int8) twice: with the batch sharded over a
``("data",)`` mesh of 8 devices, and with no mesh; then ``reference`` and ``none`` on a
wider model whose large kernels are split over the devices (FSDP), twice likewise.
Keys ``<dp|fsdp>/<method>/<sharded|single>/<trace>`` (traces ``loss`` and
``val_curve``), ``fsdp/split_leaves`` and ``fsdp/mlp_width``; ``error`` holds a
traceback instead if the run raised.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks.harness import parallel  # noqa: E402
from benchmarks.problems import lm  # noqa: E402
from benchmarks.studies.lowprec_lm import stress, train  # noqa: E402
from configs import lowprec_lm  # noqa: E402
from optstab import lowprec  # noqa: E402

TRACES = ("loss", "val_curve")


def programs_for(config, mesh, fsdp=False) -> dict:
    """One compiled program per place (``reference`` and ``none`` share it)."""
    return {"sharded": train.Programs(config, mesh, fsdp), "single": train.Programs(config)}


def train_both(results, label, names, config, programs) -> None:
    corpus = lm.stdlib_corpus(config.val_fraction)
    val = lm.val_windows(corpus.val, config.val_windows, config.context + 1)
    inputs = stress.make_inputs(config, corpus, config.quantizer_outliers.layers, real=False)
    quant = lowprec.quant_config(**config.quant)
    for name in names:
        for where in ("sharded", "single"):
            out = train.train_method(name, config, quant, inputs, val,
                                     programs=programs[where])  # fmt: skip
            for key in TRACES:
                results[f"{label}/{name}/{where}/{key}"] = np.asarray(out[key])


def main(out: str) -> None:
    results: dict[str, np.ndarray] = {}
    try:
        assert jax.device_count() == 8, jax.devices()
        mesh = parallel.data_mesh()
        config = lowprec_lm.get_config("tiny")
        train_both(results, "dp", ("reference", "none"), config, programs_for(config, mesh))
        # FSDP: a wider model whose MLP kernels (64 x 256) are split over the 8 devices.
        config.width, config.mlp_width = 64, 256
        programs = programs_for(config, mesh, fsdp=True)
        initial = programs["single"].model(lowprec.quant_config(**config.quant)).initial[0]
        shardings = parallel.param_shardings(initial, mesh, fsdp=True, leading_axes=1)
        specs = [s.spec for s in jax.tree.leaves(shardings)]
        results["fsdp/split_leaves"] = np.array(sum(parallel.DATA in spec for spec in specs))
        results["fsdp/mlp_width"] = np.array(config.mlp_width)
        train_both(results, "fsdp", ("reference", "none"), config, programs)
    except Exception:  # noqa: BLE001 - reported to the test through the file
        results = {"error": np.array(traceback.format_exc())}
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
