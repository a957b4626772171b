"""From an API-neutral chat request to engine inputs: images, videos and audio clips fetched, the checkpoint's chat template applied
(``vlm_models.apply_chat_template``), the prompt tokenized and checked against the context."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from vlm_models import apply_chat_template
from vlm_models.audio import AudioLoadError
from vlm_models.video import VideoLoadError, VideoSampling
from vlm_runtime import GenerationConfig, Request, SamplingParams, ThinkingConfig
from vlm_runtime.stopping import StopStrings
from vlm_runtime.thinking import resolve_thinking_tokens

from .errors import APIError
from .host import LoadedModel
from .media import AudioBudget, fetch_audio, fetch_image, fetch_video, pixel_budget
from .settings import ServeSettings
from .tools import CLOSE, OPEN, CallParser, Tool, ToolFormat, render_tools, resolve_choice, tool_format_for

__all__ = ["ChatRequest", "PreparedRequest", "prepare", "token_text"]


@dataclass
class ChatRequest:
    """A chat request as both APIs can express it."""

    messages: list[dict[str, Any]]
    """Template messages: role, and content as a string or a list of {"type": "text"|"image", ...} parts."""
    images: list[str] = field(default_factory=list)
    """Image sources in the order of the messages' image parts."""
    videos: list[str] = field(default_factory=list)
    """Video sources in the order of the messages' video parts."""
    audios: list[str] = field(default_factory=list)
    """Audio clips (``data:audio/<format>;base64,`` URLs) in the order of the messages' audio parts."""
    video_audio: bool = False
    """Hear each video's sound track too (``vlm generate --video-audio``; families that interleave it)."""
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    """SamplingParams fields the request set."""
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    ignore_eos: bool = False
    """Generate exactly max_tokens (benchmarks; vLLM's extension of the OpenAI API)."""
    grammar: str | None = None
    """An llguidance grammar the output must follow (structured outputs)."""
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "auto"
    """"auto", "none", "required" or the name of the tool to call."""


@dataclass
class PreparedRequest:
    """A chat request made ready for the engine: the runtime ``Request`` and what the reply needs to know."""

    request: Request
    prompt_tokens: int
    tool_format: ToolFormat | None = None
    """Where the output may hold tool calls: the format to parse them out of."""

    def tool_parser(self, id_prefix: str = "call_") -> CallParser | None:
        return self.tool_format.parser(id_prefix) if self.tool_format is not None else None


async def prepare(loaded: LoadedModel, request: ChatRequest, settings: ServeSettings) -> PreparedRequest:
    """Validate the options and build the engine inputs; every problem is a 4xx ``APIError``."""
    sampling, config, thinking = _options(request, settings, loaded.vocabulary_size)
    enable = settings.enable_thinking if request.enable_thinking is None else request.enable_thinking
    if thinking.budget is not None:
        try:
            resolve_thinking_tokens(thinking, loaded.processor.encode, loaded.processor.thinking_markers)
        except ValueError as e:
            if request.thinking_budget is not None:
                raise APIError(400, str(e), param="thinking_budget") from e
            thinking = ThinkingConfig()  # the server's default budget; this model has no thinking block
    choice = resolve_choice(request.tool_choice, request.tools)
    tools = request.tools if choice != "none" else []
    grammar = request.grammar
    tags_are_tokens = len(loaded.processor.encode(OPEN)) == 1 and len(loaded.processor.encode(CLOSE)) == 1
    tool_format = replace(
        tool_format_for(loaded.processor.chat_template), tools=tuple(tools), tags_are_tokens=tags_are_tokens
    )
    forced = tool_format.forced_grammar(tools, choice) if tools else None
    if forced is not None:
        if grammar is not None:
            raise APIError(
                400, "a structured output format cannot be combined with a forced tool call", param="tool_choice"
            )
        grammar = forced
    if grammar is not None and enable:
        raise APIError(400, "structured outputs and forced tool calls cannot be combined with thinking yet")
    constraints: tuple[Any, ...] = ()
    if grammar is not None:
        assert loaded.grammars is not None
        constraints = (await asyncio.to_thread(loaded.grammars.constraint, grammar),)
    messages, template_tools = render_tools(request.messages, tools, loaded.processor.chat_template)
    processor = loaded.processor
    if request.videos and not processor.supports_video:
        raise APIError(400, "this model does not take video input", param="messages", code="unsupported_media")
    if request.audios and not processor.supports_audio:
        raise APIError(400, "this model does not take audio input", param="messages", code="unsupported_media")
    if request.video_audio:
        if not request.videos:
            raise APIError(
                400, "video_audio hears the sound track of a video part; the request has none", param="video_audio"
            )
        if not (processor.supports_video and processor.video_processor.interleaves_audio and processor.supports_audio):
            raise APIError(
                400, "this model cannot hear a video's sound track", param="video_audio", code="unsupported_media"
            )
    if request.images and processor.image_processor is None:
        raise APIError(400, "this model does not take image input", param="messages", code="unsupported_media")
    abandoned = threading.Event()
    try:
        # A forced format must start the answer: templates that think by default (Qwen3.5) get an empty block.
        thinking_switch = True if enable else (False if grammar is not None else None)
        prompt = await _in_thread(_render, loaded, messages, thinking_switch, template_tools, abandoned)
        budget = pixel_budget(settings)
        images = await asyncio.gather(*(fetch_image(source, settings, budget) for source in request.images))
        videos = await asyncio.gather(*(fetch_video(source, settings) for source in request.videos))
        seconds = AudioBudget(settings.max_audio_seconds, settings.max_request_audio_seconds)
        audios = [await _in_thread(fetch_audio, source, settings, seconds) for source in request.audios]
        sampling_of_videos = VideoSampling(with_audio=True) if request.video_audio else None
        inputs = await _in_thread(_tokenize, processor, prompt, list(images), list(videos), audios, sampling_of_videos)
    except asyncio.CancelledError:
        abandoned.set()  # the client has gone: the thread stops at its next chunk
        raise
    prompt_tokens = int(inputs["input_ids"].shape[-1])
    room = loaded.context_length - prompt_tokens
    if room < 1:
        raise _too_long(f"the prompt is {prompt_tokens} tokens", loaded.context_length)
    wanted = request.max_tokens if request.max_tokens is not None else settings.max_tokens_limit
    config = GenerationConfig(
        max_tokens=min(wanted, settings.max_tokens_limit, room),
        ignore_eos=request.ignore_eos,
        stop=config.stop,
        logprobs=config.logprobs,
        top_logprobs=config.top_logprobs,
        num_draft_tokens=settings.num_draft_tokens,
    )
    return PreparedRequest(
        Request(inputs, sampling, config, thinking, constraints), prompt_tokens, tool_format if tools else None
    )


COUNT_CHUNK_CHARS = 16_384
"""Text tokenized at a time while a long prompt is counted against the context."""
COUNT_ABOVE_CHARS_PER_TOKEN = 4
"""Prompts longer than this many characters per context token are counted chunk by chunk before the real
tokenization: up to there, tokenizing the whole text costs about as much as counting it."""
CHUNK_SLACK_TOKENS = 8
"""Tokens a cut between two chunks may add to the count (a word or a special token split in two)."""


async def _in_thread(function: Any, *args: Any) -> Any:
    """``function(*args)`` on a worker thread; its failures become 400s."""
    try:
        return await asyncio.to_thread(function, *args)
    except (APIError, asyncio.CancelledError):
        raise
    except VideoLoadError as e:
        raise APIError(400, str(e), code="invalid_video") from e
    except AudioLoadError as e:
        raise APIError(400, str(e), code="invalid_audio") from e
    except Exception as e:  # template errors (jinja raises its own types), slot/image count mismatches
        raise APIError(400, f"cannot format the conversation: {e}") from e


def _render(
    loaded: LoadedModel,
    messages: list[dict[str, Any]],
    enable_thinking: bool | None,
    tools: Any,
    abandoned: threading.Event,
) -> str:
    """The chat-formatted prompt, refused when it is certainly longer than the context."""
    prompt = apply_chat_template(loaded.processor, None, messages, enable_thinking=enable_thinking, tools=tools)
    _refuse_beyond_context(loaded.processor, prompt, loaded.context_length, abandoned)
    return prompt


def _refuse_beyond_context(processor: Any, prompt: str, context: int, abandoned: threading.Event) -> None:
    """Count a long prompt's tokens a chunk at a time and stop as soon as the count is past the context, so a
    far-too-long prompt costs about ``context`` tokens of tokenizing, whatever its length; the exact count comes
    from the real tokenization, for prompts that may fit."""
    if len(prompt) <= COUNT_ABOVE_CHARS_PER_TOKEN * context:
        return
    counted = 0
    for chunks, start in enumerate(range(0, len(prompt), COUNT_CHUNK_CHARS), start=1):
        if abandoned.is_set():
            raise asyncio.CancelledError
        counted += len(processor.encode(prompt[start : start + COUNT_CHUNK_CHARS]))
        if counted > context + CHUNK_SLACK_TOKENS * chunks:
            raise _too_long(f"the prompt is more than {context} tokens", context)


def _tokenize(
    processor: Any,
    prompt: str,
    images: list[Any],
    videos: list[Any],
    audios: list[bytes],
    video_sampling: VideoSampling | None = None,
) -> dict[str, Any]:
    return processor(prompt, images, videos, video_sampling, audios=audios)


def _too_long(what: str, context: int) -> APIError:
    return APIError(
        400, f"{what}; this model's context is {context} tokens", param="messages", code="context_length_exceeded"
    )


def _options(
    request: ChatRequest, settings: ServeSettings, vocabulary_size: int
) -> tuple[SamplingParams, GenerationConfig, ThinkingConfig]:
    if request.top_logprobs > settings.top_logprobs_k:
        raise APIError(
            400, f"top_logprobs must be at most {settings.top_logprobs_k} on this server", param="top_logprobs"
        )
    if request.max_tokens is not None and request.max_tokens < 0:
        raise APIError(400, "max_tokens must be >= 0", param="max_tokens")
    outside = [t for t in request.sampling.get("logit_bias") or () if not 0 <= t < vocabulary_size]
    if outside:
        raise APIError(
            400,
            f"logit_bias names token {outside[0]}; this model's token ids are 0..{vocabulary_size - 1}",
            param="logit_bias",
        )
    budget = settings.thinking_budget if request.thinking_budget is None else request.thinking_budget
    try:
        sampling = SamplingParams(**request.sampling)
        config = GenerationConfig(
            stop=tuple(request.stop), logprobs=request.logprobs, top_logprobs=request.top_logprobs
        )
        thinking = ThinkingConfig(budget=budget)
        if request.stop:
            StopStrings(request.stop)  # validates count and lengths now, not on the engine thread
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from e
    return sampling, config, thinking


def token_text(processor: Any, token: int) -> str:
    return processor.decode([token])
