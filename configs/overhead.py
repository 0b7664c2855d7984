"""Configuration of the overhead study (``benchmarks/studies/overhead.py``).

python -m benchmarks.run overhead --config quick   # or tiny, full
"""

from __future__ import annotations

import ml_collections

from configs import new_config

METHODS = (
    "adamw",
    "gnmr_chain",
    "gnmr_wrap",
    "clip_by_global_norm",
    "zclip",
    "spam",
    "adagc",
    "skip_step",
)


def get_config(size: str = "quick") -> ml_collections.ConfigDict:
    """``size`` is ``"tiny"`` (a small MLP, seconds), ``"quick"`` (few timed repeats) or
    ``"full"`` (more repeats)."""
    if size == "tiny":  # a 2.8k-parameter MLP, batch 8, three methods
        c = get_config("quick")
        c.size = "tiny"
        c.methods = ("adamw", "gnmr_chain", "gnmr_wrap")
        c.sizes, c.batch_size = (32, 64, 10), 8
        c.warmup_rounds, c.step_repeats, c.update_repeats = 1, 2, 2
        return c
    c = new_config(size)
    c.methods = METHODS
    c.seed = 0
    # A ~21M-parameter MLP: 1024 -> 5 x 2048 -> 1000 classes, on random data.
    c.sizes = (1024, 2048, 2048, 2048, 2048, 2048, 1000)
    c.batch_size = 128
    c.learning_rate = 1e-3
    c.weight_decay = 1e-4
    c.clip_norm = 1.0  # clip_by_global_norm bound (its value does not change the cost)
    # Timing: untimed warm-up rounds, then timed round-robin rounds.
    c.warmup_rounds = 1 if size == "quick" else 2
    c.step_repeats = 8 if size == "quick" else 30
    c.update_repeats = 16 if size == "quick" else 50
    # Goals from the issue, for the GNMR methods.
    c.goal_time_ratio = 1.05
    c.goal_memory_ratio = 1.01
    return c
