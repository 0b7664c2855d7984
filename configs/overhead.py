"""Configuration of the overhead study (``benchmarks/studies/overhead``).

python -m benchmarks.run overhead --config quick   # or tiny, full
python -m benchmarks.run overhead --config quick --config.sections=scaling_units
"""

from __future__ import annotations

import ml_collections

from configs import new_config

METHODS = (
    "adamw",
    "gnmr_chain",
    "gnmr_precision",
    "gnmr_wrap",
    "gnmr_wrap_generic",
    "clip_by_global_norm",
    "zclip",
    "spam",
    "adagc",
    "skip_step",
)
SECTIONS = ("optimizer_step", "train_step", "scaling_size", "scaling_units")


def get_config(size: str = "quick") -> ml_collections.ConfigDict:
    """``size`` is ``"tiny"`` (small models, seconds), ``"quick"`` (2 CPU cores, about
    two minutes; sweeps to 16.8M parameters and 3 unit counts) or ``"full"`` (more
    rounds; sweeps to 105M parameters and 5 unit counts)."""
    if size == "tiny":
        c = get_config("quick")
        c.size = "tiny"
        c.methods = ("adamw", "gnmr_wrap", "gnmr_wrap_generic")
        c.train_methods = ("adamw", "gnmr_chain", "gnmr_precision", "zclip")
        # About 100k parameters each: GNMR's state and its per-unit vectors (a few
        # hundred bytes) stay under 0.1% of the steps' bytes, as they are at full size.
        c.step_sizes = (128, 256, 256)
        c.sizes, c.batch_size = (128, 256, 256, 10), 8
        c.warmup_rounds, c.step_repeats, c.train_repeats, c.scaling_repeats = 1, 2, 2, 2
        c.scaling_methods = ("adamw", "gnmr_chain")
        c.scaling_widths, c.scaling_reference_params = (16, 32), 1000
        c.unit_methods = ("adamw", "gnmr_chain")
        c.unit_counts, c.unit_rows, c.unit_leaves, c.unit_cols = (10, 100), 100, 2, 8
        return c
    quick = size == "quick"
    c = new_config(size)
    c.sections = SECTIONS
    c.methods = METHODS  # the optimizer step's
    c.train_methods = METHODS  # the train step's
    c.seed = 0
    c.learning_rate = 1e-3
    c.weight_decay = 1e-4
    c.clip_norm = 1.0  # clip_by_global_norm bound (its value does not change the cost)
    c.warmup_rounds = 1 if quick else 2  # untimed rounds after compilation
    # Optimizer step: four 2048 x 2048 layers (16.8M parameters), gradients given
    # (standard normal times grad_scale).
    c.step_sizes = (2048,) * 5
    c.grad_scale = 1e-3
    c.step_repeats = 12 if quick else 50
    # Train step: 1024 -> 5 x 2048 -> 1000 classes (20.9M parameters), random data.
    c.sizes = (1024, 2048, 2048, 2048, 2048, 2048, 1000)
    c.batch_size = 128
    c.train_repeats = 8 if quick else 30
    # GNMR over model size: square MLPs of scaling_depth layers, 1.05M ... 105M params.
    c.scaling_methods = ("adamw", "gnmr_chain", "gnmr_precision", "gnmr_wrap")
    c.scaling_widths = (512, 1024, 2048) if quick else (512, 1024, 2048, 4096, 5120)
    c.scaling_depth = 4
    # Timed rounds per sweep point: scaling_repeats at scaling_reference_params, more
    # (up to 8x) for smaller models, whose steps are shorter.
    c.scaling_repeats = 8 if quick else 30
    c.scaling_reference_params = 16_800_000
    # GNMR over the number of units: unit_leaves tables with unit_rows rows of unit_cols.
    c.unit_methods = ("adamw", "gnmr_chain", "gnmr_chain_injected", "gnmr_wrap")
    c.unit_counts = (10, 1000, 100_000) if quick else (10, 100, 1000, 10_000, 100_000)
    c.unit_rows = 100_000
    c.unit_leaves = 4
    c.unit_cols = 64 if quick else 168  # 6.4M / 16.8M parameters
    # Goals from the issue.
    c.goal_wrap_time_ratio = 1.25  # optimizer step, gnmr_wrap
    c.goal_wrap_memory_ratio = 1.01  # optimizer step, gnmr_wrap
    c.goal_precision_memory_ratio = 1.01  # train step, gnmr_precision
    # Train step, gnmr_chain against the cheapest global-norm peer: memory ratios equal
    # to within this. A tenth of a percent is a few hundred kB here; what it absorbs
    # is the controllers' own per-unit vectors (a few hundred bytes with one unit per
    # leaf), while an extra buffer of the step (a copy of one layer's gradient) is
    # 16.8 MB, 6% of AdamW's bytes.
    c.goal_same_memory = 1e-3
    return c
