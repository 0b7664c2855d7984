"""Tiny configs of the three bilevel studies (seconds each; sharded batches divide by 8),
and their results without what varies from run to run."""

from __future__ import annotations

from configs import bilevel_cleaning, bilevel_memory, bilevel_mixture


def cleaning_config():
    """Two seeds, six steps, a baseline and two solvers."""
    config = bilevel_cleaning.get_config("quick")
    config.methods = ("no_cleaning", "ma_soba", "bros_r4")
    config.memory_only_methods = ()
    config.hidden, config.num_seeds, config.num_steps, config.eval_every = (16, 16), 2, 6, 3
    config.inner_batch, config.outer_batch = 64, 64
    config.warmup_rounds, config.step_repeats = 0, 1
    return config


def mixture_config():
    """Two seeds, twelve steps; one minibatch of 8 per domain and 8 validation images."""
    config = bilevel_mixture.get_config("quick")
    config.methods = ("uniform", "soba", "ma_soba", "bros_r4")
    config.num_seeds, config.num_steps, config.record_every = 2, 12, 4
    config.hidden, config.batch_size, config.outer_batch_size = (16,), 8, 8
    # Rank 4 of width 16 needs smaller steps than MA-SOBA's, as the tuned ranks do: with
    # MA-SOBA's its loss blows up (~1e7), which would magnify any float difference.
    config.method_overrides.bros_r4 = {"inner_lr": 0.15, "aux_lr": 0.03}
    return config


def memory_config():
    """Two sweep points (width 16; batches 8 and 16), MA-SOBA and BROS rank 4."""
    config = bilevel_memory.get_config("quick")
    config.widths, config.batch_size = (16,), 8
    config.batches, config.batch_width = (8, 16), 16
    config.ranks, config.naive_ranks = (4,), ()
    config.warmup_rounds, config.step_repeats = 0, 1
    return config
