"""Stage settings as dataclasses that define their own command-line flags.

Each stage keeps its settings in one dataclass (`PrefillConfig`, `TrainConfig`, ...):
the field's default is the only place the default is written, and its metadata (help,
choices, a range check) drives three things at once:

- `add_arguments(parser, Config)`: one `--flag-name` per field, typed from the annotation;
- `from_args(Config, args)`: the dataclass back from the parsed namespace;
- `from_mapping(Config, section, where)`: a `pdengine run` config section checked key by
  key (unknown keys and bad values are InputErrors naming the section and the key).

Declare a field with `setting(default, "help text", check=POSITIVE)`. Supported types:
int, float, str, bool (`--flag` / `--no-flag`), `X | None`, and `tuple[str, ...]`
(comma-separated on the command line, a list in a config file). Floats must be finite.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from pdengine.errors import InputError


@dataclass(frozen=True)
class Check:
    """A range check: `test(value)` must hold; `text` says what is allowed."""

    test: typing.Callable[[typing.Any], bool]
    text: str


POSITIVE = Check(lambda v: v > 0, "> 0")
NON_NEGATIVE = Check(lambda v: v >= 0, ">= 0")
FRACTION = Check(lambda v: 0 <= v < 1, "in [0, 1)")
UNIT = Check(lambda v: 0 <= v <= 1, "in [0, 1]")


def setting(default, help: str, *, choices=None, check: Check | None = None, flag: str | None = None):
    """A dataclass field carrying its flag's help, choices and range check."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "check": check, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults")
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------ types


def _field_type(cls, f: dataclasses.Field):
    """(base type, optional?) of a field: int, float, str, bool or tuple."""
    hint = typing.get_type_hints(cls)[f.name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    base = typing.get_origin(hint) or hint
    if base not in (int, float, str, bool, tuple):
        raise TypeError(f"{cls.__name__}.{f.name}: unsupported setting type {hint!r}")
    return base, optional


def _split_list(value) -> tuple:
    if isinstance(value, str):
        return tuple(v for v in value.replace(",", " ").split() if v)
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    raise InputError(f"expected a list or a comma-separated string, got {value!r}")


_KIND = {int: "an integer", float: "a number", str: "a string"}


def _coerce(base, value):
    """`value` as `base`, accepting what YAML/TOML or argparse hand over; InputError if not."""
    if base is tuple:
        return _split_list(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"expected true or false, got {value!r}")
    if isinstance(value, bool):  # YAML's `yes` must not become 1
        raise InputError(f"expected {_KIND[base]}, got {value!r}")
    if base is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InputError(f"expected an integer, got {value!r}") from None
    if base is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InputError(f"expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {value!r}")
    return value


def check_settings(config) -> None:
    """Raise InputError naming the first field whose value is out of range."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{f.name} must be a finite number, got {value!r}")
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise InputError(f"{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        if check is not None and not check.test(value):
            raise InputError(f"{f.name} must be {check.text}, got {value!r}")


# ------------------------------------------------------------------------ argparse


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    d = f.default
    if isinstance(d, tuple):
        return ",".join(d) or "none"
    return "auto" if d is None else str(d)


def add_arguments(parser: argparse.ArgumentParser, cls, *, exclude=()) -> None:
    """One flag per field of `cls` (except `exclude`); defaults come from the dataclass."""
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        base, optional = _field_type(cls, f)
        help_text = f"{f.metadata.get('help', '')} (default: {_default_text(f)})".strip()
        kwargs = {"dest": f.name, "default": f.default, "help": help_text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is tuple:
            kwargs.update(type=_split_list, metavar="A,B,...")
        else:
            kwargs.update(type=_argparse_type(base), choices=f.metadata.get("choices"))
        parser.add_argument(_flag(f), **kwargs)


def _argparse_type(base):
    def parse(text: str):
        try:
            return _coerce(base, text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = base.__name__
    return parse


def from_args(cls, args: argparse.Namespace, **overrides):
    """The `cls` instance described by parsed `args` (plus keyword overrides)."""
    # An unset flag may read as None (a parser that must tell given flags from defaults):
    # it means the dataclass default, as it does for `X | None` fields.
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and getattr(args, f.name, None) is not None}
    values.update(overrides)
    return cls(**values)


# ------------------------------------------------------------------------ config files


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def from_mapping(cls, section: dict, where: str, **overrides):
    """Build `cls` from a config-file section; every problem is an InputError naming `where.key`.

    Keys may use dashes or underscores (`batch-tokens` or `batch_tokens`)."""
    if not isinstance(section, dict):
        raise InputError(f"{where} must be a mapping of settings, got {type(section).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in section.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise InputError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}")
        base, optional = _field_type(cls, fields[name])
        if value is None and optional:
            values[name] = None
            continue
        try:
            values[name] = _coerce(base, value)
        except InputError as e:
            raise InputError(f"{where}.{key}: {e}") from None
    values.update(overrides)
    try:
        return cls(**values)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def to_dict(config) -> dict:
    """JSON-ready settings (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


__all__ = ["Check", "POSITIVE", "NON_NEGATIVE", "FRACTION", "UNIT", "setting", "check_settings", "add_arguments",
           "from_args", "from_mapping", "field_names", "to_dict"]
