"""Typed configuration: defaults in code → optional YAML recipe → command-line flags.

Each entry point owns one dataclass tree (nested dataclasses for sections); its fields, declared with
:func:`option`, are also its command-line flags. This module only knows how to fill such a tree, check names and
types, build the flags and save the result; it holds no defaults of its own.

    cfg = resolve(TrainConfig, "recipes/demo.yaml")                      # defaults → recipe
    cfg = parse_args(PredictConfig, argv, prog="dlseg-predict", description="…")   # the dataclass as flags
    save_yaml(cfg, run_dir / "config.yaml")

Keys are dotted paths into the tree (``--optim.lr``); ``-`` and ``_`` are interchangeable in keys
(``--batch-size`` == ``--batch_size``). Unknown keys and values of the wrong type raise :class:`ConfigError`
naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dlseg.errors import ConfigError
from dlseg.fileio import atomic_write

T = TypeVar("T")


def option(help: str, default: Any = dataclasses.MISSING, *, flag: str | None = None, positional: bool = False,
           choices: tuple[str, ...] | None = None, exclusive: str | None = None, default_help: str | None = None,
           metavar: str | tuple[str, ...] | None = None, const: bool = True, repeat: bool = False,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that is also a command-line flag: its help, and its flag name where it differs.

    ``exclusive`` names a group of mutually exclusive flags; ``const`` is what a bool flag given alone sets
    (``option(..., True, flag="--no-isolate", const=False)``); ``repeat``: a list field whose flag may be given
    several times (``--model A --model B``)."""
    meta = {"help": help, "flag": flag, "positional": positional, "choices": choices, "exclusive": exclusive,
            "default_help": default_help, "metavar": metavar, "const": const, "repeat": repeat}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(key, args, value)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (list, tuple):
        return _coerce_sequence(key, origin, args, value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp in _SCALARS:
        return _SCALARS[tp](key, value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _apply_mapping(tp(), value, prefix=f"{key}.")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _coerce_union(key: str, args: tuple[Any, ...], value: Any) -> Any:
    """``X | None`` and other unions: None for none/null when allowed, else the first member that accepts it."""
    if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(key, a, value)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")


def _coerce_sequence(key: str, origin: type, args: tuple[Any, ...], value: Any) -> list[Any] | tuple[Any, ...]:
    """A list or tuple from YAML, a ``[...]`` string or a comma-separated string; fixed-length tuples checked."""
    if isinstance(value, str):
        value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    inner = args[0] if args else Any
    out = [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{key}: expected true/false, got {value!r}")


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if not f.is_integer():
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return int(f)


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None


def _to_str(key: str, value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _apply_mapping(cfg: Any, mapping: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``cfg`` with nested ``mapping`` applied."""
    types_ = _field_types(type(cfg))
    changes = {}
    for raw_key, value in mapping.items():
        key = _norm(str(raw_key))
        if key not in types_:
            raise ConfigError(f"{prefix}{raw_key}: unknown key (known: {', '.join(sorted(types_))})")
        tp = types_[key]
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _apply_mapping(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(f"{prefix}{key}", tp, value)
    return dataclasses.replace(cfg, **changes)


def set_key(cfg: Any, dotted: str, value: Any) -> Any:
    """Return a copy of ``cfg`` with one dotted key set (value may be a string from the command line)."""
    parts = [_norm(p) for p in dotted.split(".")]
    nested: Any = value
    for p in reversed(parts[1:]):
        nested = {p: nested}
    return _apply_mapping(cfg, {parts[0]: nested})


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of keys to values")
    return data


def resolve(cls: type[T], yaml_path: str | Path | None = None) -> T:
    """Defaults of ``cls`` → YAML recipe (the command line's flags go on top: :func:`config_from_namespace`)."""
    cfg = cls()
    return _apply_mapping(cfg, load_yaml(yaml_path)) if yaml_path else cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from :func:`to_dict` output (e.g. a saved ``config.yaml``)."""
    return _apply_mapping(cls(), data)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (atomically)."""
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors: one line, caught by the entry point like any other user error."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("default_help"):
        return f" (default: {f.metadata['default_help']})"
    if f.default is not dataclasses.MISSING and f.default is not None and f.default is not False and f.default != "":
        value = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        return f" (default: {value})"
    return ""


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", values_for_bools: bool = True) -> None:
    """One flag per field of dataclass ``cls`` (sections as ``--section.key``); values stay strings for
    :func:`parse_args` to coerce. Bools are ``--flag`` alone (and ``--flag false`` where ``values_for_bools``)."""
    types_ = _field_types(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(cls):
        tp, meta, key = types_[f.name], f.metadata, prefix + f.name
        if dataclasses.is_dataclass(tp):
            add_flags(parser, tp, prefix=f"{key}.", values_for_bools=values_for_bools)
            continue
        help_ = (meta.get("help") or "") + _default_text(f)
        if meta.get("positional"):
            parser.add_argument(key, metavar=meta.get("flag") or f.name.upper(), help=help_)
            continue
        name = meta.get("flag") or f"--{key.replace('_', '-')}"
        kwargs = _value_kwargs(f, tp, key, values_for_bools)
        target: Any = parser
        if meta.get("exclusive"):
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        target.add_argument(name, help=help_, **kwargs)
        if f"--{key}" != name:      # --batch_size is --batch-size, not shown twice in --help
            target.add_argument(f"--{key}", help=argparse.SUPPRESS, **kwargs)


def _value_kwargs(f: dataclasses.Field, tp: Any, key: str, values_for_bools: bool) -> dict[str, Any]:
    """argparse keywords for the value(s) a field's flag takes (kept as strings for :func:`set_key`)."""
    meta = f.metadata
    kwargs: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS}
    args = typing.get_args(tp)
    if tp is bool:
        const = "true" if meta.get("const", True) else "false"
        if values_for_bools:
            return {**kwargs, "nargs": "?", "const": const, "metavar": "BOOL"}
        return {**kwargs, "action": "store_const", "const": const}
    if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        kwargs["nargs"] = len(args)        # tuple[int, int]: --size MIN MAX
    if meta.get("repeat"):
        kwargs["action"] = "append"
    metavar = meta.get("metavar") or (None if meta.get("choices") else f.name.upper())
    return {**kwargs, "metavar": metavar, "choices": meta.get("choices")}


def build_parser(cls: type, prog: str, description: str, values_for_bools: bool = True) -> FlagParser:
    """The command line of an entry point, generated from its config dataclass."""
    parser = FlagParser(prog=prog, description=description, allow_abbrev=False)
    add_flags(parser, cls, values_for_bools=values_for_bools)
    return parser


def config_from_namespace(cls: type[T], ns: argparse.Namespace, base: T | None = None) -> T:
    """The parsed flags applied to ``base`` (default: ``cls`` built from the positional arguments)."""
    given = dict(vars(ns))
    if base is None:
        base = cls(**{k: given.pop(k) for k in _positional_names(cls)})
    for key, value in given.items():
        base = set_key(base, key, value)
    return base


def _positional_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")]


def parse_args(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """``argv`` → ``cls``: flags generated from the dataclass, values coerced and checked by type."""
    values_for_bools = not _positional_names(cls)
    ns = build_parser(cls, prog, description, values_for_bools).parse_args(argv)
    return config_from_namespace(cls, ns)
