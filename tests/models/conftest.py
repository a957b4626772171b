from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlm_models import apply_chat_template

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FAMILIES = [
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "llava",
    "llava_next",
    "pixtral",
    "mistral3",
    "gemma3",
    "paligemma2",
    "idefics3",
    "smolvlm",
    "gemma4",
    "gemma4_moe",
    "gemma4_unified",
    "gemma3n",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen2_audio",
    "qwen2_5_omni",
    "qwen3_omni_moe",
]
LAYOUTS = ["hf4", "hf5", "mlx_community"]
FAMILY_LAYOUTS = {
    "qwen2_vl": LAYOUTS,
    "qwen2_5_vl": LAYOUTS,
    "llava": LAYOUTS,
    "llava_next": LAYOUTS,
    # No peer-converted folder: its MLX-community layout is written by our own converter (test_gemma3.py).
    "gemma3": ["hf4", "hf5"],
    "paligemma2": ["hf4", "hf5"],
    # mlx_community: written by our own converter (make_mlx_community_llava.py), float; 4-bit in test_qwen3_vl.py.
    "qwen3_vl": LAYOUTS,
    # mlx_community: mlx-vlm 0.7.10's own conversion (make_mlx_community_fixtures.py); 4-bit in test_qwen3_vl_moe.py.
    "qwen3_vl_moe": LAYOUTS,
    # Their mlx_community folders are written by our own converter (tests/fixtures/make_own_mlx_fixtures.py).
    "idefics3": LAYOUTS,
    "smolvlm": LAYOUTS,
    # mlx_community: written by our own converter (tests/fixtures/make_mlx_community_llava.py), as for LLaVA.
    "pixtral": LAYOUTS,
    "mistral3": LAYOUTS,
    # Gemma 4 was published in the transformers 5 layout: "hub" spells the config as the Hub's repos do, "hf5" as
    # transformers 5.25 saves it; mlx_community is mlx-vlm 0.7.10's own conversion (make_mlx_community_fixtures.py).
    "gemma4": ["hub", "hf5", "mlx_community"],
    "gemma4_moe": ["hub", "hf5", "mlx_community"],
    # Published in transformers 5's layout only; mlx-vlm 0.7.10 has no gemma4_unified, so no MLX-community folder.
    "gemma4_unified": ["hf5"],
    # "hub" spells the config and processor files as google/gemma-3n-E2B-it does (transformers 4.53: rope_theta /
    # rope_local_base_freq, one preprocessor_config.json); "hf5" as transformers 5.25 saves them. mlx-vlm 0.7.10
    # cannot convert the tiny fixture (its MobileNetV5 is the 300M one, fixed), so no peer-made folder.
    "gemma3n": ["hub", "hf5"],
    # Published in transformers 5's layout only (hf5, MTP tensors included); mlx_community: mlx-vlm 0.7.10's own
    # conversion (make_mlx_community_fixtures.py); 4-bit ones in test_qwen3_5.py and test_peer_layouts.py.
    "qwen3_5": ["hf5", "mlx_community"],
    "qwen3_5_moe": ["hf5", "mlx_community"],
    # mlx-vlm 0.7.10 has no qwen2_audio: its MLX-community layout is what our converter writes (test_convert.py).
    "qwen2_audio": ["hf4", "hf5"],
    # The published layout: the thinker's weights under thinker.*, beside talker.* / token2wav.* (dropped).
    "qwen2_5_omni": ["hub"],
    # Qwen/Qwen3-Omni-30B-A3B-Instruct's layout: thinker.* (one MLP per expert) beside talker.* / code2wav.* (dropped).
    "qwen3_omni_moe": ["hub"],
}
IMAGE_FAMILIES = [f for f in FAMILIES if f != "qwen2_audio"]
"""The families that take images (Qwen2-Audio only hears): what tests of image-only features run on."""
AUDIO = FIXTURES / "audio"
CLIPS = [AUDIO / "tone_chirp.wav", AUDIO / "two_tones.wav", AUDIO / "noise_burst.flac"]
PREFIX_LM = {"paligemma2"}


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[str]:
    """A quiet HTTP server on 127.0.0.1 serving ``folder``'s files; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(folder), **kw)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def sees(processor: Any) -> bool:
    """Whether the family takes images; the shared tests give those that only hear (Qwen2-Audio) clips instead."""
    return processor.image_processor is not None


def media_prompt(processor: Any, text: Any, n_media: int) -> str:
    """A chat prompt with ``n_media`` image slots, or audio slots for a family that only hears."""
    kind = "num_images" if sees(processor) else "num_audios"
    return apply_chat_template(processor, None, text, **{kind: n_media})


def media_options(processor: Any, images: list[Path] | None) -> dict[str, Any]:
    """``image=images`` for generate, or for a family that only hears one distinct clip in place of each image."""
    if sees(processor) or not images:
        return {"image": images}
    names = sorted({p.name for p in images})
    return {"audio": [CLIPS[names.index(p.name) % len(CLIPS)] for p in images]}


def media_case(ref: Reference) -> str:
    """The reference case holding one image (one clip for a family that only hears)."""
    return "one_image" if "one_image" in ref.cases else "one_audio"


def published(family: str) -> Path:
    """The family's fixture in the layout its checkpoints are published in (the first of its layouts)."""
    return FIXTURES / family / FAMILY_LAYOUTS[family][0]


"""Families whose whole prompt attends both ways: a token decoded after a prefill is no longer in the prompt."""


QUANTIZED_BOUNDS = {
    # (mean relative error below, correlation above) of 4-bit logits against the float32 reference; (0.5, 0.9)
    # elsewhere. 4 bits in groups of 32 cost Qwen3.5's 64-wide random fixtures more (the delta rule normalises every
    # key, so a coarse key moves its whole update); our converter's and mlx-vlm's folders agree with each other.
    "qwen3_5": (0.65, 0.75),
    "qwen3_5_text": (0.65, 0.75),
    "qwen3_5_moe": (0.75, 0.65),
}


def checkpoint_with_config(tmp_path: Path, family: str, change: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of the family's published fixture whose config.json ``change`` edited in place."""
    path = Path(shutil.copytree(published(family), tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


class Reference:
    """The transformers outputs stored by tests/fixtures/make_fixtures.py for one family."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.root = FIXTURES / family
        self.arrays = np.load(self.root / "reference.npz")
        self.meta = json.loads((self.root / "reference.json").read_text())

    @property
    def cases(self) -> list[str]:
        return sorted({k.split("/")[0] for k in self.arrays.files})

    @property
    def single_cases(self) -> list[str]:
        """The cases of one prompt (not a padded batch)."""
        return [c for c in self.cases if self.arrays[f"{c}/input_ids"].shape[0] == 1]

    def get(self, case: str, name: str) -> np.ndarray | None:
        key = f"{case}/{name}"
        return self.arrays[key] if key in self.arrays.files else None

    def inputs(self, case: str) -> dict[str, np.ndarray]:
        names = (
            "input_ids",
            "attention_mask",
            "pixel_values",
            "image_grid_thw",
            "image_sizes",
            "pixel_attention_mask",
            "image_position_ids",
            "input_features",
            "input_features_mask",
            "feature_attention_mask",
            "pixel_values_videos",
            "video_grid_thw",
            "video_second_per_grid",
        )
        return {n: self.get(case, n) for n in names if self.get(case, n) is not None}


@pytest.fixture(scope="session")
def references() -> dict[str, Reference]:
    return {family: Reference(family) for family in FAMILIES}


def check_chunked_prefill(model, ref: Reference, case: str, step: int, tol: float = 1e-4) -> None:
    """Prefilling ``case`` in chunks of ``step`` tokens gives the reference's last logits and greedy tokens."""
    import mlx.core as mx

    from vlm_runtime import GenerationConfig, SamplingParams, generate_step, make_sampler
    from vlm_runtime.generate import prefill

    def inputs() -> dict:
        return {k: mx.array(v) for k, v in ref.inputs(case).items()}

    last = prefill(model, model.embed_prompt(**inputs()), model.make_cache(), step)
    diff = np.abs(np.array(last[0]) - ref.get(case, "logits")[0, -1]).max()
    assert diff <= tol, f"{case}, chunks of {step}: {diff:.2e}"
    config = GenerationConfig(max_tokens=8, prefill_step_size=step)
    steps = generate_step(model, inputs(), sampler=make_sampler(SamplingParams()), config=config)
    assert [t for t, _ in steps] == ref.get(case, "greedy")[0, :8].tolist(), case


def inputs_of(ref: Reference, case: str) -> dict:
    """A reference case's model inputs as MLX arrays."""
    import mlx.core as mx

    return {k: mx.array(v) for k, v in ref.inputs(case).items()}


def logits_of(model, ref: Reference, case: str) -> np.ndarray:
    return np.array(model(**inputs_of(ref, case)).logits)


def check_quantized_fixture(
    family: str,
    ref: Reference,
    cases: tuple[str, ...] = ("one_image", "text"),
    *,
    folder: str = "mlx_community_4bit",
) -> None:
    """``<family>/<folder>`` (by default our converter's 4-bit one, make_own_mlx_fixtures.py) loads quantized,
    computes what its dequantized weights compute, and stays near transformers' float32 logits (within the
    family's ``QUANTIZED_BOUNDS``)."""
    import mlx.nn as nn

    from vlm_models import load
    from vlm_models.quantize import dequantize_model

    path = FIXTURES / family / folder
    quantized, _ = load(path)
    assert sum(isinstance(m, nn.QuantizedLinear) for _, m in quantized.named_modules()) >= 4
    max_relative, min_correlation = QUANTIZED_BOUNDS.get(family, (0.5, 0.9))
    twin, _ = load(path)
    dequantize_model(twin)
    for case in cases:
        ours, expected = logits_of(quantized, ref, case), ref.get(case, "logits")
        np.testing.assert_allclose(ours, logits_of(twin, ref, case), atol=1e-4, rtol=0)
        # 4 bits on a random model this small: about 0.35 mean relative error; the logits still follow the
        # reference closely (an unrelated model would correlate near 0). Argmax agreement is too noisy here:
        # the tiny models' top logits are near ties.
        rel = np.abs(ours - expected).mean() / np.abs(expected).mean()
        corr = np.corrcoef(ours.reshape(-1), expected.reshape(-1))[0, 1]
        assert rel < max_relative and corr > min_correlation, (
            f"{case}: relative error {rel:.3f}, correlation {corr:.3f}"
        )
