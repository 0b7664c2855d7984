"""Benchmark configurations: ``configs/<study>.py`` defines ``get_config(size)``."""
