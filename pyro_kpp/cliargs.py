"""argparse types shared by the CLIs: bad values are refused at parse time, naming the ``--flag``;
and the training CLI's options generated from the ``Config`` dataclass (``add_config_options``).

A float option accepts "nan" and "inf" from ``float`` itself; none of ours has a use for
them (a NaN learning rate or noise level silently ruins a run or disables a check).
"""
from __future__ import annotations

import argparse
import dataclasses
import math


def finite_float(text: str) -> float:
    """A finite number (argparse reports ``argument --flag: ...`` with our message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_shape(text: str) -> tuple[int, int, int]:
    """C,H,W (or CxHxW) as three positive sizes."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,64,64), got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes C,H,W, got {text!r}")
    return shape


#: argparse type of a config field, by its annotation (the config module's annotations are strings).
_TYPES = {"int": int, "int | None": int, "float": finite_float, "float | None": finite_float,
          "str": str, "str | None": str, "tuple[int, int, int]": parse_shape}


def add_config_options(parser: argparse.ArgumentParser, config_cls, choices: dict | None = None) -> list[str]:
    """One option ``--field-name`` per field of the dataclass ``config_cls`` that has help metadata
    (``pyro_kpp.config.opt``), typed by the field's annotation, its default shown in the help;
    ``choices`` adds the choices of fields whose allowed values live elsewhere (the model registry,
    the data sets). Returns the names of the fields that became options.

    The parser should have ``argument_default=argparse.SUPPRESS``: an option that is not given
    is then absent from the parsed namespace, so the config's own default (or a resumed run's
    value) applies.
    """
    names = []
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        if "help" not in meta:
            continue
        flags, default_text = meta.pop("flags"), meta.pop("default_text")
        shown = default_text if default_text is not None else (
            ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default)
        meta["help"] = f"{meta['help']} (default: {shown})"
        if f.name in (choices or {}):
            meta["choices"] = choices[f.name]
        if f.type == "bool":                    # --flag / --no-flag: a resume may turn it either way
            meta["action"] = argparse.BooleanOptionalAction
        else:
            meta["type"] = _TYPES[f.type]
        parser.add_argument(*flags, "--" + f.name.replace("_", "-"), **meta)
        names.append(f.name)
    return names


def flag_message(exc: Exception, fields) -> str:
    """``exc``'s message with a leading ``field_name:`` (the API's wording, e.g. from
    ``Config.validate``) turned into the ``--field-name:`` a command-line user typed."""
    text = str(exc)
    name, sep, rest = text.partition(":")
    return f"--{name.replace('_', '-')}:{rest}" if sep and name in fields else text


def flagged(flag: str, exc: Exception) -> str:
    """An API error about one argument (``"name: ..."``) as the message of the CLI option ``flag``
    that supplied it: ``--steps: ...`` when the names agree, else ``--level (peak): ...``."""
    name, sep, rest = str(exc).partition(": ")
    if not sep or " " in name:
        return f"{flag}: {exc}"
    return f"{flag}: {rest}" if name == flag.lstrip("-").replace("-", "_") else f"{flag} ({name}): {rest}"


def check_options(checks) -> None:
    """Run each ``(flag, check)`` pair's ``check()``; a ValueError it raises becomes the message of
    ``flag`` (``flagged``). For API checks run by a CLI before any slow work."""
    for flag, check in checks:
        try:
            check()
        except ValueError as exc:
            raise ValueError(flagged(flag, exc)) from None
