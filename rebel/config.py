"""Dataclass configs: documented fields, command-line options, YAML round trips, and the
checks of their values (one-line ``ValueError`` naming the setting, the value and what is expected)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text (shown by ``rebel ... --help``)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def with_defaults(base: type[T], **defaults: Any) -> type[T]:
    """The dataclass ``base`` with other defaults for some of its fields (their type and help
    stay ``base``'s): an adapter's config derives from ``with_defaults(TrainerConfig, ...)``
    and declares only its own fields."""
    fields = {f.name: f for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(defaults) - set(fields))
    if unknown:
        raise TypeError(f"{base.__name__} has no field(s) {unknown}")
    namespace: dict[str, Any] = {"__module__": base.__module__, "__qualname__": base.__qualname__, "__annotations__": {}}
    for name, value in defaults.items():
        namespace["__annotations__"][name] = fields[name].type
        namespace[name] = option(value, fields[name].metadata.get("help", ""))
    return dataclasses.dataclass(type(base.__name__, (base,), namespace))


def pick(config: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """``{name: config.name}``: the settings a config hands on under their own names."""
    return {name: getattr(config, name) for name in names}


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str | None = None,
    defaults: dict[str, Any] | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """One ``--field-name`` option per field of the dataclass ``cls``; options left out
    of the command line stay absent from the parsed namespace. ``defaults`` only changes
    the default shown in the help (pass the same dict to :func:`from_args`)."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, _default(f))
        help_text = f.metadata.get("help", "")
        # a None default whose help names the real one (variant-dependent) shows only that
        if default is not None or "default" not in help_text:
            help_text = f"{help_text} (default: {default})".strip()
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) in (list, tuple):
            item = typing.get_args(kind)[0]
            group.add_argument(
                flag, dest=f.name, type=item, nargs="+", default=argparse.SUPPRESS, help=help_text, metavar=item.__name__.upper()
            )
        elif kind in (int, float, str):
            group.add_argument(
                flag, dest=f.name, type=_parser(kind, optional), default=argparse.SUPPRESS, help=help_text, metavar=kind.__name__.upper()
            )


def from_dict(cls: type[T], values: dict[str, Any], **overrides: Any) -> T:
    """Build ``cls`` from a dict (a ``config.yaml`` section), with ``overrides`` on top;
    an unknown key is an error naming it."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged = {**values, **overrides}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(names)}")
    return cls(**merged)


def from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from ``base`` (defaults, or a resumed run's config) and the options given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return from_dict(cls, base or {}, **given)


def _default(f: dataclasses.Field) -> Any:
    """A field's default (made by its factory for a list or dict), None where it has none."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _base_type(hint: Any) -> tuple[Any, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return hint, False


def _parser(kind: type, optional: bool) -> Any:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


# ------------------------------------------------------------------ checks


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``: a library's error inside a one-line one."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """``value`` must be an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_counts(**counts: Any) -> None:
    """Each keyword (an argument's name) must be an integer >= 1."""
    for name, value in counts.items():
        check_int(name, value)


def check_positive(name: str, value: Any) -> None:
    """``value`` must be a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(choices)}")


def check_group_size(name: str, value: Any) -> None:
    """``value`` samples per context must be an integer >= 2: REBEL compares the samples of one context."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"{name} must be an integer >= 2 (REBEL compares the samples of one context), got {value!r}")


def check_save_best(save_best: bool, eval_every: int) -> None:
    """A best model is chosen at evaluations: ``save_best`` needs ``eval_every`` > 0."""
    if save_best and not eval_every:
        raise ValueError("save_best=True keeps the model of the best evaluation, but eval_every=0 runs none; set eval_every > 0")
