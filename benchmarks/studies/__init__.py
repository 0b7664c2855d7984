"""The studies: one module or package each, every one a :class:`benchmarks.harness.Study`.

Each study module defines ``STUDY`` (its name, ``prepare``, ``measure``, ``table`` and
``plot``) and exposes ``run = STUDY.run``, ``table`` and ``plot``; its configs are in
``configs/<study>.py``. ``load(name)`` imports one (the studies import jax and their
problems, so the CLI imports only the ones it runs).
"""

from __future__ import annotations

import importlib

STUDIES = (
    "gnmr_calibration",
    "spike_injection",
    "overhead",
    "perturbed_sgd",
    "bilevel_cleaning",
    "bilevel_memory",
    "bilevel_mixture",
    "bilevel_reweighting",
    "lowprec_lm",
    "bilevel_decentralized",
)


def load(name: str):
    """The :class:`benchmarks.harness.Study` of study ``name`` (one of ``STUDIES``)."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    return importlib.import_module(f"benchmarks.studies.{name}").STUDY
