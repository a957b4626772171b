"""``vlm chat``: a terminal chat over ``conversation.ChatSession``.

Input is read with prompt_toolkit (line editing, history, completion of the slash commands, Ctrl-C / Ctrl-D at the
prompt handled by the library); output is written with rich (dimmed reasoning, coloured errors, a table for
/params, plain text where the output is not a terminal or NO_COLOR is set). Without a terminal on stdin, lines are
read plainly, so a script can pipe a conversation in.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ChatTerminal", "add_chat_parser"]

PROMPT = "you> "
HELP = {
    "/image PATH_OR_URL": "attach an image to your next message",
    "/audio PATH": "attach an audio clip (models that hear)",
    "/video PATH": "attach a video (models that take video)",
    "/system TEXT": "set the system message (empty: none)",
    "/params [name=value ...]": "show or change generation parameters (temperature=0.7 max_tokens=64 ...)",
    "/clear": "start a new conversation",
    "/save FILE": "save the conversation as JSON",
    "/load FILE": "load a saved conversation",
    "/help": "this list",
    "/exit": "leave (or Ctrl-D); Ctrl-C stops an answer",
}
SHOWN_PARAMS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "ignore_eos",
    "stop",
    "thinking_budget",
)


def add_chat_parser(subparsers: Any) -> None:
    from .cli import add_media_args, add_model_args, add_sampling_args

    chat = subparsers.add_parser("chat", help="chat with a model in the terminal (images, multi-turn; /help)")
    add_model_args(chat)
    add_sampling_args(chat)
    add_media_args(chat)  # attached to the first message
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument(
        "--vision-cache-size", type=int, default=32, help="images whose vision features are kept (0: off)"
    )
    chat.add_argument("--verbose", action="store_true", help="print tracebacks")
    chat.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> None:
    from rich.console import Console

    from .cli import CommandError, check_media_args, generation_settings, load_model, video_sampling
    from .conversation import ChatSession

    check_media_args(args)
    if args.prompt_cache_file is not None:
        raise CommandError("--prompt-cache-file is for vlm generate; the chat keeps its own prompt cache")
    if args.vision_cache_size < 0:
        raise CommandError("--vision-cache-size must be >= 0")
    settings = generation_settings(args)
    model, processor = load_model(args)
    drafter = None
    if args.draft_model is not None:
        from .drafting import load_drafter

        drafter, _ = load_drafter(args.draft_model, target_processor=processor, kind=args.draft_kind)
    session = ChatSession(
        model,
        processor,
        settings,
        enable_thinking=True if args.enable_thinking else None,
        video_sampling=video_sampling(args),
        vision_cache_size=args.vision_cache_size,
        drafter=drafter,
    )
    session.conversation.system = args.system
    for kind, sources in (("images", args.image), ("videos", args.video), ("audios", args.audio)):
        for source in sources:
            session.attach(kind, source)
    console = Console(highlight=False, soft_wrap=True)
    ChatTerminal(session, console, _line_reader(console), model_name=Path(args.model).name).run()


def _line_reader(console: Any) -> Callable[[], str]:
    """prompt_toolkit's prompt on a terminal; plain lines otherwise (EOFError at the end of either)."""
    if not sys.stdin.isatty():

        def plain() -> str:
            console.print(PROMPT, end="")
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line

        return plain
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter

    commands = sorted({usage.split()[0] for usage in HELP})
    prompt = PromptSession(completer=WordCompleter(commands, sentence=True), complete_while_typing=False)
    return lambda: prompt.prompt(PROMPT)


class ChatTerminal:
    """The read-answer loop: slash commands change the session, anything else is a message."""

    def __init__(self, session: Any, console: Any, read_line: Callable[[], str], model_name: str = "") -> None:
        self.session, self.console, self.read_line = session, console, read_line
        self.model_name = model_name
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "/image": lambda rest: self._attach("images", rest),
            "/audio": lambda rest: self._attach("audios", rest),
            "/video": lambda rest: self._attach("videos", rest),
            "/system": self._system,
            "/params": self._params,
            "/clear": self._clear,
            "/save": self._save,
            "/load": self._load,
            "/help": self._help,
            "/exit": lambda rest: True,
            "/quit": lambda rest: True,
        }

    def run(self) -> None:
        self.console.print(f"vlm chat with {self.model_name}: /help lists the commands, Ctrl-D leaves.", style="dim")
        while True:
            try:
                line = self.read_line().strip()
            except KeyboardInterrupt:  # at the prompt: drop the line, stay
                continue
            except EOFError:
                self.console.print()
                return
            if not line:
                continue
            if line.startswith("/"):
                if self._command(line):
                    return
            else:
                self._answer(line)

    def _command(self, line: str) -> bool:
        name, _, rest = line.partition(" ")
        handler = self.commands.get(name.lower())
        if handler is None:
            self._error(f"unknown command {name} (/help lists them)")
            return False
        try:
            return bool(handler(rest.strip()))
        except (ValueError, OSError, TypeError) as e:
            self._error(str(e))
            return False

    def _answer(self, text: str) -> None:
        last, thinking = None, False
        vision_hits = self.session.vision_cache.hits if self.session.vision_cache is not None else 0
        try:
            for last in self.session.reply(text):
                if last.reasoning:
                    self.console.print(last.reasoning, end="", style="dim italic", markup=False)
                    thinking = True
                if last.text:
                    if thinking:
                        self.console.print()
                        thinking = False
                    self.console.print(last.text, end="", markup=False)
        except KeyboardInterrupt:
            self.console.print()
            self.console.print("[stopped]", style="yellow", markup=False)
            return
        except (ValueError, OSError) as e:
            self.console.print()
            self._error(str(e))
            return
        self.console.print()
        if last is not None:
            self._stats(last, vision_hits)

    def _stats(self, last: Any, vision_hits: int) -> None:
        cache = self.session.vision_cache
        hits = cache.hits - vision_hits if cache is not None else 0
        seen = f", {hits} image(s) from the feature cache" if hits else ""
        self.console.print(
            f"[{last.prompt_tokens} prompt tokens ({last.cached_tokens} reused){seen}; "
            f"{last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s; {last.finish_reason}]",
            style="dim",
            markup=False,
        )

    def _error(self, message: str) -> None:
        self.console.print(f"error: {message}", style="red", markup=False)

    def _attach(self, kind: str, rest: str) -> None:
        if not rest:
            raise ValueError(f"give a path or URL: /{kind[:-1]} PATH")
        source = self.session.attach(kind, _one_argument(rest))
        self.console.print(f"attached {source} to your next message", style="dim", markup=False)

    def _system(self, rest: str) -> None:
        self.session.conversation.system = rest or None
        self.console.print("system message " + ("set" if rest else "removed"), style="dim")

    def _params(self, rest: str) -> None:
        if rest:
            self.session.set_params(rest)
        from dataclasses import asdict

        from rich.table import Table

        settings = self.session.settings
        values = {**asdict(settings.sampling), **asdict(settings.config)}
        values["thinking_budget"] = settings.thinking.budget
        table = Table("parameter", "value", box=None, show_header=False)
        for name in SHOWN_PARAMS:
            if name in values:
                table.add_row(name, repr(values[name]) if isinstance(values[name], str) else str(values[name]))
        self.console.print(table)

    def _clear(self, rest: str) -> None:
        self.session.clear()
        self.console.print("conversation cleared", style="dim")

    def _save(self, rest: str) -> None:
        if not rest:
            raise ValueError("give a file: /save FILE")
        path = Path(_one_argument(rest)).expanduser()
        self.session.save(path)
        self.console.print(f"saved {len(self.session.conversation.turns)} turns to {path}", style="dim", markup=False)

    def _load(self, rest: str) -> None:
        if not rest:
            raise ValueError("give a file: /load FILE")
        path = Path(_one_argument(rest)).expanduser()
        self.session.load(path)
        for turn in self.session.conversation.turns:
            media = sum(len(getattr(turn, kind)) for kind in ("images", "videos", "audios"))
            attached = f" [+{media} media]" if media else ""
            self.console.print(
                f"{turn.role}: {turn.text}{attached}", style="dim" if turn.role == "user" else None, markup=False
            )
        self.console.print(f"loaded {len(self.session.conversation.turns)} turns from {path}", style="dim")

    def _help(self, rest: str) -> None:
        for usage, text in HELP.items():
            self.console.print(f"{usage:<28} {text}", markup=False)


def _one_argument(rest: str) -> str:
    """A path as typed: quoted or not (a path with spaces may be written bare)."""
    try:
        parts = shlex.split(rest)
    except ValueError:
        return rest
    return parts[0] if len(parts) == 1 else rest
