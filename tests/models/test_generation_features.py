"""The runtime's generation features on real architectures (tiny fixtures): batching with images, the prompt
cache across turns with an image, and every cache type in a cached decode."""

from __future__ import annotations

import warnings

import pytest
import soundfile
from PIL import Image

from vlm_models import load
from vlm_models.audio import Audio
from vlm_runtime import PromptCache, RotatingKVCache, batch_generate, generate, stream_generate

from .conftest import FAMILIES, FIXTURES, media_options, media_prompt, published, sees

IMAGES = FIXTURES / "images"


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return load(published(request.param))


def skip_sliding_window_models(model, feature: str) -> None:
    if any(isinstance(c, RotatingKVCache) for c in model.make_cache()):
        pytest.skip(f"{feature} needs plain KV caches; this model's sliding-window layers keep a rolling window")


def chat(processor, text, n_images: int) -> str:
    """A prompt with image slots (audio slots for a family that only hears: see conftest.media_options)."""
    return media_prompt(processor, text, n_images)


def batch_media(processor, images: list) -> dict:
    """batch_generate's images= entries, or audios= for a family that only hears."""
    entries = [media_options(processor, i) for i in images]
    if sees(processor):
        return {"images": [e["image"] for e in entries]}
    return {"audios": [e.get("audio") for e in entries]}


def test_batch_with_images_equals_single_generate(loaded, monkeypatch) -> None:
    model, processor = loaded
    prefill_batches = []
    hidden_states = model.hidden_states

    def recording(inputs_embeds, **kwargs):
        if inputs_embeds.shape[1] > 1:
            prefill_batches.append(inputs_embeds.shape[0])
        return hidden_states(inputs_embeds, **kwargs)

    monkeypatch.setattr(model, "hidden_states", recording)
    prompts = [
        (chat(processor, "Describe.", 1), [IMAGES / "rgb_112x168.png"]),
        (chat(processor, "Just text, and somewhat longer than the others.", 0), None),
        (chat(processor, "Compare the two.", 2), [IMAGES / "rgb_56x56.png", IMAGES / "rgb_200x100.png"]),
    ]
    batched = batch_generate(
        model,
        processor,
        [p for p, _ in prompts],
        **batch_media(processor, [i for _, i in prompts]),
        max_tokens=8,
        ignore_eos=True,
    )
    both_ways = any(
        model.embed_prompt(**processor.prepare_inputs(p, i or [])).attention_groups is not None
        for p, i in prompts
        if sees(processor)
    )
    if both_ways:
        # Image tokens (Gemma 3, Gemma 4's large models) or the whole prefix (PaliGemma) attend both ways: each
        # prompt goes alone.
        assert prefill_batches == [1, 1, 1]
    else:
        assert prefill_batches == [3]  # the three prompts are prefilled together, left-padded
    monkeypatch.undo()
    for (prompt, images), result in zip(prompts, batched):
        single = generate(model, processor, prompt, **media_options(processor, images), max_tokens=8, ignore_eos=True)
        assert result.text == single.text
        assert result.generation_tokens == single.generation_tokens == 8


@pytest.mark.parametrize(
    "options",
    [{"max_kv_size": 24}, {"kv_bits": 8, "kv_group_size": 32}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}],
    ids=["window", "q8", "turboquant"],
)
def test_batch_with_cache_settings_equals_single_generate(loaded, options) -> None:
    """A sliding window shorter than the prompts, or quantized keys/values: each row as generated alone."""
    model, processor = loaded
    prompts = [
        (chat(processor, "Describe this picture in a few words.", 1), [IMAGES / "rgb_200x100.png"]),
        (chat(processor, "Text only.", 0), None),
    ]
    if "kv_quant_scheme" in options and getattr(model.config.text, "attn_logit_softcapping", None):
        # TurboQuant also quantizes this fixture's 16-wide heads (affine groups cannot): one clear error.
        with warnings.catch_warnings(), pytest.raises(ValueError, match="soft-capped attention"):
            warnings.simplefilter("ignore")  # the sliding-window layers keep their cache, as they say
            generate(model, processor, prompts[1][0], max_tokens=2, **options)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers that keep their own cache say so once
        batched = batch_generate(
            model,
            processor,
            [p for p, _ in prompts],
            **batch_media(processor, [i for _, i in prompts]),
            max_tokens=6,
            ignore_eos=True,
            **options,
        )
        for (prompt, images), result in zip(prompts, batched):
            media = media_options(processor, images)
            single = generate(model, processor, prompt, **media, max_tokens=6, ignore_eos=True, **options)
            assert result.text == single.text


def test_second_turn_with_the_same_image_reuses_the_cache(loaded, tmp_path) -> None:
    """(The same clip, for a family that only hears.)"""
    model, processor = loaded
    skip_sliding_window_models(model, "reusing a cached prompt prefix")
    image = [IMAGES / "rgb_112x168.png"]
    media, part = media_options(processor, image), "image" if sees(processor) else "audio"
    cache = PromptCache()
    turn1 = [{"role": "user", "content": [{"type": part}, {"type": "text", "text": "What is this?"}]}]
    first = generate(model, processor, chat(processor, turn1, 1), **media, max_tokens=5, prompt_cache=cache)
    turn2 = turn1 + [
        {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]},
    ]
    prompt2 = chat(processor, turn2, 1)
    second = generate(model, processor, prompt2, **media, max_tokens=6, prompt_cache=cache, ignore_eos=True)
    fresh = generate(model, processor, prompt2, **media, max_tokens=6, ignore_eos=True)
    assert second.cached_tokens > first.prompt_tokens // 2
    assert second.text == fresh.text
    # Different media of the same size give the same token ids: the cached prefix must not be reused.
    if sees(processor):
        flipped = tmp_path / "flipped.png"
        Image.open(image[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
        other = {"image": [flipped]}
    else:
        clip, rate = soundfile.read(media["audio"][0], dtype="float32")
        other = {"audio": [Audio(clip[::-1].copy(), rate)]}  # the clip backwards: same length, other sound
    swapped = generate(model, processor, prompt2, **other, max_tokens=6, prompt_cache=cache, ignore_eos=True)
    assert swapped.prompt_tokens == second.prompt_tokens and swapped.cached_tokens == 0
    assert swapped.text == generate(model, processor, prompt2, **other, max_tokens=6, ignore_eos=True).text


@pytest.mark.parametrize(
    "options",
    [{"max_kv_size": 4096}, {"max_kv_size": 2048, "prefill_step_size": 7}],
    ids=["rotating-wide", "rotating-chunked"],
)
def test_cache_types_give_the_same_greedy_tokens(loaded, options: dict) -> None:
    """A window wider than the sequence changes nothing, however the prompt is chunked."""
    model, processor = loaded
    prompt = chat(processor, "Describe.", 1)
    media = media_options(processor, [IMAGES / "rgb_112x168.png"])
    plain = generate(model, processor, prompt, **media, max_tokens=10, ignore_eos=True)
    other = generate(model, processor, prompt, **media, max_tokens=10, ignore_eos=True, **options)
    assert other.text == plain.text


def test_kv_bits_on_a_head_dim_too_small_warns_and_keeps_float(loaded) -> None:
    """The fixtures' head dim (16) is below the smallest quantization group: said once, never silently."""
    model, processor = loaded
    prompt = chat(processor, "Hi.", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = generate(model, processor, prompt, max_tokens=5, ignore_eos=True, kv_bits=8, kv_group_size=32)
    if not any("not a multiple of group size" in str(w.message) for w in caught):
        pytest.skip("this model's head dims split into groups of 32 (Gemma 4's global layers): its own test")
    assert quantized.text == generate(model, processor, prompt, max_tokens=5, ignore_eos=True).text


def test_the_compiled_decode_step_gives_the_plain_tokens(loaded) -> None:
    """Every family's cache layout (sliding windows, shared KV, recurrent state) through the compiled step: the
    same greedy tokens, and logits within float rounding, as the step built anew each token."""
    model, processor = loaded
    prompt = chat(processor, "Describe.", 1)
    media = media_options(processor, [IMAGES / "rgb_112x168.png"])
    runs = {}
    for compiled in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a layout the step cannot trace would warn and fall back
            results = list(
                stream_generate(
                    model, processor, prompt, **media, max_tokens=24, ignore_eos=True, compile_decode=compiled
                )
            )
        runs[compiled] = [r.token for r in results]
    assert runs[True] == runs[False]
