"""The argument parser every ``vlm`` command uses (``vlm``, ``vlm serve``, ``vlm-serve``, ``vlm train``, ``vlm-train``).

argparse's defaults surprise a user three ways: a usage error prints the whole usage block; an unknown flag after
a subcommand is reported by the top-level parser, under its usage; and ``--max-token 5`` is silently read as
``--max-tokens``. A ``CommandParser`` reports every usage error as one line naming the (sub)command that owns
it, exit code 2, and takes only whole option names. (``vlm-kernels`` may not import this package; its CLI keeps
its own few lines of the same rules, and the tests hold both to them.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["EXIT_USAGE", "CommandParser", "non_negative_int", "positive_int", "report"]

EXIT_USAGE = 2


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line usage errors, no prefix abbreviations, and unknown arguments
    reported by the subcommand they follow (so ``parse_known_args`` never returns extras). Subparsers are of the
    same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        # A subparser gets every argument after its name, so what it does not know is an error of its own: say so
        # here, under its name, instead of handing the rest up to the top-level parser.
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def set_defaults(self, **kwargs: Any) -> None:
        # The command a handler runs under, as the user typed it ("vlm generate", "vlm-train fuse"), for its errors.
        if "handler" in kwargs:
            kwargs.setdefault("command_name", self.prog)
        super().set_defaults(**kwargs)


def _bounded_int(lowest: int, words: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be {words}, got {value}")
        return value

    convert.__name__ = words
    return convert


positive_int = _bounded_int(1, "at least 1")
non_negative_int = _bounded_int(0, "at least 0")


def report(command: str, message: object) -> int:
    """Print a user-facing failure as one line and return the usage exit code."""
    print(f"{command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE
