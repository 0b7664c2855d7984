"""Data-mixture learning: can a bilevel solver find which training domains help?

Setup. The digits training split (:func:`benchmarks.problems.data.digits_splits`: 1077 images,
standardised on train) is cut into K disjoint, class-stratified shards of equal size
(K = 4 gives 269 images each; leftovers are dropped). Each shard becomes a domain
with its own corruption, named in ``config.domains`` as ``"kind"`` or
``"kind:amount"``:

* ``clean``: untouched;
* ``label_noise:f``: a fraction ``f`` of the labels replaced by a *different* class
  (:func:`benchmarks.problems.data.corrupt_labels`). Even at ``f = 0.8``, among the images of
  one class the true label stays the most frequent one (20 % against 8.9 % for
  each wrong class), so such a domain is very noisy but not void;
* ``shuffled``: the shard's labels permuted at random, so labels carry no
  information about the images;
* ``feature_noise:s``: labels kept, Gaussian noise of standard deviation ``s`` added
  to the standardised pixels.

The default design is ``clean``, ``label_noise:0.3``, ``label_noise:0.8``,
``shuffled``. The target domain is clean digits: the validation split (360 images)
is the upper-level data and the test split (360 images) is used only for reporting.
Per seed, the shard assignment and the corruption come from numpy's
``default_rng([seed, s, 0])``, and the MLP initialisation (He-normal, the layout of
``models.mlp_init``), every minibatch index and BROS's probe key from
``default_rng([seed, s, 1])``: every method sees the same data, initialisation and
minibatches within a seed. The train / validation / test split is fixed.

Problem. Upper variable ``x``: K mixture logits, initialised at 0 (uniform mixture
``softmax(x)``). Lower variable ``y``: an MLP (64 -> hidden -> 10). With one
minibatch of ``batch_size`` images per domain, stacked as ``(K, b, ...)``::

    g(x, y) = sum_k softmax(x)_k * mean_i CE(y; domain-k minibatch) + l2/2 ||y||^2
    f(x, y) = mean_i CE(y; validation minibatch of outer_batch_size)

Methods. ``soba``, ``ma_soba`` and ``bros_r{rank}`` (``optstab.bilevel``) chained with
``optax.sgd(outer_lr)`` over ``x`` (``optax.adam`` if ``outer_optimizer="adam"``), all
with the same settings, tuned on MA-SOBA's validation loss (see the config and
:func:`benchmarks.studies.bilevel_mixture.train.tune`). Two baselines train the MLP
alone with plain SGD on ``g`` on the same minibatches: ``uniform`` (``x`` fixed at 0)
and ``oracle_clean`` (all weight on the clean domain, the mixture someone who knew the
corruption would pick); each has its own lower step, tuned on its own validation loss
(``config.method_overrides``). SOBA runs as MA-SOBA with ``average = 1``, which is how
``bilevel.soba`` is defined.

Measured, per seed: the final mixture ``softmax(x)``, the test accuracy and loss of
the final lower variable ``y`` (the target accuracy), its loss on the whole
validation split, divergence (a non-finite ``y`` or mixture), and every
``record_every`` steps the mixture and the whole-validation loss. The summary gives
medians over seeds; ``mixture`` is the per-domain median over the finite seeds,
renormalised to sum to one (``mixture_per_seed`` has the raw values), ``ranking``
the domains from largest to smallest weight. Training is a ``lax.scan`` over steps
under ``jax.vmap`` over seeds (and over settings that share a compiled function:
the two baselines, SOBA with MA-SOBA, a tuning grid).

Stages and devices. Each compiled training job (the baselines, SOBA with MA-SOBA,
each BROS rank) is one checkpointed stage; a resumed run trains only the missing jobs.
With a mesh (:mod:`benchmarks.harness.parallel`), each step's minibatches are sharded
over its ``data`` axis (``batch_size`` and ``outer_batch_size`` must divide by its size, else
``ValueError``), the data, indices and settings are replicated and the initial MLPs
placed by :func:`benchmarks.harness.parallel.place_params` (seeds never split).

Modules: ``problem.py`` (domains, losses, per-seed setup), ``train.py`` (solvers, jobs,
training, tuning), ``report.py`` (analysis, table, figure).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from benchmarks.harness import Context, Study, parallel, reporting
from benchmarks.harness.study import check_positive
from benchmarks.problems import methods, models
from benchmarks.studies.bilevel_mixture import problem, train
from benchmarks.studies.bilevel_mixture.report import plot, summarize_method, table

__all__ = ["STUDY", "plot", "run", "table"]

TARGET = "clean digits: validation split (360) upper level, test split (360) reported"


def prepare(config: ml_collections.ConfigDict, mesh: Any) -> None:
    """Checks the domains, sizes and batches, and builds every method's solver with its
    settings (unknown names, settings or domain kinds raise here)."""
    methods.check_bilevel(config.methods, problem.BASELINES)
    kinds = [problem.parse_domain(spec)[0] for spec in config.domains]
    if "oracle_clean" in config.methods and kinds[0] != "clean":
        raise ValueError("oracle_clean needs the clean domain first in config.domains")
    check_positive(config, "hidden", "num_steps", "record_every")
    if config.num_steps % config.record_every:
        raise ValueError("num_steps must be a positive multiple of record_every")
    for field in ("batch_size", "outer_batch_size"):
        check_positive(config, field)
        parallel.check_batch(config[field], mesh, field)
    sizes = (64, *config.hidden, problem.NUM_CLASSES)
    params = jax.eval_shape(lambda: models.mlp_init(jax.random.key(0), sizes))
    for name in config.methods:
        hyper = train.method_hyper(config, name)
        if name not in problem.BASELINES:
            bilevel_problem = problem.mixture_problem(params, hyper["l2"])
            train.solver(name, bilevel_problem, hyper, config, jax.random.key(0))


def measure(plan: None, context: Context) -> dict:
    """Trains every job (one stage each) and summarises the learned mixtures."""
    config = context.config
    data = problem.make_data(config)
    placed = problem.place_data(data, context.mesh, context.fsdp)
    outputs, timing = train.train_methods(placed, context)
    raw: dict[str, dict] = {}
    summaries: dict[str, dict] = {}
    for name, out in outputs.items():
        seeds = {
            key: out[key] for key in ("mixture", "test_acc", "test_loss", "val_loss", "finite")
        }
        raw[name] = {
            "seeds": reporting.to_jsonable(seeds),
            "mixture_curve": reporting.to_jsonable(out["curves"]["mixture"], digits=4),
            "val_loss_curve": reporting.to_jsonable(out["curves"]["val_loss"], digits=5),
            **timing[name],
        }
        settings = train.method_hyper(config, name)
        summaries[name] = {**summarize_method(out), "settings": settings}
        if name in problem.BASELINES:  # a fixed mixture: no learned order, no outer step
            summaries[name]["settings"] = {k: settings[k] for k in ("inner_lr", "l2")}
            summaries[name]["ranking"] = None
    label_acc = data["label_acc"]
    domains = [
        {
            "index": k,
            "spec": spec,
            "description": problem.describe_domain(spec),
            "size": int(data["domain_y"].shape[2]),
            "label_accuracy": float(np.median(label_acc[:, k])),
        }
        for k, spec in enumerate(config.domains)
    ]
    sizes = (64, *config.hidden, problem.NUM_CLASSES)
    summary = {
        "methods": summaries,
        "domains": domains,
        "target": TARGET,
        "num_params": models.num_params(models.mlp_init(jax.random.key(0), sizes)),
    }
    return {"summary": summary, "raw": raw}


STUDY = Study("bilevel_mixture", prepare, measure, table, plot)
run = STUDY.run
