"""A tiny ``lowprec_lm`` config shared by its smoke test and its 8-device worker."""

from configs import lowprec_lm as lowprec_config


def tiny_config():
    config = lowprec_config.get_config("quick")
    config.num_seeds = 2
    config.width, config.depth, config.heads, config.mlp_width = 16, 1, 2, 32
    config.context, config.batch_size, config.val_windows = 16, 8, 8
    config.num_steps, config.eval_every, config.burst_start = 20, 10, 2
    config.burst_prob, config.burst_length = 0.5, (3, 5)
    config.gnmr.warmup_steps = 2
    return config
