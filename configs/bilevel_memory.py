"""Configuration of the bilevel memory sweep (``benchmarks/studies/bilevel_memory.py``).

    python -m benchmarks.run bilevel_memory --config quick   # or tiny, full

Quick (this 2-core CPU): widths 256 / 1024 / 4096 at batch 64 and batches 64 / 512 /
2048 at width 1024, rank 16, and the naive rank-16 variant for memory only. On this
CPU compiling dominates (1-2 s for MA-SOBA, 3-8 s for each BROS variant), which is why
the quick sweep has five points, one rank, and an untimed naive variant; step times
are medians of three round-robin repeats. Full (one GPU host): wider layers, larger
batches, ranks 16 and 64, every variant timed, more repeats.
"""

from __future__ import annotations

import ml_collections

from configs import new_config


def get_config(size: str = "quick") -> ml_collections.ConfigDict:
    """``size`` is ``"tiny"`` (seconds), ``"quick"`` (CPU) or ``"full"`` (one GPU host)."""
    if size == "tiny":  # two points (width 16; batches 8 and 16), MA-SOBA and rank 4
        c = get_config("quick")
        c.size = "tiny"
        c.widths, c.batch_size, c.batches, c.batch_width = (16,), 8, (8, 16), 16
        c.ranks, c.naive_ranks, c.time_naive = (4,), (4,), True
        c.warmup_rounds, c.step_repeats = 0, 1
        return c
    c = new_config(size)
    quick = size == "quick"
    c.seed = 0
    # The cleaning problem's shapes: digits features, 10 classes, one weight logit per
    # training sample (1077 in bilevel_cleaning).
    c.num_features = 64
    c.num_classes = 10
    c.num_samples = 1077
    c.l2 = 1e-4
    # Width sweep at batch_size; batch sweep at batch_width (the MLP is
    # 64 -> width -> width -> 10).
    c.widths = (256, 1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384)
    c.batch_size = 64 if quick else 256
    c.batches = (64, 512, 2048) if quick else (256, 2048, 16384, 65536)
    c.batch_width = 1024 if quick else 4096
    c.ranks = (16,) if quick else (16, 64)  # factored BROS
    c.naive_ranks = (16,) if quick else (16, 64)  # factored=False: what factoring saves
    # Time the naive variant too (on the quick size it is compiled for memory only:
    # it is the slowest method and timing it would double the quick run).
    c.time_naive = not quick
    # Step sizes (they do not change the cost; the values of bilevel_cleaning).
    c.inner_lr = 0.1
    c.aux_lr = 0.03
    c.average = 0.1
    c.outer_lr = 300.0
    # Timing: untimed warm-up rounds, then timed round-robin rounds per point.
    c.warmup_rounds = 0 if quick else 2  # quick: the median of 3 absorbs a slow first call
    c.step_repeats = 3 if quick else 20
    # Goals from the issue, checked at the largest configuration (most MA-SOBA bytes).
    c.goal_reduction = 0.45  # BROS at least 45% fewer compiled bytes than MA-SOBA
    c.goal_time_ratio = 1.1  # BROS median step time <= 1.1 x MA-SOBA
    return c
