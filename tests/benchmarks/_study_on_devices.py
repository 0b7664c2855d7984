"""Runs a benchmark study on a tiny config twice (a ``("data",)`` mesh over every
device, then no mesh) and writes both results as JSON.

Started through ``conformance.run_on_eight_devices`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``::

    python tests/benchmarks/_study_on_devices.py OUT.json STUDY MODULE:FUNCTION [fsdp]

``MODULE:FUNCTION`` (a module under tests/benchmarks/) returns the study's tiny
config. The JSON holds ``{"devices": n, "sharded": result, "single": result,
"batch_shardings": k}``, where ``k`` counts the calls of ``parallel.shard_batch`` and
``parallel.batch_constraint`` with a mesh (0 would mean the study never split a
batch), or ``{"error": traceback}`` if the run raised.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # the repository root, this folder

import jax  # noqa: E402

from benchmarks import parallel, reporting  # noqa: E402


def count_batch_shardings() -> list:
    """Wraps the two batch-splitting helpers so calls with a mesh are counted."""
    calls = []

    def counted(function):
        def wrapper(tree, mesh, *args, **kwargs):
            if mesh is not None:
                calls.append(function.__name__)
            return function(tree, mesh, *args, **kwargs)

        return wrapper

    parallel.shard_batch = counted(parallel.shard_batch)
    parallel.batch_constraint = counted(parallel.batch_constraint)
    return calls


def main(out: str, study: str, config_fn: str, *flags: str) -> None:
    calls = count_batch_shardings()
    try:
        module, function = config_fn.split(":")
        config = getattr(importlib.import_module(module), function)()
        run = importlib.import_module(f"benchmarks.{study}").run
        fsdp = "fsdp" in flags
        sharded = run(config, mesh=parallel.data_mesh(), fsdp=fsdp)
        single = run(config, mesh=None)
        payload = {
            "devices": jax.device_count(),
            "sharded": sharded,
            "single": single,
            "batch_shardings": len(calls),
        }
    except Exception:  # noqa: BLE001 - reported to the test through the file
        payload = {"error": traceback.format_exc()}
    Path(out).write_text(json.dumps(reporting.to_jsonable(payload, digits=None)))


if __name__ == "__main__":
    main(*sys.argv[1:])
