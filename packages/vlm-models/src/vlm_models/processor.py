"""The processor: tokenizer, numpy image processor and chat template of one checkpoint.

It produces the same tensors, under the same names, as the Hugging Face processor of the family, without
torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import mlx.core as mx
import numpy as np

from .processors.image import load_image

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
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.chat_template = chat_template
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # Only where the wrapper adds nothing: it may post-process spaces.
        plain = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._fast_decode = getattr(backend, "decode", None) if plain else None

    def __call__(self, prompt: str, images: Sequence[Any] = ()) -> dict[str, np.ndarray]:
        """Numpy outputs, like the Hugging Face processor with ``return_tensors="np"``."""
        text, outputs = self.expand(prompt, images)
        outputs["input_ids"] = np.asarray([self.token_ids(text)], dtype=np.int64)
        outputs["attention_mask"] = np.ones_like(outputs["input_ids"])
        return outputs

    def expand(self, prompt: str, images: Sequence[Any] = ()) -> tuple[str, dict[str, np.ndarray]]:
        """The prompt with its image slots expanded as the family lays them out, and the image processor's
        outputs for ``images`` (none without images)."""
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
        return prompt, outputs

    def token_ids(self, text: str) -> list[int]:
        """Token ids of an expanded prompt, with the tokenizer's special tokens unless it holds ``<bos>``."""
        bos = getattr(self.tokenizer, "bos_token", None)
        # A prompt that holds <bos> already (chat templates start with it; PaliGemma puts it after the images).
        add_special = not (bos and bos in text)
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def prepare_inputs(self, prompt: str, images: Sequence[Any] = ()) -> dict[str, mx.array]:
        return {k: mx.array(v) for k, v in self(prompt, images).items()}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added (markers like ``<think>`` map to their id)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, tokens: Sequence[int]) -> str:
        # The Rust tokenizer directly: transformers' wrapper adds tens of microseconds per call, every token.
        if self._fast_decode is not None:
            return self._fast_decode(list(tokens), skip_special_tokens=True)
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


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
