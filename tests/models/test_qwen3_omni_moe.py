"""Qwen3-Omni-MoE's thinker beyond the shared parity tests (tests/fixtures/make_fixtures_qwen3_omni_moe.py): the
processor on the video cases (a video alone, one heard with its sound track, and image + audio + video in one
prompt) against transformers, held-out audio-in-video layouts, the ways in (generate, stream_generate,
batch_generate, a video file's own sound track), the published layout's speech parts and per-expert MLPs, the
audio encoder's chunking and windows, the token interleaving, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_models import apply_chat_template, load
from vlm_models.cli import main
from vlm_models.config import ConfigError
from vlm_models.convert import ConvertOptions, convert
from vlm_models.models.qwen3_omni_moe import ModelConfig, interleave_in_time
from vlm_models.processors.qwen3_omni_moe import Qwen3OmniMoeVideoProcessor, audio_token_count
from vlm_models.video import Video, VideoSampling
from vlm_runtime import batch_generate, generate, stream_generate

from .conftest import AUDIO, FIXTURES, Reference, check_chunked_prefill, inputs_of
from .test_qwen2_5_omni import clip_frames, sweep, write_video_with_sound

ROOT = FIXTURES / "qwen3_omni_moe"
TOL = 1e-4
FIXTURE_VIDEO_BOUNDS = dict(min_pixels=64 * 64, max_pixels=64 * 96)
"""The per-frame bounds the fixture script passed to transformers' processor (its defaults are far larger)."""


@pytest.fixture(scope="module")
def loaded():
    model, processor = load(ROOT / "hub")
    processor.video_processor = dataclasses.replace(processor.video_processor, **FIXTURE_VIDEO_BOUNDS)
    return model, processor


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("qwen3_omni_moe")


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


def test_audio_in_video_interleaves_tokens_in_time(ref: Reference) -> None:
    """3 temporal patches of 4 merged patches at 0, 26 and 52 (2 s a patch, 13 positions a second) and 39 audio
    tokens (3 s): patch 0, audio 0-25, patch 1, audio 26-38, patch 2; the begin and end pairs take consecutive
    positions, the audio runs from the video's start."""
    ids = ref.get("video_with_audio", "input_ids")[0]
    config = json.loads((ROOT / "hub" / "config.json").read_text())["thinker_config"]
    video, audio, bos = config["video_token_id"], config["audio_token_id"], config["audio_start_token_id"]
    start = int(np.nonzero(ids == bos)[0][0])
    runs, kinds = [], ids[start + 1 :]
    for token in kinds[: np.isin(kinds, [video, audio]).argmin()]:
        if runs and runs[-1][0] == token:
            runs[-1][1] += 1
        else:
            runs.append([int(token), 1])
    assert runs == [[video, 4], [audio, 26], [video, 4], [audio, 13], [video, 4]]
    positions = ref.get("video_with_audio", "position_ids")[:, 0]
    assert positions[0, start] == positions[0, start - 1] + 1  # <|audio_start|> follows <|vision_start|>
    np.testing.assert_array_equal(positions[:, start + 5], [positions[0, start] + 1] * 3)  # the first audio token


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
    model, processor = loaded
    prompts = ref.meta["cases"]["batch_pad"]["prompts"]
    results = batch_generate(
        model,
        processor,
        prompts,
        images=[None, [FIXTURES / "images" / "rgb_56x56.png"]],
        videos=[[Video.from_frames(clip_frames(2, 64, 64, 3), 2.0)], None],
        audios=[[AUDIO / "tone_chirp.wav"], None],
        max_tokens=16,
        ignore_eos=True,
    )
    greedy = ref.get("batch_pad", "greedy")
    assert [r.text for r in results] == [processor.decode(row.tolist()) for row in greedy]


@pytest.mark.parametrize("case", ["video_with_audio", "mixed"])
def test_chunked_prefill_keeps_the_deepstack_channels(loaded, ref: Reference, case: str) -> None:
    """Prefill in chunks of 7 tokens (cutting through the media runs): the reference's last logits and tokens."""
    model, _ = loaded
    check_chunked_prefill(model, ref, case, 7)


def test_a_video_file_brings_its_own_sound_track(loaded, ref: Reference, tmp_path: Path, capsys) -> None:
    """A Matroska file's lossless frames and float PCM track give the reference's tokens and logits; the CLI's
    --video-audio and --audio take the same paths."""
    model, processor = loaded
    frames = clip_frames(*ref.meta["cases"]["video_with_audio"]["videos"][0])
    path = tmp_path / "clip.mkv"
    write_video_with_sound(path, frames, sweep(48_000))
    prompt = ref.meta["cases"]["video_with_audio"]["prompt"]
    inputs = processor(prompt, videos=[path], video_sampling=VideoSampling(with_audio=True))
    np.testing.assert_array_equal(inputs["input_ids"], ref.get("video_with_audio", "input_ids"))
    logits = np.array(model(**{k: mx.array(v) for k, v in inputs.items()}).logits)
    assert np.abs(logits - ref.get("video_with_audio", "logits")).max() <= TOL
    args = ["generate", "--model", str(ROOT / "hub"), "--prompt", "What do you see and hear?", "--max-tokens", "2"]
    assert main([*args, "--video", str(path), "--video-audio"]) == 0
    assert main([*args, "--audio", str(AUDIO / "two_tones.wav")]) == 0
    capsys.readouterr()


def test_the_published_layout_drops_the_speech_parts_and_stacks_the_experts(loaded) -> None:
    model, _ = loaded
    raw = mx.load(str(ROOT / "hub" / "model.safetensors"))
    assert any(k.startswith("talker.") for k in raw) and any(k.startswith("code2wav.") for k in raw)
    assert "thinker.model.layers.0.mlp.experts.3.gate_proj.weight" in raw
    ours = model.sanitize(raw)
    assert not any(k.startswith(("talker.", "code2wav.", "thinker.")) for k in ours)
    stacked = ours["model.language_model.layers.0.mlp.experts.gate_proj.weight"]
    assert mx.array_equal(stacked[3], raw["thinker.model.layers.0.mlp.experts.3.gate_proj.weight"]).item()
    conv = raw["thinker.audio_tower.conv2d2.weight"]  # PyTorch's (out, in, kh, kw) -> MLX's (out, kh, kw, in)
    assert mx.array_equal(ours["model.audio_tower.conv2d2.weight"], conv.transpose(0, 2, 3, 1)).item()
    published = model.mlx_community_names(ours)
    assert all(k.startswith("thinker.") for k in published)
    back = model.sanitize(published)
    assert set(back) == set(ours) and all(mx.array_equal(back[k], ours[k]).item() for k in ours)


def test_our_converter_writes_a_layout_that_loads_to_the_same_logits(tmp_path: Path, ref: Reference) -> None:
    out = convert(ROOT / "hub", tmp_path / "mlx", ConvertOptions()).destination
    model, _ = load(out)
    for case in ("two_audios", "video_with_audio"):
        logits = np.array(model(**inputs_of(ref, case)).logits)
        assert np.abs(logits - ref.get(case, "logits")).max() <= TOL, case


def test_a_thinker_saved_alone_by_transformers_5_loads(tmp_path: Path, ref: Reference) -> None:
    """transformers 5's own names for a thinker saved alone (``qwen3_omni_moe_thinker``: ``model.*`` /
    ``lm_head``, experts fused as ``gate_up_proj`` (experts, 2 x width, hidden) and ``down_proj``, PyTorch's
    convolution layouts), written here from the published fixture: the same logits."""
    import shutil

    raw = mx.load(str(ROOT / "hub" / "model.safetensors"))
    renames = (("thinker.model.", "model.language_model."), ("thinker.lm_head.", "lm_head."), ("thinker.", "model."))
    hf5, experts = {}, {}
    for key, value in raw.items():
        if key.startswith(("talker.", "code2wav.")):
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        stem, sep, rest = key.partition(".mlp.experts.")
        if sep:
            index, proj, _ = rest.split(".")
            experts.setdefault((stem, proj), {})[int(index)] = value
            continue
        hf5[key] = value
    for (stem, proj), per_expert in experts.items():
        experts[(stem, proj)] = mx.stack([per_expert[i] for i in sorted(per_expert)])
    for stem in {stem for stem, _ in experts}:
        gate_up = mx.concatenate([experts[(stem, "gate_proj")], experts[(stem, "up_proj")]], axis=1)
        hf5[f"{stem}.mlp.experts.gate_up_proj"] = gate_up
        hf5[f"{stem}.mlp.experts.down_proj"] = experts[(stem, "down_proj")]
    folder = tmp_path / "thinker"
    shutil.copytree(ROOT / "hub", folder)
    mx.save_safetensors(str(folder / "model.safetensors"), hf5, metadata={"format": "pt"})
    config = json.loads((ROOT / "hub" / "config.json").read_text())["thinker_config"]
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_omni_moe_thinker"}))
    model, _ = load(folder)
    for case in ("mixed", "video_with_audio"):
        logits = np.array(model(**inputs_of(ref, case)).logits)
        assert np.abs(logits - ref.get(case, "logits")).max() <= TOL, case


def test_clips_of_one_call_are_padded_to_the_longest_chunk(loaded, ref: Reference) -> None:
    """The reference's clip_tails case: a 1.37 s and a 0.5 s sweep, whose short last chunks (37 and 50 frames)
    are convolved padded to the call's longest chunk (1 s), as transformers does: the processor's features and
    the logits match, and alone each clip's features differ (the strided convolutions read that padding)."""
    model, processor = loaded
    meta = ref.meta["cases"]["clip_tails"]
    ours = processor(meta["prompt"], audios=[sweep(int(s * 16000)) for s in meta["sweeps"]])
    np.testing.assert_array_equal(ours["input_ids"], ref.get("clip_tails", "input_ids"))
    np.testing.assert_array_equal(ours["feature_attention_mask"], ref.get("clip_tails", "feature_attention_mask"))
    np.testing.assert_allclose(ours["input_features"], ref.get("clip_tails", "input_features"), atol=TOL, rtol=0)
    inputs = inputs_of(ref, "clip_tails")
    frames = np.asarray(inputs["feature_attention_mask"]).sum(axis=-1).tolist()
    assert frames == [137, 50]
    tower = model.model.audio_tower
    together = tower(inputs["input_features"], frames)
    alone = tower(inputs["input_features"][1:, :, :50], [50])
    assert [f.shape[0] for f in together] == [audio_token_count(137), audio_token_count(50)] == [18, 7]
    assert mx.abs(together[1] - alone[0]).max().item() > 1e-4


def test_the_attention_windows_split_long_clips(loaded) -> None:
    """A 3 s clip's 39 tokens attend in windows of 26 (n_window_infer 200 frames = 2 chunks of 13): the first
    window's outputs do not depend on the frames of the last second."""
    model, _ = loaded
    rng = np.random.default_rng(0)
    features = rng.normal(size=(1, 128, 300)).astype(np.float32)
    changed = features.copy()
    changed[..., 200:] += 1.0
    a = model.model.audio_tower(mx.array(features), [300])[0]
    b = model.model.audio_tower(mx.array(changed), [300])[0]
    assert a.shape[0] == 39
    assert mx.abs(a[:26] - b[:26]).max().item() == 0.0 and mx.abs(a[26:] - b[26:]).max().item() > 1e-3


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 120), st.sampled_from([1.0, 2.0, 0.5]))
def test_the_processor_and_the_model_interleave_alike(patches: int, per_patch: int, n_audio: int, fps: float) -> None:
    """The prompt's token order (the processor's merge) equals the order the position rule walks
    (``interleave_in_time``), and every token appears once."""
    processor = Qwen3OmniMoeVideoProcessor(asked_fps=fps)
    seconds = processor.seconds_per_patch
    written = processor.interleaved_tokens((patches, 2, 2 * per_patch), seconds, n_audio, "V", "A")
    assert written.startswith("<|audio_start|>") and written.endswith("<|audio_end|>")
    text = written[len("<|audio_start|>") : -len("<|audio_end|>")]
    times = np.repeat(np.arange(patches, dtype=np.float32) * np.float32(seconds) * np.float32(13), per_patch)
    video = np.stack([times, times, times])
    audio = np.broadcast_to(np.arange(n_audio, dtype=np.float32), (3, n_audio))
    kinds = []
    for block in interleave_in_time(video, audio):
        kinds += ["V" if np.shares_memory(block, video) else "A"] * block.shape[1]
    walked = "".join(kinds)
    assert text == walked and text.count("V") == patches * per_patch and text.count("A") == n_audio


def test_the_config_defaults_fill_in() -> None:
    parsed = ModelConfig.from_omni({"model_type": "qwen3_omni_moe", "thinker_config": {}})
    assert (parsed.text.hidden_size, parsed.audio.encoder.d_model, parsed.audio.n_window) == (2048, 1280, 50)
    assert (parsed.audio.n_window_infer, parsed.audio.downsample_hidden_size) == (800, 480)
    assert (parsed.audio_token_id, parsed.image_token_id, parsed.video_token_id) == (151646, 151655, 151656)
    assert parsed.text.moe is not None and parsed.text.moe.num_experts == 128 and parsed.mrope_interleaved
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        ModelConfig.from_omni({"thinker_config": {"text_config": {"rope_parameters": {"rope_type": "yarn"}}}})
    with pytest.raises(ConfigError, match="n_window_infer"):
        ModelConfig.from_omni({"thinker_config": {"audio_config": {"n_window": 50, "n_window_infer": 150}}})


def test_the_processor_keeps_transformers_per_frame_bounds() -> None:
    """Qwen3OmniMoeProcessor's own video bounds (128 to 768 merged 32-pixel patches a frame) take the place of the
    video processor config's: transformers 5.25 gives a 2-frame 64x64 clip a (1, 24, 24) grid, and 2 s per patch."""
    _, processor = load(ROOT / "hub")
    saved = json.loads((ROOT / "hub" / "video_preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 64 * 64, "longest_edge": 64 * 96}
    prompt = apply_chat_template(processor, None, "hi", num_videos=1)
    ours = processor(prompt, videos=[Video.from_frames(clip_frames(2, 64, 64, 1), 2.0)])
    assert ours["video_grid_thw"].tolist() == [[1, 24, 24]] and ours["video_second_per_grid"].tolist() == [2.0]


def test_a_config_shaped_like_the_published_one_parses() -> None:
    """Qwen3-Omni-30B-A3B-Instruct's thinker section (rope_scaling with mrope_section and the interleaved flag,
    rope_theta beside it, token ids of the real vocabulary), abridged."""
    thinker = {
        "audio_token_id": 151675,
        "audio_start_token_id": 151669,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "position_id_per_seconds": 13,
        "audio_config": {
            "d_model": 1280,
            "encoder_layers": 32,
            "n_window": 50,
            "n_window_infer": 800,
            "output_dim": 2048,
        },
        "vision_config": {"depth": 27, "hidden_size": 1152, "out_hidden_size": 2048, "patch_size": 16},
        "text_config": {
            "hidden_size": 2048,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "vocab_size": 152064,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
            "shared_expert_intermediate_size": 0,
            "rope_theta": 1000000,
            "rope_scaling": {
                "interleaved": True,
                "mrope_interleaved": True,
                "mrope_section": [24, 20, 20],
                "rope_type": "default",
                "type": "default",
            },
            "use_sliding_window": False,
            "sliding_window": None,
        },
    }
    parsed = ModelConfig.from_omni({"model_type": "qwen3_omni_moe", "thinker_config": thinker})
    assert parsed.mrope_section == (24, 20, 20) and parsed.mrope_interleaved and parsed.rope_theta == 1e6
    assert (parsed.audio_token_id, parsed.audio_start_token_id, parsed.position_id_per_seconds) == (151675, 151669, 13)
    assert parsed.text.attention_head_dim == 128 and parsed.text.moe.shared_expert_intermediate_size == 0
    assert (parsed.vision.out_hidden_size, parsed.audio.output_dim) == (2048, 2048)


def test_bad_input_gets_one_clear_line(loaded, ref: Reference) -> None:
    model, processor = loaded
    prompt = apply_chat_template(processor, None, "What is it?", num_videos=1)
    frames = Video.from_frames(clip_frames(4, 64, 64, 1), 2.0)
    with pytest.raises(ValueError, match="without its sound track"):
        processor(prompt, videos=[frames], video_sampling=VideoSampling(with_audio=True))
    # A frame rate whose patch lands between positions (2 / 3 s x 13): refused, not rounded.
    odd = dataclasses.replace(processor.video_processor, asked_fps=3.0)
    inputs = {k: mx.array(v) for k, v in ref.inputs("video").items()}
    inputs["video_second_per_grid"] = mx.array([odd.seconds_per_patch], dtype=mx.float32)
    with pytest.raises(ValueError, match="fractional"):
        model.embed_prompt(**inputs)
    cut = {k: mx.array(v) for k, v in ref.inputs("two_audios").items()}
    ids = ref.get("two_audios", "input_ids")[0]
    keep = np.ones(len(ids), bool)
    keep[np.nonzero(ids == model.config.audio_token_id)[0][:3]] = False  # three audio slots cut
    cut["input_ids"] = mx.array(ids[keep][None])
    cut["attention_mask"] = mx.ones(cut["input_ids"].shape, dtype=mx.int32)
    with pytest.raises(ValueError, match="audio tokens"):
        model.embed_prompt(**cut)
