"""Qwen2-VL and Qwen2.5-VL video input against transformers (tests/fixtures/make_fixtures_qwen2_vl_video.py):
frame sampling (every frame, fps with a frame cap, a frame count), the per-frame pixel budget and its clip-wide
cap, temporal padding of an odd frame count, patches, ``video_grid_thw`` and Qwen2.5-VL's ``second_per_grid_ts``;
then the M-RoPE positions, logits and greedy tokens of the tiny checkpoints from video prompts (Qwen2.5-VL's
temporal step ``second_per_grid_ts * tokens_per_second`` included), and the ways in."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_models import apply_chat_template, load
from vlm_models.cli import main
from vlm_models.processors.qwen2_vl import Qwen2VLVideoProcessor
from vlm_models.video import VideoSampling
from vlm_runtime import GenerationConfig, SamplingParams, generate, generate_step, make_sampler, stream_generate

from .conftest import FIXTURES

VIDEOS = FIXTURES / "videos"
REFERENCE = FIXTURES / "qwen2_vl" / "video_reference"
META = json.loads(REFERENCE.with_suffix(".json").read_text())
CASES = META["cases"]
FAMILIES = ("qwen2_vl", "qwen2_5_vl")
TOL = 1e-4


@pytest.fixture(scope="module")
def expected():
    return np.load(REFERENCE.with_suffix(".npz"))


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    model, processor = load(FIXTURES / request.param / "hf4")
    return request.param, model, processor


def sampling_of(case: dict) -> VideoSampling | None:
    return None if case["sampling"] is None else VideoSampling(**case["sampling"])


def case_inputs(processor, case: dict) -> dict[str, np.ndarray]:
    checkpoint = processor.video_processor
    if case["settings"] is not None:
        processor.video_processor = type(checkpoint).from_config(case["settings"])
    try:
        images = [FIXTURES / "images" / case["image"]] if case["image"] else []
        return processor(case["prompt"], images, [VIDEOS / c for c in case["clips"]], sampling_of(case))
    finally:
        processor.video_processor = checkpoint


def user_message(case: dict) -> list[dict]:
    content = [*({"type": "video"} for _ in case["clips"]), *([{"type": "image"}] if case["image"] else [])]
    return [{"role": "user", "content": [*content, {"type": "text", "text": META["prompt_text"]}]}]


@pytest.mark.parametrize("name", list(CASES))
def test_video_processing_matches_transformers(loaded, expected, name: str) -> None:
    family, _, processor = loaded
    case = CASES[name]
    assert apply_chat_template(processor, None, user_message(case)) == case["prompt"]
    ours = case_inputs(processor, case)
    for key in ("input_ids", "video_grid_thw", "image_grid_thw"):
        if f"{name}/{key}" in expected.files:
            np.testing.assert_array_equal(ours[key], expected[f"{name}/{key}"], err_msg=key)
    for key in ("pixel_values_videos", "pixel_values"):
        if f"{name}/{key}" in expected.files:
            assert ours[key].shape == expected[f"{name}/{key}"].shape, key
            np.testing.assert_allclose(ours[key], expected[f"{name}/{key}"], atol=1e-5, rtol=0, err_msg=key)
    if family == "qwen2_5_vl":
        np.testing.assert_array_equal(ours["second_per_grid_ts"], expected[f"{name}/second_per_grid_ts"])
    else:  # Qwen2-VL's processor has no such output; its temporal step is always 1
        assert "second_per_grid_ts" not in ours
    assert processor.tokenizer.decode(ours["input_ids"][0].tolist()) == case["text"]


def test_the_reference_cases_cover_what_they_claim(expected) -> None:
    frames = {name: case["frames_indices"] for name, case in CASES.items()}
    assert len(frames["odd_frame_count"][0]) % 2 == 1  # padded by repeating the last frame
    assert frames["every_frame"][0] == list(range(12))
    grids = {name: expected[f"{name}/video_grid_thw"][0].tolist() for name in CASES}
    assert grids["capped_pixels_per_frame"][1:] != grids["num_frames_rounds"][1:]  # the cap shrank the frames
    seconds = {float(expected[f"{n}/second_per_grid_ts"][0]) for n in CASES}
    assert len(seconds) >= 4  # different sampled rates, so different temporal steps
    steps = 2 * expected["odd_frame_count/second_per_grid_ts"][0]
    assert steps != int(steps)  # a fractional step: truncation of the temporal positions is exercised


@pytest.mark.parametrize("name", [n for n in CASES if f"qwen2_vl/{n}/logits" in np.load(f"{REFERENCE}.npz").files])
def test_video_prompt_positions_logits_and_greedy_tokens_match_transformers(loaded, expected, name: str) -> None:
    family, model, processor = loaded
    inputs = {k: mx.array(v) for k, v in case_inputs(processor, CASES[name]).items()}
    positions = np.array(model.embed_prompt(**inputs).position_ids)
    np.testing.assert_array_equal(positions, expected[f"{family}/{name}/position_ids"])
    want = expected[f"{family}/{name}/logits"]
    diff = np.abs(np.array(model(**inputs).logits)[:, -want.shape[1] :] - want).max()
    assert diff <= TOL, f"max |logits - reference| = {diff:.2e}"
    greedy = expected[f"{family}/{name}/greedy"].reshape(-1).tolist()
    steps = generate_step(
        model, inputs, sampler=make_sampler(SamplingParams()), config=GenerationConfig(max_tokens=len(greedy))
    )
    assert [t for t, _ in steps] == greedy


def test_qwen2_5_vl_temporal_positions_follow_the_seconds_per_patch(expected) -> None:
    """Without ``second_per_grid_ts`` (as the peer runs it) the temporal axis advances one per patch and the
    logits leave the reference; with it they match."""
    model, processor = load(FIXTURES / "qwen2_5_vl" / "hf4")
    inputs = {k: mx.array(v) for k, v in case_inputs(processor, CASES["odd_frame_count"]).items()}
    positions = np.array(model.embed_prompt(**inputs).position_ids)
    video = np.array(inputs["input_ids"][0]) == model.config.video_token_id
    # 0.4 s per patch x 2 positions per second: patches 0.8 apart, truncated
    assert sorted(set(positions[0, 0, video] - positions[0, 0, video].min())) == [0, 1, 2, 3, 4, 5]
    inputs_without = {k: v for k, v in inputs.items() if k != "second_per_grid_ts"}
    want = expected["qwen2_5_vl/odd_frame_count/logits"]
    off = np.abs(np.array(model(**inputs_without).logits)[:, -want.shape[1] :] - want).max()
    assert off > 1e-2


def test_generate_and_the_cli_take_videos(loaded, expected, capsys) -> None:
    family, model, processor = loaded
    name = "fps_max_frames_and_image"
    case = CASES[name]
    greedy = expected[f"{family}/{name}/greedy"].reshape(-1).tolist()
    events = stream_generate(
        model,
        processor,
        case["prompt"],
        image=[FIXTURES / "images" / case["image"]],
        videos=[VIDEOS / c for c in case["clips"]],
        video_sampling=sampling_of(case),
        max_tokens=len(greedy),
        ignore_eos=True,
    )
    assert [e.token for e in events] == greedy
    result = generate(model, processor, CASES["every_frame"]["prompt"], videos=VIDEOS / "clip_80x56.mov", max_tokens=2)
    assert result.prompt_tokens == expected["every_frame/input_ids"].shape[1]
    args = ["generate", "--model", str(FIXTURES / family / "hf4"), "--prompt", "What happens?", "--max-tokens", "2"]
    assert main([*args, "--video", str(VIDEOS / "clip_40x100.mov"), "--video-fps", "2", "--video-max-frames", "5"]) == 0
    prompt = apply_chat_template(processor, None, "What happens?", num_videos=1)
    tokens = processor(prompt, videos=[VIDEOS / "clip_40x100.mov"], video_sampling=VideoSampling(fps=2, max_frames=5))
    assert f"prompt: {tokens['input_ids'].shape[1]} tokens" in capsys.readouterr().err
    assert main([*args, "--video", str(VIDEOS / "clip_40x100.mov"), "--video-num-frames", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 2 frames" in err


@pytest.mark.parametrize("layout", ["hf5", "mlx_community"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_reads_the_video_settings(expected, family: str, layout: str) -> None:
    _, processor = load(FIXTURES / family / layout)
    ours = case_inputs(processor, CASES["every_frame"])
    np.testing.assert_array_equal(ours["input_ids"], expected["every_frame/input_ids"])
    np.testing.assert_array_equal(ours["pixel_values_videos"], expected["every_frame/pixel_values_videos"])


@given(
    total=st.integers(2, 400),
    source_fps=st.floats(0.5, 60),
    fps=st.one_of(st.none(), st.floats(0.1, 8)),
    max_frames=st.integers(2, 64),
    num_frames=st.one_of(st.none(), st.integers(2, 50)),
)
def test_frame_sampling_invariants(total, source_fps, fps, max_frames, num_frames) -> None:
    """Sampled indices start at the first frame, increase, stay in the video, and come in whole temporal
    patches where sampled; by fps at most max_frames; with nothing asked every frame."""
    processor = Qwen2VLVideoProcessor().with_sampling(
        VideoSampling(fps=fps, num_frames=num_frames, max_frames=max_frames)
    )
    try:
        indices = processor.frame_indices(total, source_fps)
    except ValueError as exc:  # more frames asked than there are, or fewer than one temporal patch
        assert "cannot sample" in str(exc)
        count = processor.frame_count(total, source_fps)
        assert count is not None and (count < 2 or count > total)
        return
    assert indices[0] == 0 and (np.diff(indices) > 0).all() and indices[-1] < total
    if processor.frame_count(total, source_fps) is None:  # only a cap the video is within: every frame
        assert indices.tolist() == list(range(total)) and total <= max_frames
    else:
        assert len(indices) % 2 == 0
    if num_frames is None and fps is not None:
        assert len(indices) <= max_frames
    assert Qwen2VLVideoProcessor().frame_indices(total, source_fps).tolist() == list(range(total))
