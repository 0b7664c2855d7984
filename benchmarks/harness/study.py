"""The study protocol: what a study writes, and what the harness does with it.

A study (``benchmarks/studies/<name>``) is a :class:`Study`: a name and four functions,
read like a paper's experiment section (AlgoPerf keeps workload, algorithm and runner
apart in the same way):

* ``prepare(config, mesh) -> plan``: checks the *whole* config and builds what the
  measurements need: the methods (so the library's own ``ValueError`` fires for a bad
  hyperparameter), the problem, sizes that must divide the mesh. It trains nothing,
  compiles nothing and writes nothing: a rejected config costs a second and leaves no
  checkpoint behind. The plan is anything the study likes.
* ``measure(plan, context) -> parts``: the measurements, in checkpointed
  ``context.stage``s (:mod:`benchmarks.harness.context`). ``parts`` is a dict with at
  least ``summary`` (the numbers the table shows, goal checks under ``summary.goal``)
  and usually ``raw`` (per-seed data, curves).
* ``table(result) -> str``: the one-screen summary.
* ``plot(result, path) -> Path``: the figure.

The harness owns the rest: the mesh (resolved before ``prepare``), the checkpointer and
its lifetime, the timing of stages, and the result envelope::

    {"study", "config", "environment", "mesh", "timing_s": {"total", "stages"}, **parts}

converted to plain JSON types (:func:`benchmarks.harness.reporting.to_jsonable`).

``Study.run(config, *, checkpoint_dir=None, mesh="auto", fsdp=False) -> dict`` is the
Python entry point of every study (notebooks call it); the command-line runner
(:mod:`benchmarks.run`) calls ``prepare`` for every study it was asked for before it
claims a checkpoint directory or trains anything, then :meth:`Study.execute`.

Example:

    >>> import ml_collections
    >>> from benchmarks.harness import Study
    >>> def prepare(config, mesh):
    ...     if config.n < 1:
    ...         raise ValueError(f"n must be >= 1, got {config.n}")
    ...     return list(range(config.n))
    >>> def measure(plan, context):
    ...     total = context.stage("sum", lambda: {"total": sum(plan)})
    ...     return {"summary": total}
    >>> study = Study("demo", prepare, measure, table=str, plot=None)
    >>> result = study.run(ml_collections.ConfigDict({"n": 4}), mesh=None)
    >>> result["study"], result["summary"], list(result["timing_s"]["stages"])
    ('demo', {'total': 6}, ['sum'])
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from benchmarks.harness import parallel, reporting, resume
from benchmarks.harness.context import Context

__all__ = ["Study", "check_common", "check_positive"]


def check_common(config: ml_collections.ConfigDict) -> None:
    """Checks every study shares: ``num_seeds >= 1`` where the config has seeds."""
    if "num_seeds" in config:
        check_positive(config, "num_seeds")


def check_positive(config: ml_collections.ConfigDict, *fields: str) -> None:
    """A ``ValueError`` naming the first field (a number, or a tuple of them, such as
    layer widths) of ``fields`` that is not positive."""
    for field in fields:
        value = config[field]
        values = value if isinstance(value, tuple | list) else (value,)
        if not all(v > 0 for v in values):
            raise ValueError(f"config.{field} must be positive, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Study:
    """A study: its name, ``prepare``, ``measure``, ``table`` and ``plot`` (see above)."""

    name: str
    prepare: Callable[[ml_collections.ConfigDict, Any], Any]
    measure: Callable[[Any, Context], dict]
    table: Callable[[dict], str]
    plot: Callable[[dict, Any], Path]

    def check(self, config: ml_collections.ConfigDict, mesh: Any) -> Any:
        """The common checks, then ``prepare``: the plan, or a ``ValueError``."""
        check_common(config)
        return self.prepare(config, mesh)

    def execute(self, plan: Any, context: Context) -> dict:
        """Runs ``measure`` and wraps its parts in the result envelope (JSON types)."""
        start = time.perf_counter()
        parts = self.measure(plan, context)
        envelope = {
            "study": self.name,
            "config": context.config,
            "environment": reporting.environment(),
            "mesh": parallel.describe(context.mesh),
            "timing_s": {
                "total": time.perf_counter() - start,
                "stages": context.stage_seconds,
            },
        }
        return reporting.to_jsonable({**envelope, **parts})

    def run(
        self,
        config: ml_collections.ConfigDict,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        mesh: Any = "auto",
        fsdp: bool = False,
    ) -> dict:
        """Runs the study and returns its JSON-ready result.

        Args:
          config: ``configs/<study>.py``'s ``get_config(size)`` (``"tiny"``,
            ``"quick"`` or ``"full"``), possibly edited.
          checkpoint_dir: None (no checkpoints) or a directory: each finished stage is
            saved there, and a rerun with the same config, code and devices resumes
            from it; the directory is removed when the run completes.
          mesh: ``"auto"`` (data parallel over all devices when there are several),
            None (one device) or a ``jax.sharding.Mesh`` with a ``data`` axis (see
            :mod:`benchmarks.harness.parallel`).
          fsdp: with a mesh, also split large parameter leaves over its ``data`` axis.

        Raises:
          ValueError: the config (or the mesh) is rejected; nothing ran and nothing
            was written.
        """
        mesh = parallel.resolve_mesh(mesh)
        plan = self.check(config, mesh)
        checkpointer = resume.NoCheckpoint()
        if checkpoint_dir is not None:
            context = resume.run_context(mesh, fsdp)
            checkpointer = resume.Checkpointer(checkpoint_dir, self.name, config, context=context)
        result = self.execute(plan, Context(self.name, config, mesh, fsdp, checkpointer))
        checkpointer.finish()  # made here, so finished here: the result is complete
        return result
