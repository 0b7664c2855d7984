"""Runs a benchmark study on its tiny config twice (a ``("data",)`` mesh over every
device, then no mesh) and writes both results as JSON.

Started through ``conformance.run_on_eight_devices`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``::

    python tests/benchmarks/_study_on_devices.py OUT.json STUDY [KEY=VALUE ...]

``KEY=VALUE`` overrides a field of the tiny config as the command line's
``--config.KEY=VALUE`` does. The JSON holds ``{"devices": n, "sharded": result,
"single": result, "batch_shardings": k}``, where ``k`` counts the calls of
``parallel.shard_batch`` and ``parallel.batch_constraint`` with a mesh (0 would mean
the study never split a batch), or ``{"error": traceback}`` if the run raised.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import jax  # noqa: E402

from benchmarks import run as runner  # noqa: E402
from benchmarks import studies  # noqa: E402
from benchmarks.harness import parallel, reporting  # noqa: E402


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


def main(out: str, study: str, *overrides: str) -> None:
    calls = count_batch_shardings()
    try:
        config = importlib.import_module(f"configs.{study}").get_config("tiny")
        for item in overrides:
            runner.apply_override(config, *item.split("=", 1), study)
        run = studies.load(study).run
        sharded = run(config, mesh=parallel.data_mesh())
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
