"""The harness: everything about running a study that is not the study itself.

* ``study.py``: the protocol (:class:`Study`: prepare, measure, table, plot) and the
  result envelope;
* ``context.py``: what a running study may use (:class:`Context`: config, mesh,
  checkpointed stages and loops, progress bars);
* ``resume.py`` and ``store.py``: checkpoints, the run fingerprint, plain results on disk;
* ``parallel.py``: device meshes (data parallel, FSDP, multi-host);
* ``measure.py``: compile time, compiled bytes, round-robin step time;
* ``reporting.py``: JSON, tables, the palette every figure uses;
* ``compare.py``: two results side by side without their timings.
"""

from benchmarks.harness.context import Context
from benchmarks.harness.study import Study

__all__ = ["Context", "Study"]
