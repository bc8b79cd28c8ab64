"""argparse flags made from a stage's config dataclass, so each default, type and choice is written once: in the
config (its field defaults and its `CHOICES`). The CLI writes only the help text."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable


def add_config_flags(p, config: type, help: dict[str, str], *, flags: dict[str, str] | None = None,
                     parse: dict[str, Callable[[str], Any]] | None = None, nargs: dict[str, str] | None = None,
                     required: tuple[str, ...] = ()) -> None:
    """One flag per field named in `help` (in its order): `--field-name` unless `flags` renames it, typed by the
    field's annotation (or `parse`), with the field's default and `config.CHOICES`. A bool defaulting to False is a
    switch, one defaulting to True a `--no-` switch, one defaulting to None `--x/--no-x`; a tuple takes one or
    more values (or `nargs`). The default is appended to the help, which must explain a None default itself."""
    fields, hints = {f.name: f for f in dataclasses.fields(config)}, typing.get_type_hints(config)
    for name, text in help.items():
        default, kind = _default(fields[name]), _base(hints[name])
        flag = (flags or {}).get(name) or "--" + ("no-" if default is True else "") + name.replace("_", "-")
        options: dict[str, Any] = {"dest": name, "default": default}
        if name in required:
            options.update(required=True, default=argparse.SUPPRESS)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction if default is None else (
                "store_false" if default else "store_true")
        else:
            item = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
            options["type"] = (parse or {}).get(name, item)
            options["choices"] = getattr(config, "CHOICES", {}).get(name)
            if typing.get_origin(kind) is tuple and name not in (parse or {}):
                options["nargs"] = (nargs or {}).get(name, "+")
        choices = options.get("choices")
        if choices:  # listed in the help, not the usage line (the method list is long)
            text = f"{text}; one of: {', '.join(choices)}"
            options["metavar"] = name.removesuffix("s").upper()
        options["help"] = text if name in required or kind is bool and default is not None else _shown(name, text,
                                                                                                       default)
        p.add_argument(flag, **options)


def config_from(args: argparse.Namespace, config: type, **given: Any) -> Any:
    """`config` from the parsed flags that name its fields (lists as tuples) and `given`; the rest default."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
    return config(**{**values, **given})


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _base(annotation: Any) -> Any:
    """`int | None` -> int; other annotations as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _shown(name: str, text: str, default: Any) -> str:
    if default is None:
        if "default" not in text:  # the author's bug: a reader must learn what leaving the flag out does
            raise ValueError(f"the help of {name} must say what its None default means")
        return text
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else str(default)
    return f"{text} (default: {shown or 'none'})" if "%(default)" not in text else text


__all__ = ["add_config_flags", "config_from"]
