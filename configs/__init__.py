"""Benchmark configurations: ``configs/<study>.py`` defines ``get_config(size)``."""

import ml_collections

SIZES = ("quick", "full")


def new_config(size: str) -> ml_collections.ConfigDict:
    """An empty study config for ``size`` (``"quick"``: CPU; ``"full"``: one host)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    config = ml_collections.ConfigDict()
    config.size = size
    return config
