"""Run configuration: presets and ``--config.section.field=value`` overrides on the schema.

    config = load_config("configs/dpo_tiny.py", ["--config.train.steps=200"])

A preset is a Python file whose ``get_config()`` returns a dict of section overrides, e.g.
``{"loss": {"name": "ipo"}, "train": {"steps": 200}}``; only what differs from the defaults.
Without a file, the embedded default (:func:`default_config`) is used. The dataclasses
(``Config``, ``ModelConfig``, ...) are defined in :mod:`jaxpo.train.schema` and importable from
here.

>>> cfg = apply_overrides(Config(), ["--config.loss.beta=0.2", "--config.data.eval_files=a,b"])
>>> cfg.loss.beta, cfg.data.eval_files
(0.2, ('a', 'b'))
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxpo.train.schema import (
    SECTIONS,
    Config,
    DataConfig,
    LossConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    ReferenceConfig,
    TrainConfig,
    parse_kwargs,
    parse_weights,
)

__all__ = [
    "SECTIONS", "Config", "DataConfig", "LossConfig", "MeshConfig", "ModelConfig", "OptimConfig",
    "ReferenceConfig", "TrainConfig", "apply_overrides", "build_objective", "check",
    "default_config", "from_dict", "from_preset_file", "load_config", "parse_kwargs",
    "parse_override", "parse_weights", "replace", "to_json_dict",
]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(section: str, field: str, annotation: Any, value: Any) -> Any:
    """Converts ``value`` (a string from the command line, or a Python value) to ``annotation``."""
    where = f"config.{section}.{field}"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(section, field, inner, value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(_coerce(section, field, args[0], v) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}={value!r}: expected a boolean (true|false)")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}={value!r}: expected {annotation.__name__}")
        try:
            if annotation is int and isinstance(value, str):
                as_float = float(value)  # accept "1e3" for ints when integral
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r}: expected {annotation.__name__}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}={value!r}: expected a string")
        return value
    return value


def _unknown(kind: str, name: str, known: Sequence[str]) -> ValueError:
    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(known)}"
    return ValueError(f"unknown config {kind} {name!r}{hint}")


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def replace(config: Config, updates: Mapping[str, Mapping[str, Any]]) -> Config:
    """Returns ``config`` with ``{section: {field: value}}`` applied (values coerced, validated)."""
    sections = {}
    for section, fields in updates.items():
        if section not in SECTIONS:
            raise _unknown("section", section, list(SECTIONS))
        if isinstance(fields, SECTIONS[section]):
            sections[section] = fields
            continue
        if not isinstance(fields, Mapping):
            raise TypeError(f"config.{section} must be a dict of field values, got {fields!r}")
        hints = _field_types(SECTIONS[section])
        current = getattr(config, section)
        changes = {}
        for field, value in fields.items():
            if field not in hints:
                known = [k for k in _all_keys() if k.startswith(section + ".")]
                raise _unknown("key", f"{section}.{field}", known)
            changes[field] = _coerce(section, field, hints[field], value)
        sections[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(config, **sections)


def parse_override(arg: str) -> tuple[str, str, str]:
    """``"--config.train.steps=10"`` → ``("train", "steps", "10")``."""
    body = arg.removeprefix("--")
    if not body.startswith("config."):
        raise ValueError(f"not a config override: {arg!r} (expected --config.section.field=value)")
    key, sep, value = body[len("config."):].partition("=")
    if not sep:
        raise ValueError(f"config override {arg!r} has no value (expected --config.{key}=value)")
    section, dot, field = key.partition(".")
    if not dot or "." in field:
        raise _unknown("key", key, _all_keys())
    if section not in SECTIONS or field not in _field_types(SECTIONS[section]):
        raise _unknown("key", key, _all_keys())
    return section, field, value


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Applies ``--config.section.field=value`` strings in order."""
    updates: dict[str, dict[str, str]] = {}
    for arg in overrides:
        section, field, value = parse_override(arg)
        updates.setdefault(section, {})[field] = value
    return replace(config, updates)


def from_preset_file(path: str | Path) -> Config:
    """Imports ``path`` and applies its ``get_config()`` (a dict of section overrides, or a
    Config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config={path}: no such file")
    spec = importlib.util.spec_from_file_location(f"jaxpo_preset_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a preset must define get_config()")
    result = module.get_config()
    if isinstance(result, Config):
        return result
    if not isinstance(result, Mapping):
        raise TypeError(
            f"{path}: get_config() must return a dict of section overrides or a Config"
        )
    try:
        return replace(Config(), result)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def default_config() -> Config:
    """The embedded default run (``jaxpo train`` with no arguments); see jaxpo.train.default."""
    from jaxpo.train import default  # local: default imports this module

    return replace(Config(), default.CONFIG)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """The run configuration: a preset file (or the embedded default) plus overrides.

    Args:
        path: a ``configs/*.py`` file defining ``get_config()``, or None for the embedded default.
        overrides: ``--config.section.field=value`` strings.

    Returns:
        The validated, frozen :class:`Config`.
    """
    config = from_preset_file(path) if path else default_config()
    config = apply_overrides(config, overrides)
    check(config)
    return config


def build_objective(loss: LossConfig) -> tuple[Any, dict[str, Any]]:
    """The ``jaxpo.losses`` Objective of ``loss`` and the hyperparameter overrides to call it with.

    ``beta`` and each ``kwargs`` entry go to every component that has that hyperparameter (an
    entry no component has is an error). For a single objective call ``obj(inputs, **hparams)``;
    for a combination the overrides are baked into the returned Objective and ``hparams`` is {}.
    ``modifier`` wraps the result with :func:`jaxpo.losses.with_wpo` or
    :func:`jaxpo.losses.with_ld` (LD's α: kwargs ``ld_alpha``, or ``alpha`` when no component
    has an ``alpha`` of its own).
    """
    from jaxpo import losses  # local: keeps config import light

    weights = loss.objective_weights()
    try:
        parts = {name: losses.get(name) for name in weights}
    except KeyError as e:
        raise ValueError(f"config.loss.name: {e.args[0]}") from None
    given = loss.hyperparameters()
    modifier_kwargs = _modifier_kwargs(loss.modifier, given, parts)
    for key in given:
        if not any(key in obj.hyperparameters for obj in parts.values()):
            known = sorted({k for obj in parts.values() for k in obj.hyperparameters})
            field = "beta" if key == "beta" else "kwargs"
            raise ValueError(
                f"config.loss.{field}: objective {'+'.join(parts)!r} has no hyperparameter "
                f"{key!r}; known: {known}"
            )
    if len(parts) == 1 and next(iter(weights.values())) == 1.0:
        objective, hparams = next(iter(parts.values())), given
    else:
        baked = {
            name: {k: v for k, v in given.items() if k in obj.hyperparameters}
            for name, obj in parts.items()
        }
        objective, hparams = losses.combine(weights, hparams=baked), {}
    return _modify(objective, loss.modifier, modifier_kwargs), hparams


def _modifier_kwargs(modifier: str, given: dict[str, Any], parts: Mapping[str, Any]
                     ) -> dict[str, Any]:
    """Pops the modifier's own arguments (LD's α) out of ``given``."""
    if modifier != "ld":
        return {}
    own_alpha = any("alpha" in obj.hyperparameters for obj in parts.values())
    key = "ld_alpha" if "ld_alpha" in given or own_alpha else "alpha"
    if key not in given:
        return {}
    alpha = given.pop(key)
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"config.loss.kwargs: {key}={alpha!r} (LD-DPO's α) must be in [0, 1]")
    return {"alpha": float(alpha)}


def _modify(objective: Any, modifier: str, kwargs: dict[str, Any]) -> Any:
    """``objective`` wrapped by ``modifier`` ("" leaves it as it is)."""
    if not modifier:
        return objective
    from jaxpo import losses

    if "pair" not in objective.kinds:
        raise ValueError(f"config.loss.modifier={modifier!r} applies to pairwise objectives; "
                         f"{objective.name!r} trains on {list(objective.kinds)}")
    try:
        wrapped = (losses.with_wpo(objective) if modifier == "wpo"
                   else losses.with_ld(objective, **kwargs))
    except ValueError as e:
        raise ValueError(f"config.loss.modifier={modifier!r}: {e}") from None
    return dataclasses.replace(wrapped, kinds=("pair",))  # a modified loss reads pairs only


def check(config: Config) -> None:
    """Checks that need other packages or span sections: the model preset and the objective
    exist, and the objective gets its reference and its data kind."""
    if not config.model.path:
        from jaxpo.models import preset_names

        if config.model.preset not in preset_names():
            raise ValueError(f"config.model.preset={config.model.preset!r} is not a model "
                             f"preset; choose from {preset_names()} or set config.model.path")
    objective, _ = build_objective(config.loss)
    if objective.needs_reference and config.reference.mode == "none":
        raise ValueError(
            f"config.reference.mode='none' but objective {objective.name!r} needs a reference; "
            "use config.reference.mode=model|precomputed or a reference-free objective"
        )
    if (objective.level == "token" and objective.needs_reference
            and config.reference.mode != "model"):
        raise ValueError(
            f"config.reference.mode={config.reference.mode!r}: objective {objective.name!r} is "
            "token-level and needs the reference model's per-token distributions; use "
            "config.reference.mode=model"
        )
    kind = config.data.format
    if kind != "auto" and kind not in objective.kinds:
        raise ValueError(
            f"config.data.format={kind!r} is not supported by objective {objective.name!r}; "
            f"it trains on {list(objective.kinds)}"
        )


def to_json_dict(config: Config) -> dict[str, dict[str, Any]]:
    """A JSON-able dict (what checkpoints store)."""
    return config.to_dict()


def from_dict(data: Mapping[str, Mapping[str, Any]]) -> Config:
    """Inverse of :func:`to_json_dict` (lists become tuples)."""
    return replace(Config(), data)
