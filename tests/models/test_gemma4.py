"""Gemma 4 beyond the shared parity tests: the image processor and the audio feature extractor against
transformers, audio reading, KV sharing, sliding windows across chunked prefill, quantized KV caches on shared
layers, expert routing, images attending both ways, both config spellings, the chat template's switches, audio
through generate and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from vlm_models import apply_chat_template, load
from vlm_models.audio import Audio, AudioLoadError, load_audio
from vlm_models.processors.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessor
from vlm_runtime import CacheSettings, generate, stream_generate
from vlm_runtime.cache_settings import make_layer_caches
from vlm_runtime.generate import prefill

from .conftest import FIXTURES, Reference, check_chunked_prefill, inputs_of

ROOT = FIXTURES / "gemma4"
AUDIO = FIXTURES / "audio"


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("gemma4")


@pytest.fixture(scope="module")
def moe_ref() -> Reference:
    return Reference("gemma4_moe")


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hub")


@pytest.fixture(scope="module")
def moe():
    return load(FIXTURES / "gemma4_moe" / "hub")


# -------------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("tokens", [70, 140])
def test_image_processor_matches_transformers(tokens: int) -> None:
    expected = np.load(ROOT / "image_processor_reference.npz")
    processor = Gemma4ImageProcessor(patch_size=4, pooling_kernel_size=3, max_soft_tokens=tokens)
    names = sorted({k.split("/")[1] for k in expected.files if k.startswith(f"{tokens}/")})
    assert len(names) == 7
    for name in names:
        with Image.open(FIXTURES / "images" / name) as image:
            ours = processor([image])
        positions = expected[f"{tokens}/{name}/image_position_ids"]
        np.testing.assert_array_equal(ours["image_position_ids"], positions, err_msg=name)
        real = expected[f"{tokens}/{name}/pixel_values"]
        assert ours["pixel_values"].shape[1] == tokens * 9
        np.testing.assert_array_equal(ours["pixel_values"][:, : real.shape[1]], real, err_msg=name)
        assert not ours["pixel_values"][:, real.shape[1] :].any()


def test_image_processor_rejects_an_unsupported_budget() -> None:
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        Gemma4ImageProcessor.from_config({"max_soft_tokens": 100})


def test_feature_extractor_matches_transformers() -> None:
    """Several lengths one by one (under one window, odd sizes, seconds), the fixture clips, and a padded batch of
    three: features within 1e-4, masks equal."""
    expected = np.load(ROOT / "audio_features_reference.npz")
    extractor = Gemma4AudioFeatureExtractor()
    names = sorted({k.split("/")[0] for k in expected.files if k != "batch"} - {"batch"})
    assert len(names) >= 8
    for name in names:
        ours = extractor([expected[f"{name}/waveform"]])
        np.testing.assert_array_equal(ours["input_features_mask"], expected[f"{name}/input_features_mask"], name)
        np.testing.assert_allclose(ours["input_features"], expected[f"{name}/input_features"], atol=1e-4, rtol=0)
    batch = [expected[f"len_{n}/waveform"] for n in (16_127, 1600, 33_333)]
    ours = extractor(batch)
    mask = expected["batch/input_features_mask"]
    assert not mask.all(), "the batch is padded"
    np.testing.assert_array_equal(ours["input_features_mask"], mask)
    np.testing.assert_allclose(ours["input_features"], expected["batch/input_features"], atol=1e-4, rtol=0)


def test_feature_extractor_settings_from_the_checkpoint(loaded) -> None:
    _, processor = loaded
    extractor = processor.audio_processor
    assert (extractor.sampling_rate, extractor.feature_size, extractor.hop_length) == (16_000, 128, 160)
    with pytest.raises(ValueError, match="dither"):
        Gemma4AudioFeatureExtractor.from_config({"dither": 0.1})


# ---------------------------------------------------------------------------------------------- audio reading


def test_audio_files_read_as_written() -> None:
    for name in ("tone_chirp.wav", "two_tones.wav", "noise_burst.flac"):
        samples, rate = soundfile.read(AUDIO / name, dtype="float32")
        np.testing.assert_array_equal(load_audio(AUDIO / name, rate), samples)


def test_stereo_at_another_rate_becomes_mono_at_the_models(tmp_path: Path) -> None:
    """A 44.1 kHz stereo OGG (left a 440 Hz tone, right a 1 kHz one): mixed down to their mean and resampled to
    16 kHz, both tones survive at their frequencies and the duration is kept."""
    rate, seconds = 44_100, 0.5
    t = np.arange(int(rate * seconds)) / rate
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 1000 * t)], axis=1)
    path = tmp_path / "stereo.ogg"
    soundfile.write(path, stereo.astype(np.float32), rate)
    mono = load_audio(path, 16_000)
    assert mono.dtype == np.float32 and mono.ndim == 1
    assert abs(len(mono) - 16_000 * seconds) <= 2
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    freqs = np.fft.rfftfreq(len(mono), 1 / 16_000)
    peaks = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert abs(peaks[0] - 440) < 5 and abs(peaks[1] - 1000) < 5
    # The mixdown is the channels' mean (checked at the file's own rate, where nothing is resampled).
    read, _ = soundfile.read(path, dtype="float32")
    np.testing.assert_allclose(load_audio(path, rate), read.mean(axis=1), atol=1e-7)


def test_formats_soundfile_lacks_go_through_pyav(tmp_path: Path) -> None:
    import av

    path = tmp_path / "clip.m4a"
    rate = 16_000
    tone = (0.4 * np.sin(2 * np.pi * 300 * np.arange(rate) / rate)).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    samples = load_audio(path, rate)
    assert abs(len(samples) - rate) < 2048  # the codec's priming and padding
    assert np.abs(samples).max() > 0.3


def test_bad_audio_gives_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AudioLoadError, match="audio file not found"):
        load_audio(tmp_path / "missing.wav", 16_000)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("these are not samples")
    with pytest.raises(AudioLoadError, match=r"cannot decode audio .*notes\.wav"):
        load_audio(not_audio, 16_000)
    with pytest.raises(AudioLoadError, match="holds no samples"):
        load_audio(np.zeros(0, np.float32), 16_000)
    with pytest.raises(AudioLoadError, match=r"directory|not a file"):
        load_audio(tmp_path, 16_000)
    assert len(load_audio(Audio(np.zeros((800, 2), np.float32), 8_000), 16_000)) == 1600


# ------------------------------------------------------------------------------------------------------ model


def test_kv_shared_layers_have_no_keys_and_no_cache(loaded) -> None:
    model, _ = loaded
    layers = model.model.language_model.layers
    assert [("k_proj" in layer.self_attn) for layer in layers] == [True, True, True, False, False]
    assert len(model.make_cache()) == 3
    assert layers[3].mlp.gate_proj.weight.shape[0] == 2 * layers[0].mlp.gate_proj.weight.shape[0]  # double-wide


@pytest.mark.parametrize("step", [8, 30])
def test_chunked_prefill_across_the_sliding_window(loaded, ref: Reference, step: int) -> None:
    """Chunks shorter and longer than the 24-token window, over prompts of 107 and 148 tokens (image and audio
    tokens included): the last logits and the greedy tokens are the reference's."""
    model, _ = loaded
    for case in ("long", "image_and_audio"):
        check_chunked_prefill(model, ref, case, step)


def test_quantized_kv_cache_serves_the_shared_layers(loaded, ref: Reference) -> None:
    """kv_bits=8: the KV-shared global layer attends over the quantized keys of its source layer (sliding windows
    keep their own cache); the last logits stay close to the float ones."""
    model, _ = loaded
    inputs = inputs_of(ref, "long")
    expected = ref.get("long", "logits")[0, -1]
    with pytest.warns(UserWarning, match="not applied to 2 of 3 cache layers"):  # the sliding windows stay
        cache = make_layer_caches(model, CacheSettings(kv_bits=8, kv_group_size=32))
    assert type(cache[2]).__name__ == "QuantizedKVCache"  # the global layer's, which layer 4 reads too
    last = prefill(model, model.embed_prompt(**inputs), cache, 2048)
    diff = np.abs(np.array(last[0]) - expected).max()
    assert 0 < diff < 0.1


def test_experts_route_as_transformers(moe, moe_ref: Reference) -> None:
    model, _ = moe
    for case in ("text", "one_image"):
        prompt = model.embed_prompt(**inputs_of(moe_ref, case))
        decoder = model.model.language_model
        picked = {}
        original = type(decoder.layers[0].router).__call__

        def spy(self, x, _original=original, picked=picked):
            chosen, weights = _original(self, x)
            picked[id(self)] = np.sort(np.array(chosen)[0], axis=-1)
            return chosen, weights

        type(decoder.layers[0].router).__call__ = spy
        try:
            model.hidden_states(prompt.inputs_embeds, attention_groups=prompt.attention_groups)
        finally:
            type(decoder.layers[0].router).__call__ = original
        for i, layer in enumerate(decoder.layers):
            expected = np.sort(moe_ref.get(case, f"experts/{i}"), axis=-1)
            np.testing.assert_array_equal(picked[id(layer.router)], expected, err_msg=f"{case} layer {i}")


def test_images_attend_both_ways_in_sliding_layers_only(moe, moe_ref: Reference, loaded) -> None:
    model, _ = moe
    prompt = model.embed_prompt(**inputs_of(moe_ref, "two_images"))
    groups = np.array(prompt.attention_groups)[0]
    assert sorted(set(groups.tolist())) == [-1, 0, 1]
    causal = np.array(model.compute_logits(model.hidden_states(prompt.inputs_embeds)))
    assert np.abs(causal - moe_ref.get("two_images", "logits")).max() > 1e-2
    e_model, _ = loaded  # E2B / E4B: plain causal attention, prompts batch freely
    assert e_model.embed_prompt(**inputs_of(Reference("gemma4"), "one_image")).attention_groups is None


def test_both_config_spellings_read_alike() -> None:
    for family in ("gemma4", "gemma4_moe"):
        hub, _ = load(FIXTURES / family / "hub")
        hf5, _ = load(FIXTURES / family / "hf5")
        assert hub.config == hf5.config
    text = hub.config.text
    assert text.head_dims == (8, 16, 8, 16) and text.kv_heads == (2, 1, 2, 1) and text.attention_k_eq_v
    assert "v_proj" not in hub.model.language_model.layers[1].self_attn


def test_media_features_and_slots_must_agree(loaded, ref: Reference) -> None:
    model, _ = loaded
    inputs = inputs_of(ref, "audio")
    inputs["input_ids"] = inputs["input_ids"][:, :-30]
    with pytest.raises(ValueError, match="audio tokens but the audios give"):
        model(**inputs)


# ---------------------------------------------------------------------------------------- template, generation


def test_chat_template_switches(loaded, ref: Reference) -> None:
    _, processor = loaded
    meta = ref.meta["cases"]["image_and_audio"]
    prompt = apply_chat_template(processor, None, meta["text"], num_images=1, num_audios=2)
    assert prompt == meta["prompt"]
    thinking = apply_chat_template(processor, None, "Hi", enable_thinking=True)
    assert thinking.startswith("<bos><|turn>system\n<|think|><turn|>\n") and thinking.endswith("<|turn>model\n")
    assert "<|think|>" not in apply_chat_template(processor, None, "Hi")


def test_generate_hears_audio_files(loaded, ref: Reference) -> None:
    model, processor = loaded
    meta = ref.meta["cases"]["image_and_audio"]
    images = [FIXTURES / "images" / n for n in meta["images"]]
    audios = [AUDIO / n for n in meta["audios"]]
    expected = ref.get("image_and_audio", "greedy")[0, :6].tolist()
    assert not processor.eos_token_ids.intersection(expected)
    result = generate(model, processor, meta["prompt"], image=images, audios=audios, max_tokens=6)
    assert (result.generation_tokens, result.text) == (6, processor.decode(expected))
    tokens = [r.token for r in _stream(model, processor, meta["prompt"], images, audios)]
    assert tokens == expected


def test_clips_heard_before_come_from_the_feature_cache(loaded, ref: Reference) -> None:
    """Two clips batched (padded to the longer), then one of them alone (padded to itself): its entry is found,
    the embeddings equal an uncached run's, and the tower runs only over clips it has not heard."""
    from vlm_runtime import VisionFeatureCache

    model, processor = loaded
    meta = ref.meta["cases"]["image_and_audio"]
    images = [FIXTURES / "images" / n for n in meta["images"]]
    audios = [AUDIO / n for n in meta["audios"]]
    cache = VisionFeatureCache(8)
    both = processor.prepare_inputs(meta["prompt"], images, audios=audios)
    np.testing.assert_array_equal(
        np.array(model.embed_prompt(**both, vision_cache=cache).inputs_embeds),
        np.array(model.embed_prompt(**both).inputs_embeds),
    )
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 3)  # the image and two clips
    prompt = apply_chat_template(processor, None, "Again?", num_audios=1)
    alone = processor.prepare_inputs(prompt, audios=audios[:1])  # the shorter clip
    assert alone["input_features"].shape[1] != both["input_features"].shape[1]  # padded differently
    cached = np.array(model.embed_prompt(**alone, vision_cache=cache).inputs_embeds)
    assert cache.hits == 1
    np.testing.assert_allclose(cached, np.array(model.embed_prompt(**alone).inputs_embeds), atol=1e-5, rtol=0)


def _stream(model, processor, prompt, images, audios):
    from vlm_runtime import stream_generate

    return list(stream_generate(model, processor, prompt, image=images, audio=audios, max_tokens=6))


def test_models_without_audio_say_so(moe) -> None:
    _, processor = moe
    with pytest.raises(ValueError, match="does not take audio"):
        processor("<|audio|>", audios=[AUDIO / "two_tones.wav"])


def test_cli_takes_audio(tmp_path: Path, ref: Reference) -> None:
    meta = ref.meta["cases"]["audio"]
    command = [sys.executable, "-m", "vlm_models.cli", "generate", "--model", str(ROOT / "hub")]
    command += ["--audio", str(AUDIO / meta["audios"][0]), "--prompt", meta["text"], "--max-tokens", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run(
        [*command[:6], "--audio", str(tmp_path / "nope.wav"), "--prompt", "x"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "audio file not found" in missing.stderr


def test_a_config_problem_is_named(tmp_path: Path) -> None:
    from vlm_models import ModelLoadError

    path = Path(shutil.copytree(ROOT / "hub", tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["rope_parameters"]["full_attention"]["rope_type"] = "yarn"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported rope_type 'yarn'"):
        load(path)


def test_thinking_uses_gemma4s_channel_markers(loaded) -> None:
    """Gemma 4 writes its reasoning as ``<|channel>thought ... <channel|>``: a prompt left inside such a block
    counts as thinking, and a budget closes it with Gemma 4's end marker, not ``</think>``."""
    model, processor = loaded
    assert processor.thinking_markers == ("<|channel>", "<channel|>")
    (end,) = processor.encode("<channel|>")
    prompt = apply_chat_template(processor, None, "Why?") + "<|channel>thought\n"
    tokens = [
        r.token for r in stream_generate(model, processor, prompt, max_tokens=8, ignore_eos=True, thinking_budget=3)
    ]
    assert tokens.index(end) == 4  # three tokens of reasoning, then "\n" and the end marker
    result = generate(model, processor, prompt, max_tokens=8, ignore_eos=True, thinking_budget=3)
    assert result.reasoning and "<channel|>" not in result.text
