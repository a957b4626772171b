"""Qwen3-VL video input end to end against transformers (tests/fixtures/make_fixtures_qwen3_vl_video.py):
video files read and sampled, the numpy video processor's pixels and grids, the timestamped prompt expansion,
and the logits and greedy tokens of the tiny Qwen3-VL checkpoint from a video prompt; then the ways in
(generate, the chat template, the CLI) and the one-line refusals."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_models import apply_chat_template, load
from vlm_models.cli import main
from vlm_models.processors.qwen3_vl import Qwen3VLVideoProcessor
from vlm_models.video import Video, VideoSampling
from vlm_runtime import GenerationConfig, SamplingParams, generate, generate_step, make_sampler, stream_generate
from vlm_runtime.vision_cache import VisionFeatureCache

from .conftest import FIXTURES

ROOT = FIXTURES / "qwen3_vl"
VIDEOS = FIXTURES / "videos"
TOL = 1e-4
META = json.loads((ROOT / "video_processor_reference.json").read_text())
CASES = META["cases"]
LOGIT_CASES = [name for name in CASES if f"{name}/logits" in np.load(ROOT / "video_processor_reference.npz").files]


@pytest.fixture(scope="module")
def expected():
    return np.load(ROOT / "video_processor_reference.npz")


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hf4")


def sampling_of(case: dict) -> VideoSampling:
    s = case["sampling"]
    return VideoSampling(fps=s.get("fps"), num_frames=s.get("num_frames"), max_frames=s.get("max_frames"))


def case_inputs(processor, case: dict) -> dict[str, np.ndarray]:
    """Our processor's outputs for a reference case (its own video settings where the case has some)."""
    checkpoint = processor.video_processor
    if case["settings"] is not None:
        processor.video_processor = Qwen3VLVideoProcessor.from_config(case["settings"])
    try:
        images = [FIXTURES / "images" / case["image"]] if case["image"] else []
        return processor(case["prompt"], images, [VIDEOS / case["clip"]], sampling_of(case))
    finally:
        processor.video_processor = checkpoint


def user_message(case: dict) -> list[dict]:
    content = [{"type": "video"}, *([{"type": "image"}] if case["image"] else [])]
    return [{"role": "user", "content": [*content, {"type": "text", "text": META["prompt_text"]}]}]


@pytest.mark.parametrize("name", list(CASES))
def test_video_processing_matches_transformers(loaded, expected, name: str) -> None:
    """Reading, frame sampling (fps, max_frames, num_frames), the video pixel budget (shrinking, a side below one
    merged patch, the per-frame cap), temporal padding of an odd frame count, patch order and the timestamped
    prompt: pixels within 1e-5, grids and token ids identical."""
    _, processor = loaded
    case = CASES[name]
    assert apply_chat_template(processor, None, user_message(case)) == case["prompt"]
    ours = case_inputs(processor, case)
    for key in ("input_ids", "video_grid_thw", "image_grid_thw"):
        if f"{name}/{key}" in expected.files:
            np.testing.assert_array_equal(ours[key], expected[f"{name}/{key}"], err_msg=key)
    for key in ("pixel_values_videos", "pixel_values"):
        if f"{name}/{key}" in expected.files:
            want = expected[f"{name}/{key}"]
            assert ours[key].shape == want.shape, key
            np.testing.assert_allclose(ours[key], want, atol=1e-5, rtol=0, err_msg=key)
    assert processor.tokenizer.decode(ours["input_ids"][0].tolist()) == case["text"]


def test_the_reference_cases_cover_what_they_claim() -> None:
    grids = {name: np.load(ROOT / "video_processor_reference.npz")[f"{name}/video_grid_thw"][0] for name in CASES}
    assert len(CASES["fps_max_frames_and_image"]["frames_indices"]) % 2 == 1  # an odd count: padded
    assert len({tuple(g) for g in grids.values()}) >= 4  # different sizes and lengths
    assert grids["large_budget"][1:].prod() > grids["num_frames_shrinks"][1:].prod()  # the budget shrank one


@pytest.mark.parametrize("name", LOGIT_CASES)
def test_video_prompt_logits_and_greedy_tokens_match_transformers(loaded, expected, name: str) -> None:
    model, processor = loaded
    inputs = {k: mx.array(v) for k, v in case_inputs(processor, CASES[name]).items()}
    diff = np.abs(np.array(model(**inputs).logits) - expected[f"{name}/logits"]).max()
    assert diff <= TOL, f"max |logits - reference| = {diff:.2e}"
    greedy = expected[f"{name}/greedy"].reshape(-1).tolist()
    steps = generate_step(
        model, inputs, sampler=make_sampler(SamplingParams()), config=GenerationConfig(max_tokens=len(greedy))
    )
    assert [t for t, _ in steps] == greedy


def test_generate_takes_videos_and_their_sampling(loaded, expected) -> None:
    """generate / stream_generate read the file and sample it as asked; the vision feature cache holds the
    image only (videos always run the tower), and the tokens stay the reference's."""
    model, processor = loaded
    name = "fps_max_frames_and_image"
    case = CASES[name]
    greedy = expected[f"{name}/greedy"].reshape(-1).tolist()
    vision_cache = VisionFeatureCache(max_entries=4)
    tokens = [
        r.token
        for r in stream_generate(
            model,
            processor,
            case["prompt"],
            image=[FIXTURES / "images" / case["image"]],
            videos=[VIDEOS / case["clip"]],
            video_sampling=sampling_of(case),
            vision_cache=vision_cache,
            max_tokens=len(greedy),
            ignore_eos=True,
        )
    ]
    assert tokens == greedy
    assert len(vision_cache) == 1
    text = generate(model, processor, CASES["defaults"]["prompt"], videos=VIDEOS / "clip_80x56.mov", max_tokens=4)
    assert text.generation_tokens >= 1 and text.prompt_tokens == expected["defaults/input_ids"].shape[1]


def test_video_frames_in_memory_and_in_a_folder_equal_the_file(loaded, tmp_path) -> None:
    from PIL import Image

    from vlm_models.video import read_video

    _, processor = loaded
    video = read_video(VIDEOS / "clip_80x56.mov")
    prompt = CASES["defaults"]["prompt"]
    from_file = processor(prompt, videos=[VIDEOS / "clip_80x56.mov"])
    for i, frame in enumerate(video.frames):
        Image.fromarray(frame).save(tmp_path / f"{i:04d}.png")
    in_memory = processor(prompt, videos=[Video.from_frames(video.frames, video.fps)])
    from_folder = processor(prompt, videos=[tmp_path], video_sampling=VideoSampling(source_fps=video.fps))
    for other in (in_memory, from_folder):
        for key, value in from_file.items():
            np.testing.assert_array_equal(other[key], value, err_msg=key)


def test_video_slot_and_support_errors(loaded) -> None:
    _, processor = loaded
    prompt = CASES["defaults"]["prompt"]
    with pytest.raises(ValueError, match=r"1 video slot\(s\) .* but 2 video\(s\)"):
        processor(prompt, videos=[VIDEOS / "clip_80x56.mov"] * 2)
    with pytest.raises(ValueError, match="at least 2 frames"):
        processor(prompt, videos=[VIDEOS / "clip_80x56.mov"], video_sampling=VideoSampling(num_frames=1))
    with pytest.raises(ValueError, match="fps must be positive"):
        VideoSampling(fps=0)
    _, llava = load(FIXTURES / "llava" / "hf4")
    assert not llava.supports_video
    with pytest.raises(ValueError, match="does not take video input"):
        llava("Describe the video.", videos=[VIDEOS / "clip_80x56.mov"])


def test_cli_generates_from_a_video(loaded, capsys) -> None:
    _, processor = loaded
    clip, sampling = VIDEOS / "clip_40x100.mov", VideoSampling(fps=4, max_frames=5)
    prompt = apply_chat_template(processor, None, "What happens?", num_videos=1)
    tokens = processor(prompt, videos=[clip], video_sampling=sampling)["input_ids"].shape[1]
    args = ["generate", "--model", str(ROOT / "hf4"), "--prompt", "What happens?", "--max-tokens", "3"]
    assert main([*args, "--video", str(clip), "--video-fps", "4", "--video-max-frames", "5"]) == 0
    assert f"prompt: {tokens} tokens" in capsys.readouterr().err
    assert main([*args, "--video", str(VIDEOS / "missing.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "video not found" in err
    assert main([*args, "--video", str(VIDEOS / "clip_40x100.mov"), "--video-num-frames", "0"]) == 2
    assert "num frames must be at least 1" in capsys.readouterr().err
    llava = ["generate", "--model", str(FIXTURES / "llava" / "hf4"), "--max-tokens", "2"]
    assert main([*llava, "--video", str(VIDEOS / "clip_40x100.mov")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not take video input" in err


@given(
    total=st.integers(1, 400),
    source_fps=st.floats(0.5, 60),
    fps=st.floats(0.1, 8),
    max_frames=st.integers(1, 64),
    num_frames=st.one_of(st.none(), st.integers(1, 50)),
)
def test_frame_sampling_invariants(total, source_fps, fps, max_frames, num_frames) -> None:
    """Sampled indices are in the video, in order, from its first frame to its last (one frame: the first); sampling by fps takes at
    most max_frames and never more frames than there are, and at least min_frames where the video has them."""
    processor = Qwen3VLVideoProcessor().with_sampling(
        VideoSampling(fps=fps, num_frames=num_frames, max_frames=max_frames)
    )
    indices = processor.frame_indices(total, source_fps)
    assert (np.diff(indices) >= 0).all() and indices[0] == 0
    assert len(indices) == 1 or indices[-1] == total - 1
    if num_frames is not None:
        assert len(indices) == num_frames
    else:
        assert len(indices) <= min(max_frames, total)
        assert len(indices) >= min(processor.min_frames, max_frames, total)
    stamps = processor.timestamps(indices, source_fps)
    assert len(stamps) == -(-len(indices) // processor.temporal_patch_size) and stamps == sorted(stamps)


@pytest.mark.parametrize("layout", ["hf5", "mlx_community"])
def test_every_layout_reads_the_video_settings(expected, layout: str) -> None:
    """hf5 (no video processor config) takes the image processor's settings, as transformers falls back to them;
    the MLX-community folder's video processor gives its budget as min_pixels / max_pixels."""
    _, processor = load(ROOT / layout)
    ours = case_inputs(processor, CASES["defaults"])
    np.testing.assert_array_equal(ours["input_ids"], expected["defaults/input_ids"])
    np.testing.assert_allclose(ours["pixel_values_videos"], expected["defaults/pixel_values_videos"], atol=1e-5, rtol=0)
