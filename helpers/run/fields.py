"""Settings stated once: dataclass fields that carry their help text, flag and check.

A field made with `setting(default, help, check)` keeps its command-line help, flag name and
validation in its metadata. A frozen settings dataclass calls `validate(self)` in its
`__post_init__`; `add_dataclass_flags` turns the same fields into argparse flags whose
`type=` runs the same checks, and `flag_values` reads the given ones back. Every command line
of the course (fine-tuning, DPO, preference pairs, the chat server) is built this way, so a
dataclass and its flags cannot drift apart.

    @dataclass(frozen=True)
    class Settings:
        epochs: int = setting(2, "training epochs", positive_int)
        def __post_init__(self) -> None:
            validate(self)

    add_dataclass_flags(parser, Settings)                     # --epochs N (default: 2)
    Settings(**flag_values(parser.parse_args(), Settings))
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, field, fields
from typing import Any

Check = Callable[[Any], str | None]  # returns what is wrong with a value, or None
# Metadata entries handed to argparse as they are (besides help, flag and check).
_ARGPARSE_KEYS = ("action", "choices", "metavar", "nargs", "required")


def setting(
    default: Any = MISSING,
    help: str = "",
    check: Check | None = None,
    *,
    flag: str | None = None,
    cli: bool = True,
    **argparse_options: Any,
) -> Any:
    """A dataclass field that carries its help text, flag name (default: --field-name) and check.

    `cli=False`: validated, but no flag. `argparse_options` (choices, metavar, nargs, action,
    required) go to argparse as they are; `none="all"` says what a None default means in help.
    """
    metadata = {"help": help, "check": check, "flag": flag, "cli": cli, **argparse_options}
    return field(default=default, metadata=metadata)


# --- checks: each returns what is wrong with a value, or None --------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(value: Any) -> str | None:
    """Any whole number (not a bool)."""
    return None if _is_int(value) else f"must be an integer, got {value!r}"


def positive_int(value: Any) -> str | None:
    """A whole number > 0."""
    if not _is_int(value):
        return f"must be an integer, got {value!r}"
    return None if value > 0 else f"must be > 0, got {value!r}"


def int_at_least_zero(value: Any) -> str | None:
    """A whole number >= 0."""
    if not _is_int(value):
        return f"must be an integer, got {value!r}"
    return None if value >= 0 else f"must be >= 0, got {value!r}"


def positive_number(value: Any) -> str | None:
    """A finite number > 0."""
    return None if _is_number(value) and value > 0 else f"must be > 0 (finite), got {value!r}"


def number_at_least_zero(value: Any) -> str | None:
    """A finite number >= 0."""
    return None if _is_number(value) and value >= 0 else f"must be >= 0, got {value!r}"


def fraction(value: Any) -> str | None:
    """A number in [0, 1]."""
    return None if _is_number(value) and 0 <= value <= 1 else f"must be in [0, 1], got {value!r}"


def dropout_rate(value: Any) -> str | None:
    """A number in [0, 1) (GPTConfig.drop_rate)."""
    return None if _is_number(value) and 0 <= value < 1 else f"must be in [0, 1), got {value!r}"


def boolean(value: Any) -> str | None:
    """True or False."""
    return None if isinstance(value, bool) else f"must be True or False, got {value!r}"


def text(value: Any) -> str | None:
    """A string."""
    return None if isinstance(value, str) else f"must be a string, got {value!r}"


def texts(value: Any) -> str | None:
    """A tuple of strings."""
    ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return None if ok else f"must be a tuple of strings, got {value!r}"


def one_of(*choices: str) -> Check:
    """A check that accepts only `choices`."""

    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {choices}, got {value!r}"

    return check


def optional(check: Check) -> Check:
    """`check`, or None."""

    def optional_check(value: Any) -> str | None:
        problem = None if value is None else check(value)
        return None if problem is None else f"{problem.split(', got')[0]} or None, got {value!r}"

    return optional_check


def setting_like(cls: type, name: str, default: Any = MISSING) -> Any:
    """A field with the help, flag and check of field `name` of dataclass `cls`, stated there once.

    It keeps that field's default unless `default` is given; a None default (filled in later,
    e.g. from a model's run defaults) makes the check accept None.
    """
    base = next(f for f in fields(cls) if f.name == name)
    metadata = dict(base.metadata)
    if default is MISSING:
        default = base.default
    elif default is None and metadata.get("check") is not None:
        metadata["check"] = optional(metadata["check"])
    return field(default=default, metadata=metadata)


def field_problem(cls: type, name: str, value: Any) -> str | None:
    """What is wrong with `value` for field `name` of `cls` (None if it is valid)."""
    check = next(f.metadata.get("check") for f in fields(cls) if f.name == name)
    return check(value) if check is not None else None


def validate(obj: Any) -> None:
    """Run every field's check; ValueError naming the first bad field ("Cls.name must ...")."""
    for f in fields(obj):
        problem = field_problem(type(obj), f.name, getattr(obj, f.name))
        if problem:
            raise ValueError(f"{type(obj).__name__}.{f.name} {problem}")


# --- command-line flags from the fields ------------------------------------------------------


def _parse(kind: Callable[[str], Any], cls: type | None = None, name: str = "") -> Any:
    # argparse `type=`: convert the text, then run the field's own check (if a cls is given).
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = getattr(kind, "__name__", "value")
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}") from None
        problem = field_problem(cls, name, value) if cls is not None else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _base_type(hint: Any) -> Any:
    # `int | None` -> int, `tuple[str, ...]` -> str: what one command-line word converts to.
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (tuple, list, Sequence):
        return typing.get_args(hint)[0]
    return hint


def _show(value: Any, meta: Mapping[str, Any]) -> str:
    if value is None:
        return str(meta.get("none", "none"))
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default_note(f: Field[Any], presets: Mapping[str, Any] | None) -> str:
    # " (default: X)"; for a model-dependent default " (default: X; tiny: Y)" from `presets`.
    found = {
        label: getattr(p, f.name) for label, p in (presets or {}).items() if hasattr(p, f.name)
    }
    if len({repr(v) for v in found.values()}) > 1:
        return " (" + "; ".join(f"{k}: {_show(v, f.metadata)}" for k, v in found.items()) + ")"
    if f.default in (MISSING, None, ()) or isinstance(f.default, bool):
        return ""
    return f" (default: {_show(f.default, f.metadata)})"


def _flag_options(cls: type, f: Field[Any], hint: Any) -> dict[str, Any]:
    """argparse's keyword arguments for field `f` (all but help and default)."""
    meta = f.metadata
    options = {k: meta[k] for k in _ARGPARSE_KEYS if meta.get(k) is not None}
    kind = _base_type(hint)
    if kind is bool and "action" not in options:
        # The flag sets the opposite of the default: --mask-prompt, --quiet, --no-checkpoint.
        options.update(action="store_const", const=not f.default)
    elif options.get("action") == "append" or "nargs" in options or "choices" in options:
        options["type"] = _parse(kind)  # argparse checks choices; the dataclass, whole tuples
    elif "action" not in options:
        options["type"] = _parse(kind, cls, f.name)
    return options


def flag_fields(cls: type) -> list[Field[Any]]:
    """The fields of dataclass `cls` that have a command-line flag (those with help text)."""
    return [f for f in fields(cls) if f.metadata.get("help") and f.metadata.get("cli", True)]


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str | None = None,
    *,
    prefix: str = "",
    presets: Mapping[str, Any] | None = None,
    field_defaults: bool = False,
) -> None:
    """One flag per field of the dataclass `cls` (from its metadata), in a group `title`.

    Flags are --<prefix><field-name> unless the field names its own; `dest` is prefix + name.
    Left out, a flag is None (so the caller can tell what was given), or the field's default
    with `field_defaults=True`. `presets` ({"default": book, "tiny": tiny} objects with
    attributes named like the fields) put model-dependent defaults into the help.
    """
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        flag = f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-")
        default = f.default if field_defaults and f.default is not MISSING else None
        group.add_argument(
            flag,
            dest=prefix + f.name,
            default=default,
            help=f.metadata["help"] + _default_note(f, presets),
            **_flag_options(cls, f, hints[f.name]),
        )


def flag_values(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """{field: value} of the flags of `cls` that `args` holds (not None); lists become tuples."""
    values = {f.name: getattr(args, prefix + f.name) for f in flag_fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}
