"""The digits MLP under injected gradient spikes, trained with AdamW and a stability
method: per-seed setup, the vmapped scan over steps of one method, and what is recorded
at every step. Used by ``spike_injection`` (see its docstring) and, without spikes, by
``gnmr_calibration``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import optstab
from benchmarks.harness import measure, parallel
from benchmarks.problems import data, methods, models, spikes

# The study's names for plain AdamW: trained without spikes, and with them.
ROLES = {"clean": "adamw", "none": "adamw"}
COUNTER_FIELDS = (
    "triggers",
    "denied",
    "nonfinite",
    "recovered_steps",
    "preempted",
    "num_clipped",
    "num_capped",
    "num_warmup_clipped",
    "num_resets",
    "num_skipped",
)


def method_update(method: methods.Method, grads: Any, state: tuple, params: Any):
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


def acted_units(name, method, old_state, new_state, grads, handed_on, leaf_names):
    """(num_leaves,) bool: the units the method acted on in the update just made.

    GNMR: its ``recovering`` mask. A clipper chained before AdamW: the units whose
    gradient norm it lowered (all of them for a global clip). skip_step: every unit
    when the step was skipped. ``None`` for SPAM, whose element-wise clip leaves no
    per-step trace in its state (only a cumulative element count).
    """
    if methods.uses_gnmr(name):
        return unit_vector(optstab.gnmr_metrics(new_state)["recovering"], leaf_names)
    if method.pre is not None:
        before, after = leaf_norms(grads), leaf_norms(handed_on)
        return after < before * (1.0 - 1e-6)
    if name == "skip_step":
        skipped = new_state[1].num_skipped > old_state[1].num_skipped
        return jnp.broadcast_to(skipped, (len(leaf_names),))
    return None


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


def capped_now(old_state: Any, new_state: Any) -> jax.Array | None:
    """Whether a ``max_norm`` cap (ZClip's) set the bound of the update just made;
    ``None`` for a method without one."""
    before, after = counters(old_state), counters(new_state)
    if "num_capped" not in after:
        return None
    return after["num_capped"] > before["num_capped"]


def make_train(
    name: str, config: ml_collections.ConfigDict, clip: float, mesh=None, gnmr_over=None
):
    """A jitted function of the per-seed setup (vmapped) that trains method ``name``.

    With a ``mesh``, each step's minibatch is split over its ``data`` axis. With
    ``gnmr_over`` (a list of dicts of GNMR options, laid over ``config.gnmr``), the
    function also takes them, stacked, as its last argument and trains once for each
    (vmapped: one compilation; outputs lead with that axis).
    """
    inject_spikes = name != "clean"
    gnmr = methods.uses_gnmr(name)

    def method_for(options):
        if options is None:
            return methods.optimizer(name, config, roles=ROLES, clip_norm=clip)
        laid = config.copy_and_resolve_references()
        laid.gnmr = ml_collections.ConfigDict({**config.get("gnmr", {}), **options})
        return methods.optimizer(name, laid, roles=ROLES, clip_norm=clip)

    def train_one(setup, x_train, y_train, x_test, y_test, options=None):
        method = method_for(options)
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
                grads = spikes.inject(grads, t, schedule, config.spike_kind)
            updates, new_state, handed_on = method_update(method, grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            acted = acted_units(name, method, opt_state, new_state, grads, handed_on, names)
            out = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
            event = schedule["event"][t] & inject_spikes
            if acted is not None:
                out["caught"] = event & acted[schedule["unit"][t]]
                out["acted"] = jnp.sum(acted.astype(jnp.int32))
            capped = capped_now(opt_state, new_state)
            if capped is not None:  # ZClip: its max_norm cap set this step's bound
                out["capped"] = capped
                out["caught_when_capped"] = out["caught"] & capped
            if gnmr:  # entries into recovery on a unit that was not hit
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

    if gnmr_over is None:
        return jax.jit(jax.vmap(train_one, in_axes=(0, None, None, None, None)))
    over_seeds = jax.vmap(train_one, in_axes=(0, None, None, None, None, None))
    return jax.jit(jax.vmap(over_seeds, in_axes=(None, None, None, None, None, 0)))


def seed_keys(base_seed: int, num_seeds: int) -> jax.Array:
    """One key per seed; seed s's key depends only on ``base_seed`` and s."""
    base = jax.random.key(base_seed)
    return jnp.stack([jax.random.fold_in(base, s) for s in range(num_seeds)])


def make_setup(
    config: ml_collections.ConfigDict, split: data.Split, keys: jax.Array | None = None
) -> dict:
    """What every method shares within a seed, stacked over seeds on axis 0.

    From seed s's key alone (``keys``, default ``seed_keys(config.seed,
    config.num_seeds)``): the initial parameters, the minibatch indices of every step
    (sampled with replacement) and the spike schedule.
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
        schedule = spikes.spike_schedule(spike_key, leaf_sizes, config)
        return {"params": params, "batches": batches, "schedule": schedule}

    keys = seed_keys(config.seed, config.num_seeds) if keys is None else keys
    return jax.jit(jax.vmap(setup))(keys)


def train_method(
    name, config, split: data.Split, setup: dict, clip: float, mesh=None, gnmr_over=None
) -> dict:
    """Trains ``name`` on every seed (a checkpointable stage): numpy outputs, and the
    compile and run seconds.

    With a ``mesh`` the data are replicated on its devices (``setup`` is placed by the
    caller) and each step's minibatch is sharded over its ``data`` axis. ``gnmr_over``:
    see :func:`make_train` (the outputs then lead with one entry per options dict).
    """
    train = make_train(name, config, clip, mesh, gnmr_over)
    data_args = parallel.replicate((split.x_train, split.y_train, split.x_test, split.y_test), mesh)
    if gnmr_over is not None:
        stacked = {k: jnp.asarray([o[k] for o in gnmr_over], jnp.float32) for k in gnmr_over[0]}
        data_args = (*data_args, parallel.replicate(stacked, mesh))
    out, compile_s, run_s = measure.compile_and_run(train, setup, *data_args)
    return {"out": out, "compile_s": compile_s, "run_s": run_s}
