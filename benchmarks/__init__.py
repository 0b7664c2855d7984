"""Benchmark studies for optstab.

Each study is a module ``benchmarks/<study>.py`` with ``run(config) -> dict``, a
``plot(result, path)`` and a ``table(result) -> str``; its settings live in
``configs/<study>.py``. ``python -m benchmarks.run STUDY`` runs one or all of them and
writes ``results/<study>.json`` and ``results/<study>.png``.

The library never imports this package; the studies only use the public optstab API.
"""
