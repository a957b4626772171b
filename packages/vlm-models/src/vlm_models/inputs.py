"""From a prompt and its media to model inputs: the tokenizer, numpy image and video processors and chat
template of one checkpoint (``Processor``).

It produces the same tensors, under the same names, as the Hugging Face processor of the family, without
torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .audio import AudioSource, load_audio
from .processors.frames import ProcessedVideos
from .processors.image import load_image
from .video import Video, VideoLoadError, VideoSampling, VideoSource, read_video

__all__ = ["Processor", "load_chat_template"]


class Processor:
    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        *,
        image_token: str,
        chat_template: str | None,
        eos_token_ids: Iterable[int],
        video_processor: Any = None,
        video_token: str | None = None,
        video_chat_template: str | None = None,
        audio_processor: Any = None,
        audio_token: str | None = None,
        thinking_markers: tuple[str, str] = ("<think>", "</think>"),
    ) -> None:
        self.tokenizer = tokenizer
        self.thinking_markers = thinking_markers
        self.image_processor = image_processor
        self.image_token = image_token
        self.video_processor = video_processor
        """None for a family without video input."""
        self.video_token = video_token
        self.video_chat_template = video_chat_template
        """Where set, the template for conversations holding a video (the family's processor has its own)."""
        self.audio_processor = audio_processor
        """None for a family without audio input."""
        self.audio_token = audio_token
        self.chat_template = chat_template
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # Only where the wrapper adds nothing: it may post-process spaces.
        plain = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._fast_decode = getattr(backend, "decode", None) if plain else None

    def __call__(
        self,
        prompt: str,
        images: Sequence[Any] = (),
        videos: Sequence[VideoSource] = (),
        video_sampling: VideoSampling | None = None,
        audios: Sequence[AudioSource] = (),
    ) -> dict[str, np.ndarray]:
        """Numpy outputs, like the Hugging Face processor with ``return_tensors="np"``.

        ``videos`` (files, frame folders, frame lists or :class:`Video`) fill the prompt's video slots in order;
        ``video_sampling`` overrides the checkpoint's frame sampling. ``audios`` (files, their bytes, or
        samples: see ``vlm_models.audio``) fill its audio slots.
        """
        text, outputs = self.expand(prompt, images, videos, video_sampling, audios)
        outputs["input_ids"] = np.asarray([self.token_ids(text)], dtype=np.int64)
        outputs["attention_mask"] = np.ones_like(outputs["input_ids"])
        return outputs

    def expand(
        self,
        prompt: str,
        images: Sequence[Any] = (),
        videos: Sequence[VideoSource] = (),
        video_sampling: VideoSampling | None = None,
        audios: Sequence[AudioSource] = (),
    ) -> tuple[str, dict[str, np.ndarray]]:
        """The prompt with its image (video, audio) slots expanded as the family lays them out, and the
        processors' outputs for them (none without media)."""
        if images and self.image_processor is None:
            raise ValueError("this model does not take image input (its family has no image processor)")
        n_slots = prompt.count(self.image_token)
        if n_slots != len(images):
            raise ValueError(
                f"the prompt has {n_slots} image slot(s) ({self.image_token}) but {len(images)} image(s) were given"
            )
        outputs: dict[str, np.ndarray] = {}
        if images:
            pictures = [load_image(i) for i in images]
            outputs.update(self.image_processor(pictures))
            prompt = self.image_processor.expand_prompt(prompt, self.image_token, outputs)
        if videos and video_sampling is not None and video_sampling.with_audio:
            return self._add_heard_videos(prompt, videos, video_sampling, audios, outputs), outputs
        if videos:
            prompt = self._add_videos(prompt, videos, video_sampling, outputs)
        if audios or (self.audio_token and self.audio_token in prompt):
            prompt = self._add_audios(prompt, audios, outputs)
        return prompt, outputs

    def token_ids(self, text: str) -> list[int]:
        """Token ids of an expanded prompt, with the tokenizer's special tokens unless it holds ``<bos>``."""
        bos = getattr(self.tokenizer, "bos_token", None)
        # A prompt that holds <bos> already (chat templates start with it; PaliGemma puts it after the images).
        add_special = not (bos and bos in text)
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    @property
    def supports_images(self) -> bool:
        return self.image_processor is not None

    @property
    def supports_video(self) -> bool:
        return self.video_processor is not None

    def _add_videos(
        self, prompt: str, videos: Sequence[VideoSource], sampling: VideoSampling | None, outputs: dict[str, np.ndarray]
    ) -> str:
        video_processor, processed = self._process_videos(prompt, videos, sampling, outputs)
        return video_processor.expand_prompt(prompt, self.video_token, processed)

    def _process_videos(
        self, prompt: str, videos: Sequence[VideoSource], sampling: VideoSampling | None, outputs: dict[str, np.ndarray]
    ) -> tuple[Any, ProcessedVideos]:
        """The videos' frames through the family's video processor (its outputs added to ``outputs``)."""
        if self.video_processor is None or self.video_token is None:
            raise ValueError("this model does not take video input (its family has no video processor)")
        n_slots = prompt.count(self.video_token)
        if n_slots != len(videos):
            raise ValueError(
                f"the prompt has {n_slots} video slot(s) ({self.video_token}) but {len(videos)} video(s) were given"
            )
        video_processor = self.video_processor.with_sampling(sampling)
        source_fps = None if sampling is None else sampling.source_fps
        clips = [read_video(v, fps=source_fps, select=video_processor.frame_indices) for v in videos]
        processed = video_processor(clips)
        if set(processed.arrays) & set(outputs):
            raise ValueError("this model cannot take images and videos in one prompt (both fill the same input)")
        outputs.update(processed.arrays)
        return video_processor, processed

    def _add_heard_videos(
        self,
        prompt: str,
        videos: Sequence[VideoSource],
        sampling: VideoSampling,
        audios: Sequence[AudioSource],
        outputs: dict[str, np.ndarray],
    ) -> str:
        """Videos with their sound tracks: every clip (the prompt's own audio and the tracks) through the feature
        extractor in prompt order, the audio slots expanded, then each video slot written as its frames' and
        track's tokens interleaved by time (the family's video processor knows how)."""
        if not (self.supports_video and self.video_processor.interleaves_audio and self.audio_processor):
            raise ValueError("this model cannot hear a video's sound track (its family does not interleave audio)")
        n_audio_slots = prompt.count(self.audio_token)
        if n_audio_slots != len(audios):
            raise ValueError(
                f"the prompt has {n_audio_slots} audio slot(s) ({self.audio_token}) but {len(audios)} audio clip(s) "
                "were given"
            )
        rate = self.audio_processor.sampling_rate
        # Before the frames are read: a file with no sound track fails fast.
        tracks = [load_audio(video_sound(v), rate) for v in videos]
        video_processor, processed = self._process_videos(prompt, videos, sampling, outputs)
        clips = iter([load_audio(a, rate) for a in audios])
        heard = iter(tracks)
        kinds = slot_order(prompt, self.audio_token, self.video_token)
        features = self.audio_processor([next(clips) if kind == "audio" else next(heard) for kind in kinds])
        outputs.update(features)
        frames = features["feature_attention_mask"].sum(axis=-1)
        standalone = [i for i, kind in enumerate(kinds) if kind == "audio"]
        if standalone:
            masks = {"feature_attention_mask": features["feature_attention_mask"][standalone]}
            prompt = self.audio_processor.expand_prompt(prompt, self.audio_token, masks)
        in_videos = [int(frames[i]) for i, kind in enumerate(kinds) if kind == "video"]
        return video_processor.expand_prompt_with_audio(
            prompt, self.video_token, self.audio_token, processed, in_videos
        )

    @property
    def supports_audio(self) -> bool:
        return self.audio_processor is not None

    def _add_audios(self, prompt: str, audios: Sequence[AudioSource], outputs: dict[str, np.ndarray]) -> str:
        if self.audio_processor is None or self.audio_token is None:
            raise ValueError("this model does not take audio input (its family has no audio feature extractor)")
        n_slots = prompt.count(self.audio_token)
        if n_slots != len(audios):
            raise ValueError(
                f"the prompt has {n_slots} audio slot(s) ({self.audio_token}) but {len(audios)} audio clip(s) "
                "were given"
            )
        rate = self.audio_processor.sampling_rate
        processed = self.audio_processor([load_audio(a, rate) for a in audios])
        outputs.update(processed)
        return self.audio_processor.expand_prompt(prompt, self.audio_token, processed)

    def prepare_inputs(
        self,
        prompt: str,
        images: Sequence[Any] = (),
        videos: Sequence[VideoSource] = (),
        video_sampling: VideoSampling | None = None,
        audios: Sequence[AudioSource] = (),
    ) -> dict[str, mx.array]:
        return {k: mx.array(v) for k, v in self(prompt, images, videos, video_sampling, audios).items()}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added (markers like ``<think>`` map to their id)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, tokens: Sequence[int]) -> str:
        # The Rust tokenizer directly: transformers' wrapper adds tens of microseconds per call, every token.
        if self._fast_decode is not None:
            return self._fast_decode(list(tokens), skip_special_tokens=True)
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


def slot_order(prompt: str, audio_token: str, video_token: str) -> list[str]:
    """ "audio" / "video" for each of the prompt's audio and video slots, in the order they appear."""
    kinds, at = [], 0
    while True:
        found = [(prompt.find(token, at), kind) for token, kind in ((audio_token, "audio"), (video_token, "video"))]
        found = [(i, kind) for i, kind in found if i >= 0]
        if not found:
            return kinds
        index, kind = min(found)
        kinds.append(kind)
        at = index + len(audio_token if kind == "audio" else video_token)


def video_sound(source: VideoSource) -> AudioSource:
    """Where a video's sound track comes from: a :class:`Video`'s ``audio``, or the file (or bytes) itself."""
    if isinstance(source, Video):
        if source.audio is None:
            raise VideoLoadError("this video was given as frames without its sound track (set Video.audio)")
        return source.audio
    if isinstance(source, (bytes, bytearray, memoryview)) or (
        isinstance(source, (str, Path)) and not Path(source).expanduser().is_dir()
    ):
        return source
    raise VideoLoadError("a video given as frame images has no sound track to hear")


def load_chat_template(path: Path) -> str | None:
    """The processor's chat template: chat_template.jinja, chat_template.json, or tokenizer_config.json."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            try:
                template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
            except json.JSONDecodeError:
                continue
            if isinstance(template, str):
                return template
    return None
