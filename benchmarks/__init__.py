"""Benchmarks of optstab: the studies that test its claims, and what runs them.

The folders are the architecture:

* ``run.py``: the command line (``python -m benchmarks.run STUDY --config quick``);
* ``harness/``: how any study is run: the study protocol, the run context
  (checkpoints, mesh, FSDP, progress), the result envelope, resume, devices, timing
  and memory measurement, reporting;
* ``problems/``: what several studies share: data, models, the byte-level LM, the
  cleaning problem, and the one registry of methods;
* ``studies/``: one module or package per study: its problem, its methods and its
  analysis and figure, and nothing else; configs in ``configs/<study>.py``.

The library (``optstab``) never imports this package; the studies use only its public API.
"""
