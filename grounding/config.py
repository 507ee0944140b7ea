"""Typed configs are the CLI: pydantic models become argparse flags, and YAML files fill them.

Each field becomes ``--field-name`` with the field's description as help text and its default
shown. ``--config FILE.yaml`` loads the same model from a file; flags given on the command line
win over the file. Validation errors name the flag (``--max-pixels``), not the Python field.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError


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


def add_model_args(parser: argparse.ArgumentParser, model: type[BaseModel],
                   positional: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``model`` (``positional`` names become positional args)."""
    for name, f in model.model_fields.items():
        tp, _ = _unwrap(f.annotation)
        required = f.is_required()
        kw: dict[str, Any] = {"help": f.description or ""}
        if not required:
            default = f.default_factory() if f.default_factory is not None else f.default
            kw["help"] += f" (default: {default!r})"
        kw["default"] = argparse.SUPPRESS  # unset flags do not override --config values
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kw["choices"] = list(typing.get_args(tp))
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
        if name in positional:
            kw.pop("default")
            if not required:
                kw["nargs"] = "?"
                kw["default"] = argparse.SUPPRESS
            parser.add_argument(name, **kw)
        else:
            if required:
                kw["help"] += " (required)"
            parser.add_argument(_flag(name), dest=name, **kw)


def model_from_args(model: type[BaseModel], args: argparse.Namespace,
                    config_path: str | None = None):
    """Build ``model`` from a YAML file (optional) overridden by parsed flags.

    Raises ``SystemExit`` with a readable message naming the flags on validation errors.
    """
    data: dict[str, Any] = {}
    if config_path:
        import yaml

        loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {config_path} must hold a mapping of settings")
        data.update({k.replace("-", "_"): v for k, v in loaded.items()})
    data.update({k: v for k, v in vars(args).items() if k in model.model_fields})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            where = _flag(loc) if loc else "config"
            lines.append(f"  {where}: {err['msg']}")
        raise SystemExit("error: invalid settings\n" + "\n".join(lines)) from None
