"""Every method a study can name, built from the study's config: the one registry.

Stability methods (:func:`optimizer`) are AdamW with a stability transform before it
(``pre``), in its place, or around it. Hyperparameters come from the study's config:
AdamW's ``learning_rate``, ``weight_decay`` and, where the config has them, ``b1``,
``b2``, ``eps``; each peer's group (``config.zclip``, ``config.spam``, ...; absent
means the library defaults); GNMR's ``config.gnmr``.

==========================  ==================================================================
name                        optimizer
==========================  ==================================================================
``adamw``                   ``optax.adamw``
``clip_by_global_norm``     ``chain(optax.clip_by_global_norm(clip_norm), adamw)``
``zclip``, ``adagc``        ``chain(baselines.zclip(**config.zclip), adamw)``, likewise adagc
``spam``                    ``baselines.spam`` (AdamW's settings and ``config.spam``)
``skip_step``               ``baselines.skip_step(adamw, **config.skip_step)``
``gnmr_chain``              ``chain(optstab.gnmr(**config.gnmr), adamw)`` (default actions)
``gnmr_wrap``               ``optstab.gnmr_wrap(adamw, **config.gnmr)`` (default action)
``gnmr_clip``               ``gnmr_chain`` with ``action=("clip",)``
``gnmr_skip``               ``gnmr_wrap`` with ``action=("skip",)``
``gnmr_*_budget2``          the same with ``config.gnmr_budget2`` over ``config.gnmr``
``gnmr_precision[_clip]``   ``gnmr_chain`` with ``action=("precision",[ "clip"])``
``gnmr_precision_external``  ``gnmr_precision`` with ``signal="external"`` (``unit_signal``)
``gnmr_precision_both``     ``gnmr_precision`` with ``signal=("gradient", "external")``
==========================  ==================================================================

A study may also give plain AdamW runs names of their own (``clean`` and ``none`` in
``spike_injection``: the same optimizer with and without the stress): its ``ROLES``
maps them to ``adamw``.

Bilevel solvers (:func:`bilevel_solver`): ``soba``, ``ma_soba``, ``bros_r{rank}``
(factored BROS) and ``bros_r{rank}_naive`` (``factored=False``), from
:mod:`optstab.bilevel`.

Example:

    >>> import ml_collections
    >>> from benchmarks.problems import methods
    >>> config = ml_collections.ConfigDict({"learning_rate": 1e-3, "weight_decay": 0.0})
    >>> method = methods.optimizer("gnmr_clip", config)
    >>> method.pre is not None, methods.uses_gnmr("gnmr_clip"), methods.uses_gnmr("zclip")
    (True, True, False)
    >>> methods.optimizer("adam_but_better", config)
    Traceback (most recent call last):
    ...
    ValueError: unknown method 'adam_but_better'; choose from adamw, clip_by_global_norm, ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
import optax

import optstab
from optstab import bilevel
from optstab.stability import baselines


class Method(NamedTuple):
    """A stability method as ``optax.chain(pre, main)``; ``pre`` may be None.

    Keeping the two apart lets a study see the gradient ``pre`` hands on (which units
    a clipper changed); :attr:`transform` is the one optimizer.
    """

    pre: optax.GradientTransformation | None
    main: optax.GradientTransformation

    @property
    def transform(self) -> optax.GradientTransformation:
        return self.main if self.pre is None else optax.chain(self.pre, self.main)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a name is built around AdamW (see the module docstring)."""

    pre: str | None = None  # chained before: "clip_by_global_norm", "zclip", "adagc", "gnmr"
    main: str = "adamw"  # "adamw" or "spam" (which replaces AdamW)
    wrap: str | None = None  # around AdamW: "skip_step" or "gnmr" (gnmr_wrap)
    action: tuple[str, ...] | None = None  # GNMR's action; None: the library default
    gnmr_extra: str | None = None  # a config group laid over config.gnmr
    gnmr_options: tuple[tuple[str, Any], ...] = ()  # fixed GNMR keywords, e.g. a signal


RECIPES = {
    "adamw": Recipe(),
    "clip_by_global_norm": Recipe(pre="clip_by_global_norm"),
    "zclip": Recipe(pre="zclip"),
    "adagc": Recipe(pre="adagc"),
    "spam": Recipe(main="spam"),
    "skip_step": Recipe(wrap="skip_step"),
    "gnmr_chain": Recipe(pre="gnmr"),
    "gnmr_wrap": Recipe(wrap="gnmr"),
    "gnmr_clip": Recipe(pre="gnmr", action=("clip",)),
    "gnmr_skip": Recipe(wrap="gnmr", action=("skip",)),
    "gnmr_clip_budget2": Recipe(pre="gnmr", action=("clip",), gnmr_extra="gnmr_budget2"),
    "gnmr_skip_budget2": Recipe(wrap="gnmr", action=("skip",), gnmr_extra="gnmr_budget2"),
    "gnmr_precision": Recipe(pre="gnmr", action=("precision",)),
    "gnmr_precision_clip": Recipe(pre="gnmr", action=("precision", "clip")),
    "gnmr_precision_external": Recipe(
        pre="gnmr", action=("precision",), gnmr_options=(("signal", "external"),)
    ),
    "gnmr_precision_both": Recipe(
        pre="gnmr", action=("precision",), gnmr_options=(("signal", ("gradient", "external")),)
    ),
}


# The optimizer-level peers of GNMR (every non-GNMR stability method).
PEERS = ("clip_by_global_norm", "zclip", "adagc", "spam", "skip_step")


def check_names(names: Iterable[str], known: Sequence[str], what: str = "method") -> None:
    """A ``ValueError`` naming the first of ``names`` not in ``known``, and the choices."""
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(known)}")


def uses_gnmr(name: str) -> bool:
    """Whether method ``name`` runs GNMR (so ``optstab.gnmr_metrics`` reads its state)."""
    recipe = RECIPES.get(name)
    return recipe is not None and "gnmr" in (recipe.pre, recipe.wrap)


def watches_external(name: str) -> bool:
    """Whether method ``name``'s GNMR watches an external signal, so its ``update`` needs
    ``unit_signal={unit: value}`` (see :func:`optstab.gnmr`)."""
    recipe = RECIPES.get(name)
    signal = dict(recipe.gnmr_options).get("signal", "gradient") if recipe else "gradient"
    return "external" in ((signal,) if isinstance(signal, str) else signal)


def _group(config: ml_collections.ConfigDict, key: str) -> dict:
    """``config[key]`` as keyword arguments ({} when the config has no such group)."""
    return dict(config.get(key) or {})


def _adam_settings(config: ml_collections.ConfigDict) -> dict:
    return {key: config[key] for key in ("b1", "b2", "eps") if key in config}


def adamw(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``optax.adamw`` with the config's learning rate, weight decay and moments."""
    return optax.adamw(
        config.learning_rate, **_adam_settings(config), weight_decay=config.weight_decay
    )


def _gnmr_settings(recipe: Recipe, config: ml_collections.ConfigDict, units: Any) -> dict:
    settings = _group(config, "gnmr")
    if recipe.gnmr_extra:
        settings.update(_group(config, recipe.gnmr_extra))
    settings.update(recipe.gnmr_options)
    if recipe.action is not None:
        settings["action"] = recipe.action
    if units is not None:
        settings["units"] = units
    return settings


def _main(recipe: Recipe, config: ml_collections.ConfigDict, units: Any):
    if recipe.main == "spam":
        return baselines.spam(
            config.learning_rate,
            **_adam_settings(config),
            weight_decay=config.weight_decay,
            **_group(config, "spam"),
        )
    main = adamw(config)
    if recipe.wrap == "skip_step":
        return baselines.skip_step(main, **_group(config, "skip_step"))
    if recipe.wrap == "gnmr":
        return optstab.gnmr_wrap(main, **_gnmr_settings(recipe, config, units))
    return main


def _pre(recipe: Recipe, config: ml_collections.ConfigDict, units: Any, clip_norm: float | None):
    if recipe.pre == "clip_by_global_norm":
        return optax.clip_by_global_norm(config.clip_norm if clip_norm is None else clip_norm)
    if recipe.pre == "zclip":
        return baselines.zclip(**_group(config, "zclip"))
    if recipe.pre == "adagc":
        return baselines.adagc(**_group(config, "adagc"))
    if recipe.pre == "gnmr":
        return optstab.gnmr(**_gnmr_settings(recipe, config, units))
    return None


def optimizer(
    name: str,
    config: ml_collections.ConfigDict,
    *,
    roles: Mapping[str, str] | None = None,
    units: Any = None,
    clip_norm: float | None = None,
) -> Method:
    """The optimizer of method ``name`` (see the module docstring).

    Args:
      name: a name of :data:`RECIPES`, or of ``roles``.
      config: the study's config (AdamW's settings and each method's group).
      roles: the study's own names for registry methods (``{"clean": "adamw"}``).
      units: GNMR's units (default: one per parameter leaf).
      clip_norm: ``clip_by_global_norm``'s bound (default ``config.clip_norm``).

    Raises:
      ValueError: an unknown name, or a hyperparameter the library rejects.
    """
    roles = dict(roles or {})
    check_names([name], [*roles, *RECIPES])
    recipe = RECIPES[roles.get(name, name)]
    return Method(_pre(recipe, config, units, clip_norm), _main(recipe, config, units))


# ---------------------------------------------------------------------------
# Bilevel solvers

BILEVEL_NAMES = ("soba", "ma_soba")  # plus "bros_r{rank}" and "bros_r{rank}_naive"


def bros_rank(name: str) -> int | None:
    """The rank in ``"bros_r{rank}"`` or ``"bros_r{rank}_naive"``; ``None`` otherwise."""
    if not name.startswith("bros_r"):
        return None
    digits = name[len("bros_r") :].removesuffix("_naive")
    if not digits.isdigit():
        raise ValueError(f"cannot read a rank from method name {name!r}")
    return int(digits)


def is_bilevel(name: str) -> bool:
    """Whether ``name`` is a bilevel solver (SOBA, MA-SOBA or a BROS variant)."""
    return name in BILEVEL_NAMES or bros_rank(name) is not None


def check_bilevel(names: Iterable[str], baselines: Sequence[str] = ()) -> None:
    """A ``ValueError`` for a name that is neither a solver nor one of ``baselines``."""
    for name in names:
        if name not in baselines and not is_bilevel(name):
            choices = ", ".join([*baselines, *BILEVEL_NAMES, "bros_r{rank}[_naive]"])
            raise ValueError(f"unknown method {name!r}; choose from {choices}")


def bros_names(ranks: Sequence[int], naive: bool = False) -> list[str]:
    """``bros_r{rank}`` (or ``bros_r{rank}_naive``) for every rank."""
    return [f"bros_r{rank}" + ("_naive" if naive else "") for rank in ranks]


def bilevel_solver(
    name: str,
    problem: bilevel.BilevelProblem,
    inner_lr: Any,
    aux_lr: Any,
    average: Any,
    key: Any = 0,
    radius: Any = None,
    resample_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """The bilevel transform of a method name (step sizes may be traced arrays).

    ``soba``, ``ma_soba``, ``bros_r{rank}`` (factored BROS) or ``bros_r{rank}_naive``
    (``factored=False``). SOBA ignores ``average`` (it is MA-SOBA with ``average=1``).
    """
    check_bilevel([name])
    if name == "soba":
        return bilevel.soba(problem, inner_lr, aux_lr, radius=radius, key=key)
    if name == "ma_soba":
        return bilevel.ma_soba(problem, inner_lr, aux_lr, average, radius=radius, key=key)
    return bilevel.bros(
        problem,
        bros_rank(name),
        inner_lr,
        aux_lr,
        average,
        radius=radius,
        key=key,
        resample_every=resample_every,
        factored=not name.endswith("_naive"),
    )
