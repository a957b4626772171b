"""A multi-turn conversation with a model, apart from any terminal: its turns and their media, rendered through the
checkpoint's chat template, generated with a vision feature cache and a prompt cache so that later turns skip the
encoder for images seen before and reuse the tokens of the turns so far; saved and loaded as JSON.

``vlm chat`` is one front end for it; a test or another front end can drive it directly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_runtime import GenerationSettings, PromptCache, stream_generate
from vlm_runtime.settings import OPTION_NAMES
from vlm_runtime.vision_cache import VisionFeatureCache

__all__ = ["ChatSession", "Conversation", "Turn", "parse_params"]

FORMAT = "vlm.conversation/1"
MEDIA_KINDS = ("images", "videos", "audios")


@dataclass
class Turn:
    role: str
    """"user" or "assistant"."""
    text: str
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)
    reasoning: str = ""
    """The assistant's thinking, shown to the user but not sent back to the model."""

    def message(self) -> dict[str, Any]:
        """This turn as a chat-template message: its media slots first, then its text."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in self.images]
        content.extend({"type": "video"} for _ in self.videos)
        content.extend({"type": "audio"} for _ in self.audios)
        content.append({"type": "text", "text": self.text})
        return {"role": self.role, "content": content}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "text": self.text}
        out.update({kind: getattr(self, kind) for kind in MEDIA_KINDS if getattr(self, kind)})
        if self.reasoning:
            out["reasoning"] = self.reasoning
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> Turn:
        if not isinstance(data, dict) or data.get("role") not in ("user", "assistant"):
            raise ValueError(f"{where}: a turn needs a role of user or assistant")
        if not isinstance(data.get("text"), str) or not isinstance(data.get("reasoning", ""), str):
            raise ValueError(f"{where}: text and reasoning must be strings")
        media = {kind: data.get(kind, []) for kind in MEDIA_KINDS}
        for kind, sources in media.items():
            if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
                raise ValueError(f"{where}: {kind} must be a list of paths or URLs")
        return cls(data["role"], data["text"], reasoning=data.get("reasoning", ""), **media)


@dataclass
class Conversation:
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def messages(self) -> list[dict[str, Any]]:
        return [turn.message() for turn in self.turns]

    def media(self, kind: str) -> list[str]:
        """Every turn's ``kind`` ("images", ...) in order: the prompt's slots of that kind."""
        return [source for turn in self.turns for source in getattr(turn, kind)]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "system": self.system, "turns": [t.to_json() for t in self.turns]}

    @classmethod
    def from_json(cls, data: Any, where: str = "conversation") -> Conversation:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{where}: not a saved conversation (no "format": "{FORMAT}")')
        system, turns = data.get("system"), data.get("turns")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{where}: system must be a string")
        if not isinstance(turns, list):
            raise ValueError(f"{where}: turns must be a list")
        return cls(system, [Turn.from_json(t, f"{where}, turn {i + 1}") for i, t in enumerate(turns)])


def parse_params(text: str) -> dict[str, Any]:
    """``temperature=0.7 max_tokens=64`` as generation options (names as ``generate`` takes them); values are
    numbers, true / false, none, or text (``stop`` takes comma-separated strings)."""
    options: dict[str, Any] = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"{item!r}: write name=value, such as temperature=0.7")
        if name not in OPTION_NAMES:
            raise ValueError(f"unknown parameter {name!r}; the parameters are: {', '.join(sorted(OPTION_NAMES))}")
        options[name] = value.split(",") if name == "stop" else _value(value)
    return options


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null", ""):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class ChatSession:
    """A conversation with one loaded model: ``attach`` media to the next message, ``reply`` to it (streamed),
    ``clear``, ``save`` and ``load``, and ``settings`` changed by ``set_params``."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        settings: GenerationSettings,
        *,
        enable_thinking: bool | None = None,
        video_sampling: Any = None,
        vision_cache_size: int = 32,
        drafter: Any = None,
    ) -> None:
        self.model, self.processor, self.settings = model, processor, settings
        self.enable_thinking, self.video_sampling, self.drafter = enable_thinking, video_sampling, drafter
        self.conversation = Conversation()
        self.pending = Turn("user", "")
        self.vision_cache = VisionFeatureCache(vision_cache_size) if vision_cache_size > 0 else None
        self.prompt_cache = PromptCache()
        self._images: dict[str, Any] = {}

    def attach(self, kind: str, source: str) -> str:
        """Add an image, video or audio clip (``kind`` "images", "videos", "audios") to the next message once it
        is known to be readable and the model takes it; returns how it was described."""
        source = self._checked(kind, source)
        getattr(self.pending, kind).append(source)
        return source

    def _checked(self, kind: str, source: str) -> str:
        if kind == "videos" and not self.processor.supports_video:
            raise ValueError("this model does not take video input")
        if kind == "audios" and not self.processor.supports_audio:
            raise ValueError("this model does not take audio input")
        source = _checked_source(kind, source)
        if kind == "images" and source not in self._images:
            from .processors.image import load_image

            self._images[source] = load_image(source)  # read (or fetched) once, not again every turn
        return source

    def _image(self, source: str) -> Any:
        return self._images[source] if source in self._images else source

    def set_params(self, text: str) -> dict[str, Any]:
        options = parse_params(text)
        self.settings = self.settings.with_options(**options)  # checked by the settings classes
        return options

    def clear(self) -> None:
        """Forget the turns and pending media (the system message stays)."""
        self.conversation = Conversation(self.conversation.system)
        self.pending = Turn("user", "")
        self.prompt_cache = PromptCache()
        self._images = {}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.conversation.to_json(), indent=2, ensure_ascii=False) + "\n")

    def load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not JSON (not UTF-8 text)") from None
        conversation = Conversation.from_json(data, str(path))
        for number, turn in enumerate(conversation.turns, 1):  # a missing file now, not on every later message
            for kind in MEDIA_KINDS:
                try:
                    setattr(turn, kind, [self._checked(kind, source) for source in getattr(turn, kind)])
                except ValueError as e:
                    raise ValueError(f"{path}, turn {number}: {e}") from None
        images = {source: self._images[source] for source in conversation.media("images")}
        self.clear()
        self._images, self.conversation = images, conversation

    def prompt(self) -> str:
        from .chat import apply_chat_template

        return apply_chat_template(
            self.processor,
            None,
            self.conversation.messages(),
            system=self.conversation.system,
            enable_thinking=self.enable_thinking,
        )

    def reply(self, text: str) -> Iterator[Any]:
        """Send ``text`` with the pending media; yield the answer's ``GenerationResult``s. The answer is kept as
        far as it got, also when the caller stops early (Ctrl-C); a request that fails leaves no turn behind."""
        turn, self.pending = self.pending, Turn("user", "")
        turn.text = text
        self.conversation.turns.append(turn)
        answer = Turn("assistant", "")
        finished = False
        try:
            chunks = stream_generate(
                self.model,
                self.processor,
                self.prompt(),
                image=[self._image(source) for source in self.conversation.media("images")],
                videos=self.conversation.media("videos"),
                video_sampling=self.video_sampling,
                audios=self.conversation.media("audios"),
                prompt_cache=self.prompt_cache,
                vision_cache=self.vision_cache,
                draft_model=self.drafter,
                settings=self.settings,
            )
            for chunk in chunks:
                answer.text += chunk.text
                answer.reasoning += chunk.reasoning
                yield chunk
            finished = True
        except Exception:
            self.conversation.turns.pop()
            raise
        finally:
            if self.conversation.turns and self.conversation.turns[-1] is turn:
                self.conversation.turns.append(answer)
            if not finished:  # stopped mid-step: the cache may hold tokens the answer does not
                self.prompt_cache = PromptCache()


def _checked_source(kind: str, source: str) -> str:
    """``source`` as it will be read: a URL as given, a local path expanded, made absolute and checked to exist,
    so that a typo is reported now rather than on the next message."""
    if source.startswith(("http://", "https://", "data:")):
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"{source}: no such file")
    return str(path.resolve())
