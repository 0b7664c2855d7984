"""Config of the ``lowprec_lm`` study (``benchmarks/studies/lowprec_lm``).

    python -m benchmarks.run lowprec_lm --config quick   # or tiny, full
    python -m benchmarks.run lowprec_lm --config quick --config.regimes=model_outliers \\
        --config.methods=reference,none,gnmr_amax,oracle_precision

The stressed recipe is int8, per-tensor delayed scaling (amax history 16), nearest
rounding: int8 is the format whose lack of range outliers are known to break, and delayed
scaling keeps an outlier's scale for up to 16 steps after it is gone. Two burst regimes
share the burst schedule (a burst hits one quantized layer, ``burst_channels`` input
channels, a magnitude alpha log-uniform in ``[alpha_min, alpha_max]``, for
``burst_length`` steps):

* ``quantizer_outliers``: only the quantizer sees the outliers (``Q(x * a) / a``, on every
  token), so the float32 reference is the clean run bit for bit. How its sizes were
  chosen (quick model, 1 seed, before any GNMR result): int8 current scaling with alpha
  20-200 gave a 2% gap; alpha 100-1000 with delayed scaling a gap of 7-13% at 400-600 steps.
* ``model_outliers``: the outlier channels are real in the function on the sequence
  positions ``model_outliers.positions`` only (position 0, where the massive activations
  of large LMs sit), so the float32 reference sees them too, and the gap is what the
  format and the delayed scale's lag add. With outliers on every token the reference
  suffered as much as int8 (alpha 20-200: val 2.512 vs 2.520, no gap left to measure).
  It reuses the schedule and sizes above unchanged (nothing was retuned for it); only its
  layer types come from a rule, below.

The rule that picks the ``model_outliers`` layers, from the float32 reference alone
(``model_outliers.reference_tolerance``): with the burst sizes above, the study first
trains the float32 reference with bursts on one layer type at a time (``qkv``, ``proj``,
``up``, ``down``) and keeps a type when the median final validation loss of that run is
within 1% of the clean float32 run's; the regime's bursts then hit the kept types only.
A burst that changes what the float32 model learns by more than that is a change of the
task, not a low-precision risk. No low-precision or GNMR result enters the rule.

Recipe-level peers of the precision switch (``optstab.lowprec`` options, plain AdamW):
``current_scaling`` (the same int8 per-tensor recipe with current scaling: no lag) and
``fine_grained`` (DeepSeek-V3's 1x128 activation tiles and 128x128 weight blocks, current
scaling). GNMR rows (``gnmr``, ``gnmr_amax``, ``gnmr_both``) run at the library defaults,
which ``config.gnmr`` copies from ``optstab.gnmr``'s signature (the tiny size shortens
the warm-up only, so that its 20 steps exercise the controller).
"""

from __future__ import annotations

import inspect

import ml_collections

import optstab
from configs import new_config


def gnmr_defaults() -> dict:
    """``optstab.gnmr``'s numeric defaults (those that are not None), by name."""
    signature = inspect.signature(optstab.gnmr)
    return {name: p.default for name, p in signature.parameters.items()
            if isinstance(p.default, int | float) and not isinstance(p.default, bool)}  # fmt: skip


STRESSED = {"fmt": "int8", "scaling": "per_tensor", "scale_mode": "delayed",
            "rounding": "nearest", "history": 16, "backward_fmt": None}  # fmt: skip


def get_config(size: str = "quick") -> ml_collections.ConfigDict:
    """``size`` is ``"tiny"`` (seconds), ``"quick"`` (CPU, under 5 minutes) or ``"full"``
    (one GPU)."""
    if size == "tiny":  # a one-block model, 20 steps, bursts on about half of them
        c = get_config("quick")
        c.size = "tiny"
        c.num_seeds = 2
        # Compilation is nearly all of a tiny run's time, one per (registry method, recipe):
        # three here. The persistent regime reuses the fine_grained recipe as its format
        # (a smoke test of the regime's path, not its float4 boundary).
        c.methods = ("reference", "none", "gnmr_amax", "fine_grained", "oracle_precision")
        c.persistent_methods = ("reference", "none")
        c.persistent_quant.update({**STRESSED, **c.recipes.fine_grained})
        # Bursts on qkv moved the tiny reference by about 7%, on proj by 0.3%: the rule keeps
        # one type and drops the other, so both of its branches run.
        c.model_outliers.candidate_layers = ("qkv", "proj")
        c.width, c.depth, c.heads, c.mlp_width = 16, 1, 2, 32
        c.context, c.batch_size, c.val_windows = 16, 8, 8
        c.num_steps, c.eval_every, c.burst_start = 20, 10, 2
        c.burst_prob, c.burst_length = 0.5, (3, 5)
        c.gnmr.warmup_steps = 2  # a smoke size: the controller must act within 20 steps
        return c
    c = new_config(size)
    quick = size == "quick"
    c.num_seeds = 3
    c.regimes = ("quantizer_outliers", "model_outliers")
    c.methods = (
        "reference", "none", "clip_by_global_norm", "zclip", "spam", "skip_step",
        "gnmr", "gnmr_amax", "gnmr_both", "current_scaling", "fine_grained",
        "oracle_precision",
    )  # fmt: skip

    # Model and data: byte-level decoder, stdlib sources (benchmarks/problems/lm.py).
    c.width = 64 if quick else 256
    c.depth = 2 if quick else 6
    c.heads = 4 if quick else 8
    c.mlp_width = (2 if quick else 4) * c.width  # 2x: the quick study must fit 5 minutes
    c.context = 32 if quick else 256
    c.batch_size = 16 if quick else 64
    c.num_steps = 400 if quick else 5000
    c.eval_every = 50 if quick else 250
    c.curve_stride = 1 if quick else 5
    c.val_windows = 64 if quick else 256
    c.val_fraction = 0.1

    # AdamW.
    c.learning_rate = 3e-3 if quick else 1e-3
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.01

    # The stressed low-precision recipe, and the recipe-level peers (fields laid over it).
    c.quant = ml_collections.ConfigDict(STRESSED)
    c.recipes = ml_collections.ConfigDict(
        {"current_scaling": {"scale_mode": "current"},
         "fine_grained": {"scaling": "fine_grained", "scale_mode": "current", "block_size": 128}}
    )  # fmt: skip

    # Bursts (both regimes): after burst_start, a new burst starts with probability
    # burst_prob per step when none is running.
    c.burst_start = 50
    c.burst_prob = 0.02
    c.burst_length = (20, 40)
    c.burst_channels = 2
    c.alpha_min = 100.0
    c.alpha_max = 1000.0
    c.quantizer_outliers = ml_collections.ConfigDict({"layers": ("qkv", "proj", "up", "down")})
    c.model_outliers = ml_collections.ConfigDict(
        {"candidate_layers": ("qkv", "proj", "up", "down"), "positions": (0,),
         "reference_tolerance": 0.01,
         # Trained with bursts on one layer type at a time (the split by layer type):
         # the reference decides the rule; the others show where the gap comes from.
         "split_methods": ("reference", "none") if quick else
                          ("reference", "none", "oracle_precision")}
    )  # fmt: skip

    # Persistent degradation: no bursts, a coarse format everywhere (the boundary of the
    # claim; the float32 reference is the clean run, reused).
    c.persistent = True
    c.persistent_quant = ml_collections.ConfigDict(
        {"fmt": "float4_e2m1", "scaling": "per_tensor", "scale_mode": "current",
         "rounding": "nearest", "history": 16, "backward_fmt": None}
    )  # fmt: skip
    c.persistent_methods = (
        ("reference", "none", "gnmr", "gnmr_amax") if quick
        else ("reference", "none", "gnmr", "gnmr_amax", "gnmr_both", "fine_grained")
    )  # fmt: skip

    # Methods. clip_by_global_norm at 1.0, the usual LM setting (the reference's median
    # global gradient norm is about 0.6-0.8, so it clips only raised steps). GNMR: the
    # library defaults, read from optstab.gnmr's signature when the config is built (so
    # the result records them and --config.gnmr.* can override one; never set them
    # here). Peers: their published defaults.
    c.clip_norm = 1.0
    c.gnmr = ml_collections.ConfigDict(gnmr_defaults())
    c.zclip = ml_collections.ConfigDict({"alpha": 0.97, "z_threshold": 2.5, "warmup_steps": 25})
    c.spam = ml_collections.ConfigDict(
        {"spike_threshold": 5000.0, "reset_interval": 500, "reset_warmup_steps": 150}
    )
    c.skip_step = ml_collections.ConfigDict({"window": 128, "num_sigma": 6.0})

    # Reporting.
    c.spike_window = 20
    c.spike_factor = 1.5
    c.goal_gap_closed = 0.8
    c.goal_recovery_rate = 0.1
    c.visible_gap = 0.05
    return c
