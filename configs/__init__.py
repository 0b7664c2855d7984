"""Benchmark configurations: ``configs/<study>.py`` defines ``get_config(size)``.

Sizes: ``tiny`` (seconds; the tests run it, and every batch a mesh splits divides by
8), ``quick`` (minutes on a laptop CPU; ``make bench``) and ``full`` (one GPU/TPU
host). Each config's docstring starts with the command that runs it.
"""

import ml_collections

SIZES = ("tiny", "quick", "full")


def new_config(size: str) -> ml_collections.ConfigDict:
    """An empty study config for ``size`` (one of ``SIZES``)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    config = ml_collections.ConfigDict()
    config.size = size
    return config
