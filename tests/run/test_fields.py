"""helpers.run.fields: one settings dataclass gives its validation, its flags and their help."""

from __future__ import annotations

import argparse
from dataclasses import FrozenInstanceError, dataclass, fields
from types import SimpleNamespace

import pytest

from helpers.run.fields import (
    add_dataclass_flags,
    boolean,
    flag_values,
    one_of,
    optional,
    positive_int,
    positive_number,
    setting,
    setting_like,
    texts,
    validate,
)


@dataclass(frozen=True, kw_only=True)
class Demo:
    """A settings dataclass as the course writes them."""

    epochs: int = setting(2, "training epochs", positive_int, flag="--rounds")
    lr: float | None = setting(None, "learning rate", optional(positive_number))
    mode: str = setting("a", "which mode", one_of("a", "b"), choices=("a", "b"))
    names: tuple[str, ...] = setting((), "a name (repeatable)", texts, action="append")
    quiet: bool = setting(False, "say less", boolean)
    progress: bool = setting(True, "no progress bar", boolean, flag="--no-bar")
    hidden: int = setting(3, "not a flag", positive_int, cli=False)
    plain: int = 0  # no metadata: no flag, no check

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class Borrowed:
    """Fields that take another dataclass's help, flag and check."""

    epochs: int = setting_like(Demo, "epochs")
    lr: float | None = setting_like(Demo, "lr", None)


def _parser(**kw: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo")
    add_dataclass_flags(parser, Demo, "demo (Demo)", **kw)  # type: ignore[arg-type]
    return parser


def test_the_dataclass_validates_with_the_fields_checks() -> None:
    assert Demo().epochs == 2
    with pytest.raises(ValueError, match=r"Demo\.epochs must be > 0, got 0"):
        Demo(epochs=0)
    with pytest.raises(ValueError, match=r"Demo\.lr must be > 0 \(finite\) or None, got nan"):
        Demo(lr=float("nan"))
    with pytest.raises(ValueError, match=r"Demo\.hidden must be > 0"):
        Demo(hidden=-1)
    with pytest.raises(ValueError, match=r"Demo\.names must be a tuple of strings"):
        Demo(names=("a", 1))  # type: ignore[arg-type]
    with pytest.raises(FrozenInstanceError):
        Demo().epochs = 3  # type: ignore[misc]


def test_flags_come_from_the_fields_and_read_back_into_the_dataclass() -> None:
    parser = _parser()
    dests = {a.dest: a.option_strings for a in parser._actions}
    flagged = {"epochs", "lr", "mode", "names", "quiet", "progress"}
    assert flagged <= set(dests) and not {"hidden", "plain"} & set(dests)
    assert dests["epochs"] == ["--rounds"] and dests["progress"] == ["--no-bar"]
    # Left out, every flag is None: the caller can tell what was given.
    assert set(vars(parser.parse_args([])).values()) == {None}
    args = parser.parse_args(
        ["--rounds", "5", "--names", "x", "--names", "y", "--quiet", "--no-bar"]
    )
    values = flag_values(args, Demo)
    assert values == {"epochs": 5, "names": ("x", "y"), "quiet": True, "progress": False}
    assert Demo(**values) == Demo(epochs=5, names=("x", "y"), quiet=True, progress=False)
    # With field_defaults the namespace holds the dataclass's defaults instead.
    defaults = vars(_parser(field_defaults=True).parse_args([]))
    assert (defaults["epochs"], defaults["lr"], defaults["mode"]) == (2, None, "a")
    assert (defaults["names"], defaults["quiet"], defaults["progress"]) == ((), False, True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "argument --rounds: must be > 0, got 0"),
        (["--rounds", "1.5"], "argument --rounds: expected a int, got '1.5'"),
        (["--lr", "inf"], "argument --lr: must be > 0 (finite) or None, got inf"),
        (["--mode", "c"], "argument --mode: invalid choice: 'c'"),
    ],
)
def test_bad_values_are_usage_errors_from_the_same_checks(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_help_shows_the_real_defaults_and_model_dependent_ones() -> None:
    book, tiny = SimpleNamespace(lr=5e-5, epochs=2), SimpleNamespace(lr=5e-3, epochs=2)
    parser = _parser(presets={"default": book, "tiny": tiny})
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["epochs"] == "training epochs (default: 2)"  # the same in both presets
    assert helps["lr"] == "learning rate (default: 5e-05; tiny: 0.005)"
    assert helps["mode"] == "which mode (default: a)"
    assert helps["quiet"] == "say less" and helps["names"] == "a name (repeatable)"


def test_setting_like_states_a_setting_once() -> None:
    demo = {f.name: f for f in fields(Demo)}
    borrowed = {f.name: f for f in fields(Borrowed)}
    assert borrowed["epochs"].default == 2 and borrowed["epochs"].metadata["flag"] == "--rounds"
    assert borrowed["lr"].metadata["help"] == demo["lr"].metadata["help"]
    with pytest.raises(ValueError, match=r"Borrowed\.epochs must be > 0"):
        validate(Borrowed(epochs=0))
