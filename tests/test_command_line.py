"""Usage errors of every command and subcommand (``vlm``, ``vlm-serve``, ``vlm-train``, ``vlm-kernels``): one line
naming the (sub)command that owns the error, exit code 2, and only whole option names (issue 19).

The subcommands are found by walking each script's parser, so a new one is covered without a new test."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vlm_kernels.cli import build_parser as kernels_parser
from vlm_models.cli import build_parser as vlm_parser
from vlm_serve.cli import build_parser as serve_parser
from vlm_train.cli import build_parser as train_parser

SCRIPTS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "vlm": vlm_parser,
    "vlm-serve": serve_parser,
    "vlm-train": train_parser,
    "vlm-kernels": kernels_parser,
}
BIN = Path(sys.executable).parent


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(the words that select it, parser) of ``parser`` and every subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


CASES = [(script, path) for script, build in SCRIPTS.items() for path, _ in commands(build())]
IDS = [" ".join((script, *path)) for script, path in CASES]


def subcommand(script: str, path: tuple[str, ...]) -> argparse.ArgumentParser:
    return dict(commands(SCRIPTS[script]()))[path]


def required_options(parser: argparse.ArgumentParser) -> list[str]:
    """A value for each required option, so that the error under test is the only one."""
    return [word for a in parser._actions if a.required and a.option_strings for word in (a.option_strings[0], "x")]


def has_required_subcommand(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) and a.required for a in parser._actions)


def usage_error(capsys, parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """The one line ``argv`` is refused with (exit code 2)."""
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def long_options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if any(s.startswith("--") for s in action.option_strings) and "--help" not in action.option_strings:
            yield action


@pytest.mark.parametrize("script, path", CASES, ids=IDS)
def test_an_unknown_option_is_the_subcommands_error(capsys, script: str, path: tuple[str, ...]) -> None:
    top, sub = SCRIPTS[script](), subcommand(script, path)
    line = usage_error(capsys, top, [*path, *required_options(sub), "--no-such-option"])
    assert line.startswith(f"{sub.prog}: error: ")
    if not has_required_subcommand(sub):
        assert line == f"{sub.prog}: error: unrecognized arguments: --no-such-option"


@pytest.mark.parametrize("script, path", CASES, ids=IDS)
def test_abbreviated_options_are_refused(capsys, script: str, path: tuple[str, ...]) -> None:
    top, sub = SCRIPTS[script](), subcommand(script, path)
    known = {s for a in sub._actions for s in a.option_strings}
    for action in long_options(sub):
        name = next(s for s in action.option_strings if s.startswith("--"))
        prefix = name[:-1]
        if len(prefix) < 4 or prefix in known:
            continue
        word = prefix if action.nargs == 0 else f"{prefix}=1"
        line = usage_error(capsys, top, [*path, *required_options(sub), word])
        assert line.startswith(f"{sub.prog}: error: ") and word in line


@pytest.mark.parametrize("script, path", CASES, ids=IDS)
def test_a_value_of_the_wrong_type_is_one_line(capsys, script: str, path: tuple[str, ...]) -> None:
    top, sub = SCRIPTS[script](), subcommand(script, path)
    numeric = [a for a in long_options(sub) if a.type is not None and a.choices is None]
    if not numeric:
        pytest.skip(f"{sub.prog} has no typed option")
    for action in numeric:
        name = next(s for s in action.option_strings if s.startswith("--"))
        line = usage_error(capsys, top, [*path, *required_options(sub), name, "abc"])
        assert line.startswith(f"{sub.prog}: error: argument {name}") and "'abc'" in line


def run_script(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "argv, owner, says",
    [
        (["vlm", "generate", "--temperature", "abc"], "vlm generate", "argument --temperature: invalid float value"),
        (["vlm", "generate", "--bogus"], "vlm generate", "unrecognized arguments: --bogus"),
        (["vlm", "generate", "--max-token", "5"], "vlm generate", "unrecognized arguments: --max-token 5"),
        (["vlm", "generate", "--max-tokens", "-1"], "vlm generate", "argument --max-tokens"),
        (["vlm", "bench", "--runs", "0"], "vlm bench", "argument --runs"),
        (["vlm", "bench", "--runs", "-1"], "vlm bench", "argument --runs"),
        (["vlm", "bench", "--warmup", "-3"], "vlm bench", "argument --warmup"),
        (["vlm", "serve", "--port", "abc"], "vlm serve", "argument --port"),
        (["vlm-serve", "--nope"], "vlm-serve", "unrecognized arguments: --nope"),
        (["vlm-train", "--steps", "x"], "vlm-train", "argument --steps"),
        (["vlm-train", "fuse", "--model", "m", "--adapter-path", "a", "--output", "o", "--x"], "vlm-train fuse", "--x"),
        (["vlm-kernels", "bench", "--repeat", "3"], "vlm-kernels bench", "unrecognized arguments: --repeat 3"),
        (["vlm-kernels", "bench", "--kv-heads", "0"], "vlm-kernels bench", "argument --kv-heads: must be at least 1"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_scripts_exit_2_with_one_line(argv: list[str], owner: str, says: str) -> None:
    done = run_script(*argv)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{owner}: error: ") and says in lines[0]


def test_vlm_train_is_named_as_typed() -> None:
    done = run_script("vlm-train", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: vlm-train ")
    assert "vlm train" not in done.stdout.splitlines()[0]
