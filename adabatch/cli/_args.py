"""Argument types and checks shared by the sub-commands: every flag is validated before any work starts, and a
bad value ends the command with one line naming the flag (exit code 2), never a traceback."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

__all__ = ["CommandError", "Parser", "at_least", "check", "choice", "host_port", "output_dir", "positive_float"]


class CommandError(Exception):
    """A combination of flags that cannot run; the message names the flags."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that shows defaults in ``--help`` and reports a bad flag in one line (no usage dump)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _finite_float(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        what = "non-negative" if allow_zero else "positive"
        raise argparse.ArgumentTypeError(f"must be a {what} finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite float ``> 0``."""
    return _finite_float(text, allow_zero=False)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite float ``>= 0``."""
    return _finite_float(text, allow_zero=True)


def choice(valid: tuple[str, ...], what: str) -> Callable[[str], str]:
    """An argparse type: one of ``valid`` (the message lists them)."""

    def parse(value: str) -> str:
        if value not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; valid choices: {', '.join(valid)}")
        return value

    parse.__name__ = what
    return parse


def name_list(valid: tuple[str, ...], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated, non-empty list of names from ``valid`` (the message lists them)."""
    one = choice(valid, what)

    def parse(value: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in value.split(",") if part.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s, got {value!r}")
        return tuple(one(name) for name in names)

    parse.__name__ = f"{what} list"
    return parse


def output_dir(text: str) -> str:
    """An argparse type: a directory to write into (absent, or an existing directory; not a file)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return text


def host_port(text: str) -> str:
    """An argparse type: ``HOST:PORT`` (a host name or address, ``[v6]`` in brackets, and a port in 1..65535)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port in 1..65535, got {text!r}")
    return text


def check(condition: bool, message: str) -> None:
    """Raise :class:`CommandError` with ``message`` (naming the flags) unless ``condition``."""
    if not condition:
        raise CommandError(message)
