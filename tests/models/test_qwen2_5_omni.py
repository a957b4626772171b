"""Qwen2.5-Omni's thinker beyond the shared parity tests (tests/fixtures/make_fixtures_qwen2_5_omni.py): the
processor on the video cases (a video alone, one heard with its sound track, and image + audio + video in one
prompt) against transformers, the ways in (generate, stream_generate, batch_generate, the CLI), a video file's
own sound track, the published layout's speech parts and q/k/v, the time chunks, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_models import apply_chat_template, load
from vlm_models.audio import load_audio
from vlm_models.cli import main
from vlm_models.config import ConfigError
from vlm_models.convert import ConvertOptions, convert
from vlm_models.models.qwen2_5_omni import ModelConfig
from vlm_models.processors.qwen2_5_omni import time_chunks
from vlm_models.video import Video, VideoLoadError, VideoSampling, read_video
from vlm_runtime import batch_generate, generate, stream_generate

from .conftest import AUDIO, FIXTURES, Reference, inputs_of

ROOT = FIXTURES / "qwen2_5_omni"
TOL = 1e-4
FIXTURE_VIDEO_BOUNDS = dict(min_pixels=56 * 56, max_pixels=56 * 84)
"""The per-frame bounds the fixture script passed to transformers' processor (its defaults are far larger)."""


def sweep(n: int) -> np.ndarray:
    """The fixture script's test signal (make_fixtures_qwen2_5_omni.sweep), rebuilt here."""
    t = np.arange(n, dtype=np.float64) / 16000
    return (0.4 * np.sin(2 * np.pi * (220 * t + 600 * t * t)) * (0.6 + 0.4 * np.cos(2 * np.pi * 3 * t))).astype(
        np.float32
    )


def clip_frames(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """The fixture script's frames (make_fixtures_qwen2_5_omni.clip_frames), rebuilt here."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frame = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 40 * i)], -1)
        top, left = (i * 7) % max(height - 16, 1), (i * 11) % max(width - 16, 1)
        frame[top : top + 16, left : left + 16] = (250, 30, 200)
        frames[i] = np.clip(frame + rng.integers(-20, 21, frame.shape), 0, 255)
    return frames


@pytest.fixture(scope="module")
def loaded():
    model, processor = load(ROOT / "hub")
    processor.video_processor = dataclasses.replace(processor.video_processor, **FIXTURE_VIDEO_BOUNDS)
    return model, processor


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("qwen2_5_omni")


def case_media(ref: Reference, case: str) -> dict:
    """A reference case's media as the processor takes them (the video's sound track rides on the Video)."""
    meta = ref.meta["cases"][case]
    videos = [Video.from_frames(clip_frames(*spec), 2.0) for spec in meta["videos"]]
    sampling = None
    if meta["use_audio_in_video"]:
        videos = [dataclasses.replace(v, audio=sweep(48_000)) for v in videos]
        sampling = VideoSampling(with_audio=True)
    return {
        "images": [FIXTURES / "images" / name for name in meta["images"]],
        "videos": videos,
        "video_sampling": sampling,
        "audios": [AUDIO / name for name in meta["audios"]],
    }


@pytest.mark.parametrize("case", ["video", "video_with_audio", "mixed"])
def test_the_processor_matches_transformers_on_videos(loaded, ref: Reference, case: str) -> None:
    _, processor = loaded
    media = case_media(ref, case)
    ours = processor(
        ref.meta["cases"][case]["prompt"], media["images"], media["videos"], media["video_sampling"], media["audios"]
    )
    expected = {k.split("/", 1)[1] for k in ref.arrays.files if k.startswith(f"{case}/")}
    assert set(ours) == expected - {"logits", "greedy", "position_ids", "num_audio_tokens"}
    for name in ("input_ids", "video_grid_thw", "image_grid_thw", "feature_attention_mask"):
        if name in ours:
            np.testing.assert_array_equal(ours[name], ref.get(case, name), err_msg=f"{case}/{name}")
    for name, tol in (("pixel_values_videos", 1e-5), ("pixel_values", 1e-5), ("input_features", TOL)):
        if name in ours:
            np.testing.assert_allclose(ours[name], ref.get(case, name), atol=tol, rtol=0, err_msg=f"{case}/{name}")
    np.testing.assert_array_equal(ours["video_second_per_grid"], ref.get(case, "video_second_per_grid"))


def test_audio_in_video_interleaves_two_second_chunks(ref: Reference) -> None:
    """3 s of frames (3 temporal patches of 4 merged patches) and 75 audio tokens: the first two patches, the
    first 50 audio tokens (2 s), the third patch, the last 25; the audio positions run from the video's start."""
    ids = ref.get("video_with_audio", "input_ids")[0]
    config = json.loads((ROOT / "hub" / "config.json").read_text())["thinker_config"]
    video, audio, bos = config["video_token_index"], config["audio_token_index"], config["audio_start_token_id"]
    start = int(np.nonzero(ids == bos)[0][0])
    runs, kinds = [], ids[start + 1 :]
    for token in kinds[: np.isin(kinds, [video, audio]).argmin()]:
        if runs and runs[-1][0] == token:
            runs[-1][1] += 1
        else:
            runs.append([int(token), 1])
    assert runs == [[video, 8], [audio, 50], [video, 4], [audio, 25]]
    positions = ref.get("video_with_audio", "position_ids")[:, 0]
    first_audio = start + 1 + 8
    assert positions[0, start] == positions[0, start - 1]  # <|audio_bos|> shares <|vision_bos|>'s position
    np.testing.assert_array_equal(positions[:, first_audio], [positions[0, start] + 1] * 3)


@pytest.mark.parametrize("case", ["short_video_long_track", "long_video_short_track", "two_heard_videos"])
def test_held_out_audio_in_video_layouts_match_transformers(loaded, ref: Reference, case: str) -> None:
    """Other lengths than the logits cases (a track longer than its video, one shorter, two heard videos around
    a clip, after an image): prompts, grids, masks and the 3D positions equal transformers'."""
    model, processor = loaded
    expected = np.load(ROOT / "held_out_positions.npz")
    meta = ref.meta["held_out"][case]
    tracks = iter(meta["track_seconds"])
    videos = [Video.from_frames(clip_frames(*v), 2.0) for kind, v in meta["parts"] if kind == "video"]
    videos = [dataclasses.replace(v, audio=sweep(int(next(tracks) * 16000))) for v in videos]
    images = [FIXTURES / "images" / v for kind, v in meta["parts"] if kind == "image"]
    audios = [AUDIO / v for kind, v in meta["parts"] if kind == "audio"]
    ours = processor(meta["prompt"], images, videos, VideoSampling(with_audio=True), audios)
    for name in ("input_ids", "video_grid_thw", "video_second_per_grid", "feature_attention_mask"):
        np.testing.assert_array_equal(ours[name], expected[f"{case}/{name}"], err_msg=f"{case}/{name}")
    prompt = model.embed_prompt(**{k: mx.array(v) for k, v in ours.items()})
    np.testing.assert_array_equal(np.array(prompt.position_ids), expected[f"{case}/position_ids"])


def test_generate_stream_and_batch(loaded, ref: Reference) -> None:
    model, processor = loaded
    for case in ("video_with_audio", "mixed"):
        media = case_media(ref, case)
        greedy = ref.get(case, "greedy")[0].tolist()
        events = stream_generate(
            model,
            processor,
            ref.meta["cases"][case]["prompt"],
            image=media["images"],
            videos=media["videos"],
            video_sampling=media["video_sampling"],
            audios=media["audios"],
            max_tokens=len(greedy),
            ignore_eos=True,
        )
        assert [e.token for e in events] == greedy, case
    prompts = [
        apply_chat_template(processor, None, "What is it?", num_audios=1),
        apply_chat_template(processor, None, "Text only, and a little longer than that.", num_audios=0),
        apply_chat_template(processor, None, "And these?", num_audios=2, num_images=1),
    ]
    images = [None, None, [FIXTURES / "images" / "rgb_56x56.png"]]
    audios = [[AUDIO / "two_tones.wav"], None, [AUDIO / "noise_burst.flac", AUDIO / "tone_chirp.wav"]]
    batched = batch_generate(model, processor, prompts, images=images, audios=audios, max_tokens=8, ignore_eos=True)
    for prompt, pictures, clips, result in zip(prompts, images, audios, batched):
        alone = generate(model, processor, prompt, image=pictures, audio=clips, max_tokens=8, ignore_eos=True)
        assert result.text == alone.text and result.generation_tokens == 8


def test_batch_generate_gives_the_padded_reference_batch(loaded, ref: Reference) -> None:
    """The reference's left-padded batch (a video + clip prompt, a longer image prompt): batch_generate's
    texts are those of transformers' greedy tokens for each row."""
    model, processor = loaded
    prompts = ref.meta["cases"]["batch_pad"]["prompts"]
    results = batch_generate(
        model,
        processor,
        prompts,
        images=[None, [FIXTURES / "images" / "rgb_56x56.png"]],
        videos=[[Video.from_frames(clip_frames(2, 56, 56, 3), 2.0)], None],
        audios=[[AUDIO / "tone_chirp.wav"], None],
        max_tokens=16,
        ignore_eos=True,
    )
    greedy = ref.get("batch_pad", "greedy")
    assert [r.text for r in results] == [processor.decode(row.tolist()) for row in greedy]


def write_video_with_sound(path: Path, frames: np.ndarray, samples: np.ndarray) -> None:
    """A Matroska file: lossless FFV1 frames at 2 fps and a 16 kHz PCM track."""
    import av

    with av.open(str(path), "w") as container:
        video = container.add_stream("ffv1", rate=2)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        sound = container.add_stream("pcm_f32le", rate=16_000, layout="mono")
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        chunk = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        chunk.sample_rate = 16_000
        for packet in sound.encode(chunk):
            container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)


def test_a_video_file_brings_its_own_sound_track(loaded, ref: Reference, tmp_path: Path, capsys) -> None:
    """The file path reads the frames and the track (PyAV) and gives the reference's tokens: lossless frames and
    float PCM carry the fixture's exact pixels and samples. The CLI's --video-audio takes the same path."""
    model, processor = loaded
    frames = clip_frames(*ref.meta["cases"]["video_with_audio"]["videos"][0])
    path = tmp_path / "clip.mkv"
    write_video_with_sound(path, frames, sweep(48_000))
    np.testing.assert_array_equal(read_video(path).frames, frames)
    np.testing.assert_array_equal(load_audio(path, 16_000), sweep(48_000))
    prompt = ref.meta["cases"]["video_with_audio"]["prompt"]
    inputs = processor(prompt, videos=[path], video_sampling=VideoSampling(with_audio=True))
    np.testing.assert_array_equal(inputs["input_ids"], ref.get("video_with_audio", "input_ids"))
    logits = np.array(model(**{k: mx.array(v) for k, v in inputs.items()}).logits)
    assert np.abs(logits - ref.get("video_with_audio", "logits")).max() <= TOL
    args = ["generate", "--model", str(ROOT / "hub"), "--prompt", "Describe the video and its sound."]
    assert main([*args, "--video", str(path), "--video-audio", "--max-tokens", "2"]) == 0
    capsys.readouterr()


def test_the_published_layout_drops_the_speech_parts_and_fuses_qkv(loaded) -> None:
    model, _ = loaded
    raw = mx.load(str(ROOT / "hub" / "model.safetensors"))
    assert any(k.startswith("talker.") for k in raw) and any(k.startswith("token2wav.") for k in raw)
    ours = model.sanitize(raw)
    assert not any(k.startswith(("talker.", "token2wav.", "thinker.")) for k in ours)
    q = raw["thinker.visual.blocks.0.attn.q.weight"]
    fused = ours["model.visual.blocks.0.attn.qkv.weight"]
    assert fused.shape == (3 * q.shape[0], q.shape[1]) and mx.array_equal(fused[: q.shape[0]], q).item()
    published = model.mlx_community_names(ours)
    assert set(published) == {k for k in raw if k.startswith("thinker.")}
    back = model.sanitize(published)
    assert all(mx.array_equal(back[k], ours[k]).item() for k in ours)


def test_our_converter_writes_a_layout_that_loads_to_the_same_logits(tmp_path: Path, ref: Reference) -> None:
    out = convert(ROOT / "hub", tmp_path / "mlx", ConvertOptions()).destination
    model, _ = load(out)
    for case in ("two_audios", "video_with_audio"):
        logits = np.array(model(**inputs_of(ref, case)).logits)
        assert np.abs(logits - ref.get(case, "logits")).max() <= TOL, case


def test_the_processor_keeps_transformers_per_frame_bounds() -> None:
    """Qwen2_5OmniProcessor's own video bounds (128 to 768 merged patches a frame) take the place of the video
    processor config's, as in transformers (the fixture script had to name its small ones in the call)."""
    _, processor = load(ROOT / "hub")
    saved = json.loads((ROOT / "hub" / "video_preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 56 * 56, "longest_edge": 56 * 84}
    bounds = (processor.video_processor.min_pixels, processor.video_processor.max_pixels)
    assert bounds == (128 * 28 * 28, 768 * 28 * 28)


def test_the_config_defaults_fill_in() -> None:
    parsed = ModelConfig.from_omni({"model_type": "qwen2_5_omni", "thinker_config": {}})
    assert (parsed.text.hidden_size, parsed.audio.encoder.d_model, parsed.audio.n_window) == (3584, 1280, 100)
    assert (parsed.audio_token_id, parsed.image_token_id, parsed.video_token_id) == (151646, 151655, 151656)
    assert parsed.position_id_per_seconds == 25 and parsed.seconds_per_chunk == 2
    with pytest.raises(ConfigError, match="sliding-window"):
        ModelConfig.from_omni({"thinker_config": {"text_config": {"use_sliding_window": True}}})
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        ModelConfig.from_omni({"thinker_config": {"text_config": {"rope_scaling": {"rope_type": "yarn"}}}})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 400, allow_nan=False), max_size=40), st.integers(1, 80))
def test_time_chunks_partition_the_tokens(values: list[float], per_chunk: int) -> None:
    times = np.sort(np.asarray(values))
    runs = time_chunks(times, per_chunk)
    assert runs[0][0] == 0 and runs[-1][1] == len(times)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    assert all(start < end for start, end in runs[1:-1])  # only the first can be empty (a first time past 1 chunk)
    for j, (start, end) in enumerate(runs):
        # A run holds the values below its bound after its opening one, and closes at the first reaching it.
        assert all(times[i] < (j + 1) * per_chunk for i in range(start + 1, end))
        if j < len(runs) - 1:
            assert times[end] >= (j + 1) * per_chunk
    if len(times) and times[-1] < per_chunk:
        assert runs == [(0, len(times))]


def test_bad_input_gets_one_clear_line(loaded, capsys) -> None:
    _, processor = loaded
    prompt = apply_chat_template(processor, None, "What is it?", num_videos=1)
    frames = Video.from_frames(clip_frames(4, 56, 56, 1), 2.0)
    with pytest.raises(VideoLoadError, match="without its sound track"):
        processor(prompt, videos=[frames], video_sampling=VideoSampling(with_audio=True))
    with pytest.raises(VideoLoadError, match="frame images has no sound track"):
        processor(prompt, videos=[FIXTURES / "images"], video_sampling=VideoSampling(with_audio=True, source_fps=2))
    silent = FIXTURES / "videos" / "clip_80x56.mov"
    with pytest.raises(ValueError, match=str(silent.name)):
        processor(prompt, videos=[silent], video_sampling=VideoSampling(with_audio=True))
    _, vl = load(FIXTURES / "qwen2_5_vl" / "hf4")
    vl_prompt = apply_chat_template(vl, None, "What is it?", num_videos=1)
    with pytest.raises(ValueError, match="cannot hear a video's sound track"):
        vl(vl_prompt, videos=[silent], video_sampling=VideoSampling(with_audio=True))
    args = ["generate", "--model", str(ROOT / "hub"), "--prompt", "Hi", "--max-tokens", "2"]
    for bad, says in [
        ([*args, "--video-audio"], "--video-audio hears the sound track of a --video"),
        ([*args, "--video", str(silent), "--video-audio"], silent.name),
    ]:
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
