"""Spike injection: does a stability method keep training on track under gradient spikes?

Setup. An MLP classifies the scikit-learn digits (offline, standardised, one fixed
stratified split) with AdamW on random minibatches. Every method trains from the same
initialisation on the same minibatches and, except ``clean``, under the same spikes.

Stress. From step ``spike_start`` on, each step carries a spike event with probability
``spike_prob``. An event hits one parameter leaf (an optstab *unit*, e.g.
``"layer1/w"``) drawn uniformly, with a magnitude S drawn log-uniformly in
``[spike_min, spike_max]``. With ``spike_kind="random"`` (the default) the leaf's
gradient g becomes ``g + S * |g| * u`` for a unit-norm Gaussian direction u: a
garbage gradient whose norm is about S times the true one, as a numerical fault would
produce. (``"scale"`` multiplies g by S instead; that keeps the direction and is the
milder stress for Adam, whose step is scale-free.) The calibrated stress (see
``configs/spike_injection.py`` for how it was found) is p = 0.2 per step, S in
[10, 1e4], random direction, AdamW at lr 3e-3, spikes from step 100 of 1000 (quick)
or 3000 (full). Per seed, a jitted setup function draws from the seed's key alone
the initial parameters, every step's minibatch indices and the spike schedule
(event, unit, S, and an offset into a per-seed pool of Gaussian numbers from which
the direction u is read), so within a seed every method sees the same data and the
same spikes at the same steps. The spike is added after backpropagation and before
the optimizer, where the methods would see a real one.

Methods. ``clean`` (no spikes) and ``none`` (spikes, plain AdamW) bracket the range;
``clip_by_global_norm`` clips at ``clip_factor`` times the median global gradient norm
of the clean runs; ``zclip``, ``adagc``, ``spam`` and ``skip_step`` are the optstab
baselines at their published defaults; ``gnmr_clip`` chains ``optstab.gnmr`` with the
clip action before AdamW and ``gnmr_skip`` wraps AdamW with the skip action, both at
the library defaults; ``gnmr_clip_budget2`` and ``gnmr_skip_budget2`` are the same
with a budget sized to the stress (``max_recover=2``, ``lock_steps=3``; the sizing
rule is in the config).

Measured, per seed: train loss and global gradient norm (after injection) at every
step; final test loss and accuracy; divergence (non-finite loss or parameters, or a
final test loss above ``divergence_factor`` times the initial one); spikes caught (an
injected event whose unit the method acted on at that step: GNMR's ``recovering``
mask, a global clip or skip that fired, a per-unit clip that fired on the hit unit;
null where a method exposes no such signal); GNMR's recovered unit-steps, triggers
and budget denials. The training loop is one ``lax.scan`` over steps under
``jax.vmap`` over seeds: one compilation per method.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

import optstab
from benchmarks import data as data_lib
from benchmarks import measure, models, parallel, reporting, resume
from optstab.stability import baselines

GNMR_METHODS = ("gnmr_clip", "gnmr_skip", "gnmr_clip_budget2", "gnmr_skip_budget2")
POOL_FACTOR = 4  # the garbage-direction pool holds 4 x the largest leaf's size
CURVE_METHODS = ("clean", "none", "gnmr_clip", "gnmr_skip", "gnmr_clip_budget2")


# ---------------------------------------------------------------------------
# Spike schedule and injection


def spike_schedule(
    key: jax.Array, leaf_sizes: list[int], config: ml_collections.ConfigDict
) -> dict:
    """The seeded spike schedule of one seed.

    Returns a dict of (T,) arrays, T = ``num_steps``: ``event`` (bool), ``unit`` (int32,
    leaf index in flattening order), ``magnitude`` (float32 S) and ``offset`` (int32),
    plus ``pool``, a Gaussian vector of ``POOL_FACTOR`` x the largest leaf size. The
    garbage direction of step t is the window of ``pool`` (read cyclically) that starts
    at ``offset[t]``: a fresh, near-orthogonal direction for every event, without a
    random-number draw of a whole leaf inside the training loop.
    """
    k_event, k_unit, k_mag, k_offset, k_pool = jax.random.split(key, 5)
    num_steps = config.num_steps
    event = (jax.random.uniform(k_event, (num_steps,)) < config.spike_prob) & (
        jnp.arange(num_steps) >= config.spike_start
    )
    log_mag = jax.random.uniform(
        k_mag, (num_steps,), minval=math.log(config.spike_min), maxval=math.log(config.spike_max)
    )
    pool_size = POOL_FACTOR * max(leaf_sizes)
    return {
        "event": event,
        "unit": jax.random.randint(k_unit, (num_steps,), 0, len(leaf_sizes)),
        "magnitude": jnp.exp(log_mag),
        "offset": jax.random.randint(k_offset, (num_steps,), 0, pool_size),
        "pool": jax.random.normal(k_pool, (pool_size,)),
    }


def inject(grads: Any, step: jax.Array, schedule: dict, kind: str) -> Any:
    """Adds this step's spike (if any) to the hit leaf of ``grads``."""
    if kind not in ("random", "scale"):
        raise ValueError(f"spike_kind must be 'random' or 'scale', got {kind!r}")
    leaves, treedef = jax.tree.flatten(grads)
    magnitude = schedule["magnitude"][step]
    if kind == "random":
        pool = schedule["pool"]
        cyclic = jnp.concatenate([pool, pool])
        width = max(leaf.size for leaf in leaves)
        noise = jax.lax.dynamic_slice(cyclic, (schedule["offset"][step],), (width,))
    out = []
    for i, g in enumerate(leaves):
        hit = schedule["event"][step] & (schedule["unit"][step] == i)
        if kind == "random":
            u = noise[: g.size].reshape(g.shape).astype(g.dtype)
            u = u / jnp.linalg.norm(u.ravel())
            spiked = g + magnitude * jnp.linalg.norm(g.ravel()) * u
        else:
            spiked = magnitude * g
        out.append(jnp.where(hit, spiked, g))
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------
# Methods


class Method(NamedTuple):
    """A method as ``optax.chain(pre, main)``; ``pre`` (a gradient clipper) may be None.

    Keeping the two apart lets the study see the gradient that ``pre`` hands on, and so
    which units it changed.
    """

    pre: optax.GradientTransformation | None
    main: optax.GradientTransformation


def make_method(name: str, config: ml_collections.ConfigDict, clip_norm: float) -> Method:
    """The optimizer of method ``name`` (see the module docstring)."""

    def adamw() -> optax.GradientTransformation:
        return optax.adamw(
            config.learning_rate, config.b1, config.b2, config.eps, weight_decay=config.weight_decay
        )

    if name in ("clean", "none"):
        return Method(None, adamw())
    if name == "clip_by_global_norm":
        return Method(optax.clip_by_global_norm(clip_norm), adamw())
    if name in GNMR_METHODS:
        gnmr_kwargs = dict(config.gnmr)
        if name.endswith("_budget2"):
            gnmr_kwargs.update(config.gnmr_budget2)
        if name.startswith("gnmr_clip"):
            return Method(optstab.gnmr(**gnmr_kwargs, action=("clip",)), adamw())
        return Method(None, optstab.gnmr_wrap(adamw(), **gnmr_kwargs, action=("skip",)))
    if name == "zclip":
        return Method(baselines.zclip(**config.zclip), adamw())
    if name == "adagc":
        return Method(baselines.adagc(**config.adagc), adamw())
    if name == "spam":
        spam = baselines.spam(
            config.learning_rate,
            config.b1,
            config.b2,
            config.eps,
            config.weight_decay,
            **config.spam,
        )
        return Method(None, spam)
    if name == "skip_step":
        return Method(None, baselines.skip_step(adamw(), **config.skip_step))
    raise ValueError(f"unknown method {name!r}")


def method_update(method: Method, grads: Any, state: tuple, params: Any):
    """One ``chain(pre, main)`` update; also returns the gradient ``pre`` handed on."""
    pre_state, main_state = state
    handed_on = grads
    if method.pre is not None:
        handed_on, pre_state = method.pre.update(grads, pre_state, params)
    updates, main_state = method.main.update(handed_on, main_state, params)
    return updates, (pre_state, main_state), handed_on


def leaf_norms(tree: Any) -> jax.Array:
    """(num_leaves,) L2 norm of every leaf, in flattening order."""
    return jnp.stack([jnp.linalg.norm(leaf.ravel()) for leaf in jax.tree.leaves(tree)])


def unit_vector(per_unit: dict[str, jax.Array], leaf_names: list[str]) -> jax.Array:
    """A GNMR ``{unit: value}`` dict as a (num_leaves,) bool vector in leaf order."""
    return jnp.stack([jnp.asarray(per_unit[n]).astype(bool) for n in leaf_names])


def acted_units(
    name: str,
    method: Method,
    old_state: tuple,
    new_state: tuple,
    grads: Any,
    handed_on: Any,
    leaf_names: list[str],
) -> jax.Array | None:
    """(num_leaves,) bool: the units the method acted on in the update just made.

    GNMR: its ``recovering`` mask. A clipper chained before AdamW: the units whose
    gradient norm it lowered (all of them for a global clip). skip_step: every unit
    when the step was skipped. ``None`` for SPAM, whose element-wise clip leaves no
    per-step trace in its state (only a cumulative element count).
    """
    if name in GNMR_METHODS:
        return unit_vector(optstab.gnmr_metrics(new_state)["recovering"], leaf_names)
    if method.pre is not None:
        before, after = leaf_norms(grads), leaf_norms(handed_on)
        return after < before * (1.0 - 1e-6)
    if name == "skip_step":
        skipped = new_state[1].num_skipped > old_state[1].num_skipped
        return jnp.broadcast_to(skipped, (len(leaf_names),))
    return None


COUNTER_FIELDS = (
    "triggers",
    "denied",
    "nonfinite",
    "recovered_steps",
    "num_clipped",
    "num_warmup_clipped",
    "num_resets",
    "num_skipped",
)


def counters(state: Any) -> dict[str, jax.Array]:
    """The cumulative counters (``COUNTER_FIELDS``) found in a nested optimizer state."""
    found: dict[str, jax.Array] = {}

    def visit(node: Any) -> None:
        if isinstance(node, tuple):
            for field in getattr(node, "_fields", ()):
                if field in COUNTER_FIELDS:
                    found[field] = jnp.asarray(getattr(node, field))
            for child in node:
                visit(child)
        elif isinstance(node, (list, dict)):
            for child in node.values() if isinstance(node, dict) else node:
                visit(child)

    visit(state)
    return found


# ---------------------------------------------------------------------------
# Training


def make_train(
    name: str,
    config: ml_collections.ConfigDict,
    split: data_lib.Split,
    clip: float,
    mesh: jax.sharding.Mesh | None = None,
):
    """A jitted function of the per-seed setup (vmapped) that trains method ``name``.

    With a ``mesh``, each step's minibatch is split over its ``data`` axis.
    """
    method = make_method(name, config, clip)
    inject_spikes = name != "clean"

    def train_one(setup, x_train, y_train, x_test, y_test):
        params, schedule = setup["params"], setup["schedule"]
        names = optstab.tree.leaf_names(params)
        pre_state = None if method.pre is None else method.pre.init(params)
        opt_state = (pre_state, method.main.init(params))
        init_test_loss = models.cross_entropy(params, x_test, y_test)

        def step(carry, inputs):
            params, opt_state = carry
            t, idx = inputs
            batch = parallel.batch_constraint((x_train[idx], y_train[idx]), mesh)
            loss, grads = jax.value_and_grad(models.cross_entropy)(params, *batch)
            if inject_spikes:
                grads = inject(grads, t, schedule, config.spike_kind)
            updates, new_state, handed_on = method_update(method, grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            acted = acted_units(name, method, opt_state, new_state, grads, handed_on, names)
            out = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
            event = schedule["event"][t] & inject_spikes
            if acted is not None:
                out["caught"] = event & acted[schedule["unit"][t]]
                out["acted"] = jnp.sum(acted.astype(jnp.int32))
            if name in GNMR_METHODS:  # entries into recovery on a unit that was not hit
                hit = event & (jnp.arange(len(names)) == schedule["unit"][t])
                was_locked = unit_vector(optstab.gnmr_metrics(opt_state)["lock"], names)
                out["false_triggers"] = jnp.sum((acted & ~was_locked & ~hit).astype(jnp.int32))
            return (params, new_state), out

        steps = jnp.arange(config.num_steps)
        (params, opt_state), curves = jax.lax.scan(
            step, (params, opt_state), (steps, setup["batches"])
        )
        finite = jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
        ) & jnp.all(jnp.isfinite(curves["loss"]))
        return {
            "curves": curves,
            "init_test_loss": init_test_loss,
            "test_loss": models.cross_entropy(params, x_test, y_test),
            "test_acc": models.accuracy(params, x_test, y_test),
            "finite": finite,
            "event": schedule["event"] & inject_spikes,
            "counters": counters(opt_state),
        }

    return jax.jit(jax.vmap(train_one, in_axes=(0, None, None, None, None)))


def make_setup(config: ml_collections.ConfigDict, split: data_lib.Split) -> dict:
    """What every method shares within a seed, stacked over seeds on axis 0.

    From seed s's key alone: the initial parameters, the minibatch indices of every
    step (sampled with replacement) and the spike schedule.
    """
    sizes = (split.num_features, *config.hidden, split.num_classes)
    n_train = split.x_train.shape[0]

    def setup(seed_key):
        init_key, batch_key, spike_key = jax.random.split(seed_key, 3)
        params = models.mlp_init(init_key, sizes)
        batches = jax.random.randint(
            batch_key, (config.num_steps, config.batch_size), 0, n_train, dtype=jnp.int32
        )
        leaf_sizes = [leaf.size for leaf in jax.tree.leaves(params)]
        schedule = spike_schedule(spike_key, leaf_sizes, config)
        return {"params": params, "batches": batches, "schedule": schedule}

    return jax.jit(jax.vmap(setup))(seed_keys(config))


def seed_keys(config: ml_collections.ConfigDict) -> jax.Array:
    """One key per seed; seed s's key depends only on ``config.seed`` and s."""
    base = jax.random.key(config.seed)
    return jnp.stack([jax.random.fold_in(base, s) for s in range(config.num_seeds)])


def train_method(
    name: str,
    config: ml_collections.ConfigDict,
    split: data_lib.Split,
    setup: dict,
    clip: float,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict, float, float]:
    """Trains ``name`` on every seed; returns numpy outputs, compile and run seconds.

    With a ``mesh`` (see :mod:`benchmarks.parallel`) the data are replicated on its
    devices (``setup`` is placed by the caller) and each step's minibatch is sharded
    over its ``data`` axis.
    """
    train = make_train(name, config, split, clip, mesh)
    args = (setup, split.x_train, split.y_train, split.x_test, split.y_test)
    setup, *data = args
    return measure.compile_and_run(train, setup, *parallel.replicate(data, mesh))


# ---------------------------------------------------------------------------
# Summary


def per_seed(name: str, out: dict, config: ml_collections.ConfigDict) -> dict:
    """Per-seed scalars of one method."""

    def curve_sum(key):
        return out["curves"][key].sum(axis=1) if key in out["curves"] else None

    diverged = ~out["finite"] | ~(
        out["test_loss"] <= config.divergence_factor * out["init_test_loss"]
    )
    seeds = {
        "test_acc": out["test_acc"],
        "test_loss": out["test_loss"],
        "init_test_loss": out["init_test_loss"],
        "diverged": diverged,
        "spikes_injected": out["event"].sum(axis=1),
        "spikes_caught": curve_sum("caught"),
        "acted_unit_steps": curve_sum("acted"),
        "false_triggers": curve_sum("false_triggers"),
    }
    for key, value in out["counters"].items():
        seeds["recovered_unit_steps" if key == "recovered_steps" else key] = value
    return reporting.to_jsonable(seeds)


def summarize_method(seeds: dict) -> dict:
    """Medians over seeds (counts for diverged; totals for spike counts)."""

    def med(key):
        values = seeds.get(key)
        if values is None:
            return None
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    def total(key):
        values = seeds.get(key)
        return None if values is None else int(np.sum(values))

    summary = {
        "test_acc": med("test_acc"),
        "test_loss": med("test_loss"),
        "diverged": int(np.sum(seeds["diverged"])),
        "spikes_injected": total("spikes_injected"),
        "spikes_caught": total("spikes_caught"),
        "acted_unit_steps": total("acted_unit_steps"),
        "false_triggers": total("false_triggers"),
    }
    for key in ("recovered_unit_steps", "triggers", "denied", "nonfinite", *COUNTER_FIELDS[4:]):
        summary[key] = total(key)
    return summary


def goal_checks(methods: dict, config: ml_collections.ConfigDict) -> dict:
    """The issue's goals: GNMR within 1 point of clean, no divergence; none worse."""
    goal: dict[str, Any] = {}
    clean = methods.get("clean")
    if clean is None:
        return goal
    for name in GNMR_METHODS:
        if name in methods:
            gap = clean["test_acc"] - methods[name]["test_acc"]
            goal[f"{name}_accuracy_gap"] = gap
            goal[f"{name}_within_1pt_of_clean"] = bool(gap <= config.goal_accuracy_gap + 1e-9)
            goal[f"{name}_no_divergence"] = methods[name]["diverged"] == 0
    if "none" in methods:
        gap = clean["test_acc"] - methods["none"]["test_acc"]
        goal["none_accuracy_gap"] = gap
        half = methods["none"]["diverged"] * 2 >= config.num_seeds
        goal["none_visibly_worse"] = bool(gap >= config.visible_gap or half)
    return goal


def clip_norm_from_clean(out: dict, config: ml_collections.ConfigDict) -> float:
    """``clip_factor`` x the median global gradient norm of the clean runs."""
    return float(config.clip_factor * np.median(out["curves"]["grad_norm"]))


def schedule_record(schedule: dict, units: list[str]) -> dict:
    """Per seed: the steps, hit units and magnitudes of the injected spike events."""
    event = np.asarray(schedule["event"])
    unit = np.asarray(schedule["unit"])
    magnitude = np.asarray(schedule["magnitude"])
    return {
        "step": [np.flatnonzero(e).tolist() for e in event],
        "unit": [[units[i] for i in u[e]] for u, e in zip(unit, event, strict=True)],
        "magnitude": [
            [float(f"{x:.4g}") for x in m[e]] for m, e in zip(magnitude, event, strict=True)
        ],
    }


def run(
    config: ml_collections.ConfigDict,
    *,
    checkpoint_dir: Any = None,
    mesh: Any = "auto",
    fsdp: bool = False,
) -> dict:
    """Runs every method of ``config.methods`` and returns the JSON-ready result.

    Args:
      config: ``configs/spike_injection.py``'s ``get_config(size)``.
      checkpoint_dir: None, a directory or a :class:`benchmarks.resume.Checkpointer`:
        each method's training is saved when it finishes, and a rerun with the same
        config picks up after the last finished method.
      mesh: see :mod:`benchmarks.parallel` (``"auto"``: data parallel over all
        devices when there are several).
      fsdp: with a mesh, split large parameter leaves over its ``data`` axis.
    """
    checkpointer = resume.open_checkpointer(checkpoint_dir, "spike_injection", config)
    mesh = parallel.resolve_mesh(mesh)
    split = data_lib.digits(config.split_seed, config.test_fraction)
    methods = list(config.methods)
    if "clean" in methods:  # clip_by_global_norm needs the clean norms first
        methods.remove("clean")
        methods.insert(0, "clean")
    setup = make_setup(config, split)
    setup = parallel.place_setup(setup, mesh, fsdp)  # seeds stay whole
    first = jax.tree.map(lambda leaf: leaf[0], setup["params"])
    units = optstab.tree.leaf_names(first)
    raw: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    clip = float("nan")
    for name in tqdm(methods, desc="spike_injection"):
        if name == "clip_by_global_norm" and not math.isfinite(clip):
            raise ValueError("clip_by_global_norm needs the clean method to run first")
        trained = checkpointer.stage(
            name, lambda name=name, clip=clip: train_stage(name, config, split, setup, clip, mesh)
        )
        out, compile_s, run_s = trained["out"], trained["compile_s"], trained["run_s"]
        if name == "clean":
            clip = clip_norm_from_clean(out, config)
        stride = config.curve_stride
        raw[name] = {
            "seeds": per_seed(name, out, config),
            "train_loss": reporting.to_jsonable(out["curves"]["loss"][:, ::stride], digits=5),
            "grad_norm": reporting.to_jsonable(out["curves"]["grad_norm"][:, ::stride], digits=5),
        }
        timing[name] = {"compile_s": compile_s, "run_s": run_s}
    summary_methods = {name: summarize_method(raw[name]["seeds"]) for name in methods}
    unit_steps = config.num_steps * len(units) * config.num_seeds
    for name in GNMR_METHODS:
        if name in summary_methods:  # fraction of unit-steps spent in recovery
            recovered = summary_methods[name]["recovered_unit_steps"]
            summary_methods[name]["recovery_rate"] = recovered / unit_steps
    result = {
        "study": "spike_injection",
        "config": config,
        "environment": reporting.environment(),
        "summary": {
            "methods": summary_methods,
            "goal": goal_checks(summary_methods, config),
            "stress": {
                key: config[key]
                for key in (
                    "spike_kind",
                    "spike_prob",
                    "spike_min",
                    "spike_max",
                    "spike_start",
                    "learning_rate",
                    "num_steps",
                )
            },
            "clip_norm": clip if math.isfinite(clip) else None,
            "num_params": models.num_params(first),
            "units": units,
        },
        "timing_s": timing,
        "mesh": parallel.describe(mesh),
        "spike_schedule": schedule_record(setup["schedule"], units),
        "raw": raw,
    }
    checkpointer.finish()
    return reporting.to_jsonable(result, digits=None)


def train_stage(name, config, split, setup, clip, mesh) -> dict:
    """:func:`train_method` as a checkpointable stage (plain dict of arrays and floats)."""
    out, compile_s, run_s = train_method(name, config, split, setup, clip, mesh)
    return {"out": out, "compile_s": compile_s, "run_s": run_s}


# ---------------------------------------------------------------------------
# Table and plot


def table(result: dict) -> str:
    """The one-screen summary: one row per method, then the goal checks."""
    summary = result["summary"]
    headers = [
        "method",
        "test_acc",
        "test_loss",
        "diverged",
        "injected",
        "caught",
        "acted_u_steps",
        "recovered_u_steps",
        "triggers",
        "false_trig",
        "denied",
    ]
    rows = []
    for name, m in summary["methods"].items():
        rows.append(
            [
                name,
                m["test_acc"],
                m["test_loss"],
                f"{m['diverged']}/{result['config']['num_seeds']}",
                m["spikes_injected"],
                m["spikes_caught"],
                m["acted_unit_steps"],
                m["recovered_unit_steps"],
                m["triggers"],
                m["false_triggers"],
                m["denied"],
            ]
        )
    lines = [
        f"median over {result['config']['num_seeds']} seeds; spike counts summed over seeds; "
        f"clip_by_global_norm c = {reporting.format_value(summary['clip_norm'])}",
        reporting.format_table(headers, rows),
        "goals:",
        reporting.format_goals(summary["goal"]),
    ]
    return "\n".join(lines)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot(result: dict, path) -> Any:
    """Test accuracy per method over seeds, and train-loss curves with spike times."""
    reporting.plot_style()
    import matplotlib.pyplot as plt

    config = result["config"]
    raw = result["raw"]
    methods = list(raw)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    ax = axes[0]
    accs = [[a for a in raw[m]["seeds"]["test_acc"] if a is not None] for m in methods]
    ax.boxplot(accs, showfliers=False)
    rng = np.random.default_rng(0)
    for i, values in enumerate(accs, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=10, zorder=3)
    if "clean" in result["summary"]["methods"]:
        clean = result["summary"]["methods"]["clean"]["test_acc"]
        goal = clean - config["goal_accuracy_gap"]
        ax.axhline(clean, color="tab:blue", lw=0.8, ls=":")
        ax.axhline(goal, color="tab:red", lw=0.8, ls="--")
        at_right = ax.get_yaxis_transform()  # x in axes fraction, y in data
        ax.text(1.01, clean, "clean\nmedian", color="tab:blue", fontsize=7, transform=at_right)
        ax.text(1.01, goal, "-1 pt", color="tab:red", fontsize=7, va="top", transform=at_right)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=40, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"test accuracy over {config['num_seeds']} seeds")

    stride = config["curve_stride"]
    window = max(1, config["smooth_window"] // stride)
    schedule = result["spike_schedule"]
    for ax, seed in ((axes[1], None), (axes[2], 0)):
        for m in CURVE_METHODS:
            if m not in raw:
                continue
            curves = np.asarray(raw[m]["train_loss"], dtype=float)
            values = np.nanmedian(curves, axis=0) if seed is None else curves[seed]
            smoothed = _smooth(values, window)
            steps = (np.arange(len(smoothed)) + (window - 1)) * stride
            ax.plot(steps, smoothed, label=m, lw=1.2)
        if seed is None:
            ax.axvspan(
                config["spike_start"], config["num_steps"], color="k", alpha=0.06, label="spikes on"
            )
            ax.set_title(f"median train loss over seeds (moving average {config['smooth_window']})")
        else:
            lo, hi = math.log(config["spike_min"]), math.log(config["spike_max"])
            size = (np.log(schedule["magnitude"][seed]) - lo) / max(hi - lo, 1e-12)
            ax.vlines(
                schedule["step"][seed],
                0.0,
                0.03 + 0.17 * size,
                color="k",
                alpha=0.35,
                lw=0.7,
                transform=ax.get_xaxis_transform(),
                label="spike (height ~ log S)",
            )
            ax.set_title("seed 0 train loss (moving average) and its spike events")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(
        f"spike injection: p={config['spike_prob']} per step, S in "
        f"[{config['spike_min']:g}, {config['spike_max']:g}], kind {config['spike_kind']}"
    )
    return reporting.save_figure(fig, path)
