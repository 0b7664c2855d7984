"""Tiny configs of the overhead and perturbed_sgd studies: each runs in seconds.

Every batch that a mesh splits (overhead's ``batch_size``; perturbed_sgd's
``probe_batch``, ``rate_batch`` and ``threshold_batch``) is divisible by 8.
"""

from __future__ import annotations

import ml_collections

from configs import overhead as overhead_configs
from configs import perturbed_sgd as perturbed_configs


def overhead_config() -> ml_collections.ConfigDict:
    config = overhead_configs.get_config("quick")
    config.methods = ("adamw", "gnmr_chain", "gnmr_wrap")
    config.sizes, config.batch_size = (32, 64, 10), 8
    config.warmup_rounds, config.step_repeats, config.update_repeats = 1, 2, 2
    return config


def perturbed_config() -> ml_collections.ConfigDict:
    config = perturbed_configs.get_config("quick")
    config.num_seeds, config.num_operators, config.probe_keys, config.probe_batch = 2, 3, 2, 8
    config.rate_steps, config.rate_seeds, config.optimum_steps = 300, 2, 300
    config.plateau_sizes, config.plateau_window = (0.1, 0.4), 20
    config.spike_steps, config.spike_t0, config.spike_sizes = 200, 20, (1.0, 10.0, 100.0)
    config.threshold_steps, config.threshold_sizes = 60, (0.5, 2.0)
    config.timing_repeats = 3
    assert config.rate_batch % 8 == 0 and config.threshold_batch % 8 == 0
    return config


def perturbed_mesh_config() -> ml_collections.ConfigDict:
    """The sections that use a mesh, cheapest first: a probe batch and SGD minibatches."""
    config = perturbed_config()
    config.sections = ("linearity", "rates")
    return config
