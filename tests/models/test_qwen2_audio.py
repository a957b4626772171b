"""Qwen2-Audio beyond the shared parity tests (tests/fixtures/make_fixtures_qwen2_audio.py): the Whisper feature
extractor against transformers on several lengths (cut and padded) and both mel sizes, the chat template, the
ways in (generate, batch_generate, the CLI), the feature cache across turns, the MLX-community layout our
converter writes, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from vlm_models import apply_chat_template, load
from vlm_models.cli import main
from vlm_models.convert import ConvertOptions, convert
from vlm_models.processors.mel import WhisperFeatureExtractor, mel_filter_bank
from vlm_models.processors.qwen2_audio import audio_token_count
from vlm_runtime import PromptCache, VisionFeatureCache, batch_generate, generate, stream_generate

from .conftest import AUDIO, FIXTURES, Reference, inputs_of

ROOT = FIXTURES / "qwen2_audio"
TOL = 1e-4


def sweep(n: int) -> np.ndarray:
    """The fixture script's test signal (make_fixtures_qwen2_audio.sweep), rebuilt here."""
    t = np.arange(n, dtype=np.float64) / 16000
    return (0.4 * np.sin(2 * np.pi * (220 * t + 600 * t * t)) * (0.6 + 0.4 * np.cos(2 * np.pi * 3 * t))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hf4")


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("qwen2_audio")


def test_whisper_features_match_transformers() -> None:
    """Clips of a quarter, most and twice the window (cut), 80 bins with a 2 s window; 128 bins with Whisper's
    30 s window: features within 1e-4 (float32 STFT there, float64 here), masks identical."""
    expected = np.load(ROOT / "audio_features_reference.npz")
    short = WhisperFeatureExtractor(feature_size=80, chunk_length=2)([sweep(n) for n in (4000, 17000, 41000)])
    np.testing.assert_allclose(short["input_features"], expected["bins80_chunk2/input_features"], atol=TOL, rtol=0)
    np.testing.assert_array_equal(short["attention_mask"], expected["bins80_chunk2/attention_mask"])
    assert short["attention_mask"].sum(axis=1).tolist() == [25, 107, 200]  # the last one cut at the window
    full = WhisperFeatureExtractor(feature_size=128)([sweep(16000)])
    assert full["input_features"].shape == (1, 128, 3000)
    want = expected["bins128_chunk30/input_features"]
    np.testing.assert_allclose(full["input_features"][..., : want.shape[-1]], want, atol=TOL, rtol=0)
    np.testing.assert_array_equal(full["attention_mask"], expected["bins128_chunk30/attention_mask"])


def test_slaney_filters_have_unit_area_and_follow_the_scale() -> None:
    filters = mel_filter_bank(201, 80, 0.0, 8000.0, 16000, "slaney", slaney_norm=True)
    widths_hz = 8000.0 / 200
    # Each triangle (height 2 / width) covers an area of 1 in Hz, up to the bin spacing.
    np.testing.assert_allclose(filters.sum(axis=0) * widths_hz, 1.0, atol=0.08)
    # Below 1 kHz the scale is linear: the first centres are evenly spaced.
    peaks = filters.argmax(axis=0)
    assert len(set(np.diff(peaks[:10]).tolist())) <= 2


def test_the_chat_template_and_token_counts_are_the_processors(loaded, ref: Reference) -> None:
    _, processor = loaded
    meta = ref.meta["cases"]["two_audios"]
    messages = [
        {
            "role": "user",
            "content": [{"type": "audio"}, {"type": "audio"}, {"type": "text", "text": "Compare the two sounds."}],
        }
    ]
    assert apply_chat_template(processor, None, messages) == meta["prompt"]
    frames = ref.get("two_audios", "feature_attention_mask").sum(axis=1)
    tokens = (ref.get("two_audios", "input_ids") == loaded[0].config.audio_token_id).sum()
    assert tokens == sum(audio_token_count(int(n)) for n in frames)


def test_generate_and_stream_hear_files(loaded, ref: Reference) -> None:
    model, processor = loaded
    meta = ref.meta["cases"]["two_audios"]
    clips = [AUDIO / name for name in meta["audios"]]
    greedy = ref.get("two_audios", "greedy")[0].tolist()
    events = stream_generate(model, processor, meta["prompt"], audios=clips, max_tokens=len(greedy), ignore_eos=True)
    assert [e.token for e in events] == greedy
    result = generate(model, processor, meta["prompt"], audio=clips, max_tokens=4, ignore_eos=True)
    assert result.prompt_tokens == ref.get("two_audios", "input_ids").shape[1]


def test_batch_generate_takes_audios_per_prompt(loaded) -> None:
    model, processor = loaded
    prompts = [
        apply_chat_template(processor, None, "What is it?", num_audios=1),
        apply_chat_template(processor, None, "Text only, and a little longer than that.", num_audios=0),
        apply_chat_template(processor, None, "And these?", num_audios=2),
    ]
    audios = [[AUDIO / "two_tones.wav"], None, [AUDIO / "noise_burst.flac", AUDIO / "tone_chirp.wav"]]
    batched = batch_generate(model, processor, prompts, audios=audios, max_tokens=8, ignore_eos=True)
    for prompt, clips, result in zip(prompts, audios, batched):
        alone = generate(model, processor, prompt, audio=clips, max_tokens=8, ignore_eos=True)
        assert result.text == alone.text and result.generation_tokens == 8
    with pytest.raises(ValueError, match="3 prompts but 2 audio entries"):
        batch_generate(model, processor, prompts, audios=audios[:2], max_tokens=2)


def test_the_feature_cache_keeps_clips_across_turns(loaded, monkeypatch) -> None:
    """A second turn with the same clip skips the audio tower and gives what a fresh run gives."""
    model, processor = loaded
    calls = []
    tower = model.model.audio_tower

    class CountingTower(type(tower)):  # type: ignore[misc]
        def __call__(self, input_features, frames):
            calls.append(int(input_features.shape[0]))
            return super().__call__(input_features, frames)

    monkeypatch.setattr(tower, "__class__", CountingTower)
    clip = [AUDIO / "tone_chirp.wav"]
    cache, prompts = VisionFeatureCache(4), PromptCache()
    turn1 = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is it?"}]}]
    first = generate(
        model, processor, apply_chat_template(processor, None, turn1), audio=clip, max_tokens=4, vision_cache=cache
    )
    turn2 = turn1 + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "And again?"}]},
    ]
    prompt2 = apply_chat_template(processor, None, turn2)
    second = generate(model, processor, prompt2, audio=clip * 2, max_tokens=6, vision_cache=cache, ignore_eos=True)
    # Turn 2 holds the clip twice: one lookup, a hit; the tower ran only in turn 1.
    assert calls == [1] and (cache.hits, cache.misses) == (1, 1)
    monkeypatch.undo()
    fresh = generate(model, processor, prompt2, audio=clip * 2, max_tokens=6, ignore_eos=True)
    assert second.text == fresh.text
    # And the prompt cache reuses the first turn's tokens for a prompt holding the same clip.
    generate(model, processor, prompt2, audio=clip * 2, max_tokens=2, prompt_cache=prompts)
    again = generate(model, processor, prompt2, audio=clip * 2, max_tokens=6, prompt_cache=prompts, ignore_eos=True)
    assert again.cached_tokens > 0 and again.text == fresh.text


def test_our_mlx_community_layout_loads_to_the_same_logits(tmp_path: Path, ref: Reference) -> None:
    """mlx-vlm 0.7.10 has no qwen2_audio to convert with; our converter writes the layout (published names, MLX
    convolution weights) and it loads back to the reference's logits."""
    out = convert(ROOT / "hf5", tmp_path / "mlx", ConvertOptions()).destination
    names = set(mx.load(str(out / "model.safetensors")))
    assert "audio_tower.conv1.weight" in names and "language_model.model.embed_tokens.weight" in names
    model, _ = load(out)
    for case in ("one_audio", "two_audios"):
        logits = np.array(model(**inputs_of(ref, case)).logits)
        assert np.abs(logits - ref.get(case, "logits")).max() <= TOL


def test_bad_input_gets_one_clear_line(loaded, tmp_path: Path, capsys) -> None:
    _, processor = loaded
    prompt = apply_chat_template(processor, None, "What is it?", num_audios=1)
    with pytest.raises(ValueError, match=r"1 audio slot\(s\) .* but 2 audio clip\(s\)"):
        processor(prompt, audios=[AUDIO / "two_tones.wav"] * 2)
    with pytest.raises(ValueError, match="does not take image input"):
        processor("<|image_pad|>", [FIXTURES / "images" / "rgb_56x56.png"])
    with pytest.raises(ValueError, match="does not take video input"):
        processor("<|video_pad|>", videos=[FIXTURES / "videos" / "clip_80x56.mov"])
    args = ["generate", "--model", str(ROOT / "hf4"), "--prompt", "What is it?", "--max-tokens", "2"]
    assert main([*args, "--audio", str(AUDIO / "two_tones.wav")]) == 0
    assert "prompt:" in capsys.readouterr().err
    notes = tmp_path / "notes.wav"
    notes.write_text("not audio at all")
    for bad, says in [
        ([*args, "--audio", str(tmp_path / "missing.wav")], "audio file not found"),
        ([*args, "--audio", str(notes)], "cannot decode audio"),
        ([*args, "--image", str(FIXTURES / "images" / "rgb_56x56.png")], "does not take image input"),
    ]:
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    llava = ["generate", "--model", str(FIXTURES / "llava" / "hf4"), "--prompt", "Hi", "--max-tokens", "2"]
    assert main([*llava, "--audio", str(AUDIO / "two_tones.wav")]) == 2
    assert "does not take audio input" in capsys.readouterr().err


def test_the_published_config_spelling_reads_defaults(tmp_path: Path) -> None:
    """Hub configs leave out what equals Qwen2Config's and the encoder's defaults: they fill in."""
    from vlm_models.models.qwen2_audio import ModelConfig

    config = json.loads((ROOT / "hf4" / "config.json").read_text())
    parsed = ModelConfig.from_hf({"model_type": "qwen2_audio", "text_config": {}, "audio_config": {}})
    assert (parsed.text.hidden_size, parsed.audio.d_model, parsed.audio.max_source_positions) == (4096, 1280, 1500)
    assert parsed.audio_token_id == 151646
    ours = ModelConfig.from_hf(config)
    assert ours.audio.max_source_positions == 100 and ours.audio_token_id == config["audio_token_index"]
