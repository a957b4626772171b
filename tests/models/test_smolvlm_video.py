"""SmolVLM 2 video input against transformers (tests/fixtures/make_fixtures_smolvlm_video.py): the chat template
transformers uses for videos, frames read and (where asked) sampled, the two Lanczos resizes, the introduction
and per-frame ``Frame from MM:SS:`` prompt, and the logits of the tiny SmolVLM checkpoint on a video prompt."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_models import apply_chat_template, load
from vlm_models.processors.smolvlm import SmolVLMVideoProcessor, number_words
from vlm_models.video import VideoSampling
from vlm_runtime import GenerationConfig, SamplingParams, generate_step, make_sampler

from .conftest import FIXTURES

ROOT = FIXTURES / "smolvlm"
VIDEOS = FIXTURES / "videos"
META = json.loads((ROOT / "video_processor_reference.json").read_text())
CASES = META["cases"]


@pytest.fixture(scope="module")
def expected():
    return np.load(ROOT / "video_processor_reference.npz")


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hf4")


def inputs_of(processor, case: dict) -> dict[str, np.ndarray]:
    sampling = VideoSampling(**case["sampling"]) if case["sampling"] else None
    return processor(META["prompt"], videos=[VIDEOS / case["clip"]], video_sampling=sampling)


def test_the_video_chat_template_is_transformers(loaded) -> None:
    _, processor = loaded
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": META["prompt_text"]}]}]
    assert apply_chat_template(processor, None, messages) == META["prompt"]
    # Conversations without a video keep the checkpoint's own template.
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    own = processor.tokenizer.apply_chat_template(
        text_only, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=True
    )
    assert processor.chat_template != processor.video_chat_template
    assert apply_chat_template(processor, None, text_only) == own


@pytest.mark.parametrize("name", list(CASES))
def test_video_processing_matches_transformers(loaded, expected, name: str) -> None:
    _, processor = loaded
    ours = inputs_of(processor, CASES[name])
    np.testing.assert_array_equal(ours["input_ids"], expected[f"{name}/input_ids"])
    np.testing.assert_array_equal(ours["pixel_attention_mask"], expected[f"{name}/pixel_attention_mask"])
    assert ours["pixel_values"].shape == expected[f"{name}/pixel_values"].shape
    np.testing.assert_allclose(ours["pixel_values"], expected[f"{name}/pixel_values"], atol=1e-5, rtol=0)
    assert processor.tokenizer.decode(ours["input_ids"][0].tolist()) == CASES[name]["text"]


def test_video_prompt_logits_and_greedy_tokens_match_transformers(loaded, expected) -> None:
    model, processor = loaded
    inputs = {k: mx.array(v) for k, v in inputs_of(processor, CASES["sampled"]).items()}
    diff = np.abs(np.array(model(**inputs).logits) - expected["sampled/logits"]).max()
    assert diff <= 1e-4, f"max |logits - reference| = {diff:.2e}"
    greedy = expected["sampled/greedy"].reshape(-1).tolist()
    steps = generate_step(
        model, inputs, sampler=make_sampler(SamplingParams()), config=GenerationConfig(max_tokens=len(greedy))
    )
    assert [t for t, _ in steps] == greedy


def test_frame_counts_are_named_as_num2words_names_them() -> None:
    for n, words in META["number_words"].items():
        assert number_words(int(n)) == words


def test_images_and_a_video_in_one_prompt_are_refused(loaded) -> None:
    _, processor = loaded
    with pytest.raises(ValueError, match="cannot take images and videos in one prompt"):
        processor("<image><video>", [FIXTURES / "images" / "rgb_56x56.png"], [VIDEOS / "clip_80x56.mov"])


@given(
    total=st.integers(1, 600),
    source_fps=st.floats(1, 60),
    fps=st.floats(0.2, 4),
    max_frames=st.integers(1, 64),
)
def test_frame_sampling_invariants(total, source_fps, fps, max_frames) -> None:
    """Sampled frames are distinct, increasing, inside the video, and at most max_frames."""
    processor = SmolVLMVideoProcessor().with_sampling(VideoSampling(fps=fps, max_frames=max_frames))
    indices = processor.frame_indices(total, source_fps)
    assert 1 <= len(indices) <= max_frames
    assert (np.diff(indices) > 0).all() and indices[0] >= 0 and indices[-1] < total
