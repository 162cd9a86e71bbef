"""Strict YAML schemas: unknown keys are refused, and every failure becomes one `InputError` line."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import TypeVar

import pydantic
import yaml

from orchestrator.errors import MISSING, InputError


class StrictModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=pydantic.BaseModel)


def load_yaml(path: str | Path, model: type[M], overrides: list[str] = ()) -> M:
    """Load and validate; each override is `dotted.key=value`, the value read as YAML (`--set` on the CLI)."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InputError(source, "file", source, "no such file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "file"
        raise InputError(source, where, getattr(err, "problem", "?"), "the file must be valid YAML") from None
    if not isinstance(data, dict):
        raise InputError(source, "file", type(data).__name__, "the top level must be a mapping of keys")
    for override in overrides:
        _apply_override(source, data, override)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        raise from_validation_error(source, model, err) from None


def _apply_override(source: str, data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise InputError(source, "--set", override, "use key=value, e.g. --set output_dir=runs/try2")
    *parents, leaf = key.split(".")
    target = data
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise InputError(source, key, raw, f"{part} is not a section")
    target[leaf] = yaml.safe_load(raw)


def _field_path(loc: tuple) -> str:
    if not loc:
        return "(top level)"
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _model_at(model: type[pydantic.BaseModel], loc: tuple) -> type[pydantic.BaseModel] | None:
    """The model class that owns the last key of `loc`, so an unknown key can list the allowed ones."""
    current: object = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, pydantic.BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, pydantic.BaseModel) else None


def _unwrap(annotation: object) -> object:
    """Find the BaseModel inside Optional[...], list[...] or a union of models, if there is one."""
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, pydantic.BaseModel):
            return arg
        inner = _unwrap(arg) if typing.get_args(arg) else None
        if inner is not None:
            return inner
    return None


def from_validation_error(source: str, model: type[pydantic.BaseModel], err: pydantic.ValidationError) -> InputError:
    """Turn pydantic's first error into our one-line form."""
    first = err.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1]) if len(loc) > 1 else model
        keys = sorted(owner.model_fields) if owner else []
        return InputError(source, _field_path(loc), first.get("input"), f"unknown key; allowed keys here: {', '.join(keys)}")
    if kind == "missing":
        return InputError(source, _field_path(loc), MISSING, "it is required")
    message = first["msg"]
    message = message.removeprefix("Value error, ")
    return InputError(source, _field_path(loc), first.get("input"), message[0].lower() + message[1:])
