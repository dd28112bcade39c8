"""From a name, hyperparameters and a modifier to the Objective a trainer calls.

    objective, hparams = build("dpo + 0.2*sft", hparams={"beta": 0.2})
    per_group = objective(inputs, **hparams)  # [NG]

One grammar names a combination: a weighted sum ``"dpo + 0.2*sft"`` (see :func:`get`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxpo.losses._registry import Objective, combine, get, with_ld, with_wpo

MODIFIERS = ("", "wpo", "ld")


def build(name: str, *, hparams: Mapping[str, Any] | None = None, modifier: str = ""
          ) -> tuple[Objective, dict[str, Any]]:
    """The Objective named ``name`` and the hyperparameter overrides to call it with.

    Each ``hparams`` entry goes to every component that has a hyperparameter of that name (an
    entry no component has is an error). For a single objective the overrides are returned to
    be passed at call time; for a combination they are baked into the returned Objective and
    the returned overrides are ``{}``. ``modifier`` wraps the result with :func:`with_wpo` or
    :func:`with_ld` (LD's α: ``hparams["ld_alpha"]``, or ``hparams["alpha"]`` when no
    component has an ``alpha`` of its own).

    Args:
        name: a registered name or a weighted sum such as ``"dpo + 0.2*sft"``.
        hparams: hyperparameter overrides, e.g. ``{"beta": 0.2}``.
        modifier: ``""``, ``"wpo"`` or ``"ld"``.

    Returns:
        ``(objective, overrides)``.

    Raises:
        ValueError: an unknown name, hyperparameter or modifier; the message says what exists.

    >>> obj, h = build("dpo", hparams={"beta": 0.2})
    >>> obj.name, h
    ('dpo', {'beta': 0.2})
    """
    if modifier not in MODIFIERS:
        raise ValueError(f"modifier {modifier!r}; choose from {list(MODIFIERS)}")
    given = dict(hparams or {})
    try:
        objective = get(name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    parts = [o for o, _ in objective.components] or [objective]
    modifier_kwargs = _modifier_kwargs(modifier, given, parts)
    for key in given:
        if not any(key in obj.hyperparameters for obj in parts):
            known = sorted({k for obj in parts for k in obj.hyperparameters})
            raise ValueError(f"objective {objective.name!r} has no hyperparameter {key!r}; "
                             f"known: {known}")
    if objective.components:
        baked = {obj.name: {k: v for k, v in given.items() if k in obj.hyperparameters}
                 for obj in parts}
        weights = {obj.name: w for obj, w in objective.components}
        objective, given = combine(weights, hparams=baked), {}
    return _modify(objective, modifier, modifier_kwargs), given


def _modifier_kwargs(modifier: str, given: dict[str, Any], parts: list[Objective]
                     ) -> dict[str, Any]:
    """Pops the modifier's own arguments (LD's α) out of ``given``."""
    if modifier != "ld":
        return {}
    own_alpha = any("alpha" in obj.hyperparameters for obj in parts)
    key = "ld_alpha" if "ld_alpha" in given or own_alpha else "alpha"
    if key not in given:
        return {}
    alpha = given.pop(key)
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{key}={alpha!r} (LD-DPO's α) must be in [0, 1]")
    return {"alpha": float(alpha)}


def _modify(objective: Objective, modifier: str, kwargs: dict[str, Any]) -> Objective:
    """``objective`` wrapped by ``modifier`` ("" leaves it as it is)."""
    if not modifier:
        return objective
    if "pair" not in objective.kinds:
        raise ValueError(f"modifier {modifier!r} applies to pairwise objectives; "
                         f"{objective.name!r} trains on {list(objective.kinds)}")
    try:
        return with_wpo(objective) if modifier == "wpo" else with_ld(objective, **kwargs)
    except ValueError as e:
        raise ValueError(f"modifier {modifier!r}: {e}") from None


def metrics_beta(objective: Objective, overrides: Mapping[str, Any]) -> float:
    """β of the implicit-reward metrics: the configured one, else the objective's default
    (the first component's that has one), else 1."""
    if "beta" in overrides:
        return float(overrides["beta"])
    parts = objective.components or ((objective, 1.0),)
    for obj, _ in parts:
        h = (objective.hyperparameters.get(obj.name, {}) if objective.components
             else obj.hyperparameters)
        if "beta" in h:
            return float(h["beta"])
    return 1.0
