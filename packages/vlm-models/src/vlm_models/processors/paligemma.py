"""PaliGemma's prompt layout on top of the SigLIP image processor: the image tokens, then ``<bos>``, the
prompt and a newline, as transformers' PaliGemmaProcessor builds it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .siglip import SiglipImageProcessor

__all__ = ["PaliGemmaImageProcessor"]


@dataclass
class PaliGemmaImageProcessor(SiglipImageProcessor):
    bos_token: str = "<bos>"

    def expand_prompt(self, prompt: str, image_token: str, outputs: dict[str, np.ndarray]) -> str:
        """``<image>...<image>caption en`` -> each image's tokens, ``<bos>``, the rest of the prompt, ``\\n``."""
        end = prompt.rfind(image_token) + len(image_token)
        framed = f"{prompt[:end]}{self.bos_token}{prompt[end:]}\n"
        return super().expand_prompt(framed, image_token, outputs)

    def answer_inputs(self, answer: np.ndarray) -> dict[str, np.ndarray]:
        """``token_type_ids``: 0 on the prefix (images and prompt, attending both ways), 1 on the answer (the
        suffix, causal): the prefix-LM split that a prefill followed by decoding makes at inference."""
        return {"token_type_ids": answer.astype(np.int64)}
