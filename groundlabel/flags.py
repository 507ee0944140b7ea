"""Typed configs are the CLI: a `grounding.settings.Settings` model becomes argparse flags.

Each field becomes ``--field-name`` with the field's description as help text and its default
shown; the fields of a settings group (storage, Ray, engine ...) become flags of the verb too,
shown under the group's own heading. ``--config FILE.yaml`` loads the same model from a file
(flat keys, or a nested mapping per group); flags given on the command line win over the file.
Validation errors name the flag (``--max-pixels``), not the Python field.

A field's ``json_schema_extra`` may say ``positional: True`` (a positional argument), ``flag``
(another flag name, e.g. ``--from``) or ``metavar``.

Why our own ~150 lines and not a library: pydantic-settings' CLI and jsonargparse both name a
nested group's fields with a dotted prefix (``--storage.s3-endpoint-url``), which would break
every documented command, the cluster manifests and users' scripts; flattening is what we need
and is short.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from grounding.settings import Settings, group_type


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _extra(f) -> dict:
    return f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}


def _add_field(parser, name: str, f, fixed: dict) -> None:
    if name in fixed:
        return
    tp, _ = _unwrap(f.annotation)
    extra = _extra(f)
    required = f.is_required()
    kw: dict[str, Any] = {"help": f.description or ""}
    if not required and "default" not in kw["help"].lower():
        default = f.default_factory() if f.default_factory is not None else f.default
        kw["help"] += f" (default: {default!r})"
    kw["default"] = argparse.SUPPRESS  # unset flags do not override --config values
    origin = typing.get_origin(tp)
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kw["choices"] = list(typing.get_args(tp))
    elif origin is tuple and typing.get_args(tp) and Ellipsis not in typing.get_args(tp):
        kw["nargs"] = len(typing.get_args(tp))
        kw["type"] = typing.get_args(tp)[0]
    elif origin in (list, tuple):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        kw["nargs"] = "+"
        kw["type"] = inner if inner in (int, float, str) else str
    elif tp in (int, float, str):
        kw["type"] = tp
    elif origin is dict or tp is dict:
        kw["type"] = _json_object
        kw["metavar"] = "JSON"
    else:
        kw["type"] = str
    if "metavar" in extra:
        kw["metavar"] = extra["metavar"]
    if extra.get("positional"):
        kw.pop("default")
        if not required:
            kw["nargs"] = "?"
            kw["default"] = argparse.SUPPRESS
        parser.add_argument(name, **kw)
        return
    if required:
        kw["help"] += " (required)"
    parser.add_argument(extra.get("flag", _flag(name)), dest=name, **kw)


def add_model_args(parser: argparse.ArgumentParser, model: type[BaseModel],
                   fixed: dict | None = None) -> None:
    """One argument per field of ``model``; a settings group's fields go under its heading.

    ``fixed`` names fields the verb sets itself (no flag)."""
    fixed = fixed or {}
    groups = model.groups() if issubclass(model, Settings) else {}
    for name, f in model.model_fields.items():
        if name in groups:
            g = groups[name]
            doc = (g.__doc__ or name).strip()
            title, _, rest = doc.partition(":")
            rest = (rest or doc).strip()
            sub = parser.add_argument_group(title.strip().lower(), rest[:1].upper() + rest[1:])
            for gname, gf in g.model_fields.items():
                if group_type(gf.annotation) is not None:  # a group inside a group: not used
                    raise TypeError(f"{model.__name__}.{name}.{gname}: nested groups")
                _add_field(sub, gname, gf, fixed)
        else:
            _add_field(parser, name, f, fixed)


def _flat_names(model: type[BaseModel]) -> set[str]:
    if issubclass(model, Settings):
        return set(model.flat_fields())
    return set(model.model_fields)


def load_yaml(path: str) -> dict:
    """A YAML file of settings as a mapping (``-`` in keys read as ``_``)."""
    import yaml

    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise SystemExit(f"error: {path} must hold a mapping of settings")
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def model_from_args(model: type[BaseModel], args: argparse.Namespace,
                    config_path: str | None = None, fixed: dict | None = None):
    """Build ``model`` from a YAML file (optional) overridden by parsed flags.

    Raises ``SystemExit`` with a readable message naming the flags on validation errors.
    """
    data: dict[str, Any] = load_yaml(config_path) if config_path else {}
    names = _flat_names(model)
    data.update({k: v for k, v in vars(args).items() if k in names})
    data.update(fixed or {})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SystemExit("error: invalid settings\n" + describe(e, model)) from None


def describe(e: ValidationError, model: type[BaseModel]) -> str:
    """A validation error as lines naming flags: ``  --max-pixels: ...``."""
    groups = model.groups() if issubclass(model, Settings) else {}
    lines = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        if loc and loc[0] in groups:  # a group's field is a flag of the verb itself
            loc = loc[1:]
        where = _flag(loc[0]) if loc else "settings"
        if len(loc) > 1:
            where += "[" + ".".join(loc[1:]) + "]"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)
