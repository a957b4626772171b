"""The prefix cache on real architectures: with images, a warm request equals a cold one; another image under
the same prompt reuses only the text before the image; the families whose caches cannot be cut are skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from vlm_models import load
from vlm_runtime import CacheSettings, stream_generate
from vlm_runtime.prefill import drop_prefix, prefill
from vlm_runtime.prefix_cache import PrefixCache, PrefixCacheSettings

from .conftest import FAMILIES, FIXTURES, media_options, media_prompt, published

IMAGES = FIXTURES / "images"
FIRST, SECOND = IMAGES / "rgb_112x168.png", IMAGES / "rgb_333x250.png"
SAME_SIZE = IMAGES / "rgb_200x100.png"


@pytest.fixture(scope="module")
def qwen() -> tuple[Any, Any]:
    return load(FIXTURES / "qwen2_vl" / "hf4")


def generate_tokens(loaded, images: list[Path], cache: PrefixCache | None, text: str = "Describe.", **options):
    model, processor = loaded
    prompt = media_prompt(processor, text, len(images))
    events = list(
        stream_generate(
            model, processor, prompt, prefix_cache=cache, max_tokens=6, ignore_eos=True,
            **media_options(processor, images), **options,
        )
    )  # fmt: skip
    return [e.token for e in events], events[-1].cached_tokens


def last_logits(loaded, images: list[Path], cache: PrefixCache | None) -> tuple[mx.array, int]:
    model, processor = loaded
    inputs = processor.prepare_inputs(media_prompt(processor, "Describe.", len(images)), images)
    embedded = model.embed_prompt(**inputs)
    if cache is None:
        return prefill(model, embedded, model.make_cache(), 2048), 0
    match = cache.lookup(model, CacheSettings(), inputs["input_ids"][0].tolist(), inputs, embedded)
    logits = prefill(model, drop_prefix(embedded, match.cached_tokens), match.layers, 2048)
    cache.store(match, match.layers)
    cache.release(match)
    return logits, match.cached_tokens


def first_image_position(loaded, images: list[Path]) -> int:
    processor = loaded[1]
    inputs = processor.prepare_inputs(media_prompt(processor, "Describe.", len(images)), images)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return inputs["input_ids"][0].tolist().index(image_id)


def test_a_warm_request_with_an_image_equals_a_cold_one(qwen):
    cache = PrefixCache(PrefixCacheSettings(block_size=4))
    cold = generate_tokens(qwen, [FIRST], None)
    assert generate_tokens(qwen, [FIRST], cache) == cold
    warm, cached = generate_tokens(qwen, [FIRST], cache)
    assert warm == cold[0] and cached > first_image_position(qwen, [FIRST])


def test_warm_logits_with_an_image_are_within_1e5_of_cold(qwen):
    cache = PrefixCache(PrefixCacheSettings(block_size=4))
    cold, _ = last_logits(qwen, [FIRST], None)
    last_logits(qwen, [FIRST], cache)
    warm, reused = last_logits(qwen, [FIRST], cache)
    assert reused > first_image_position(qwen, [FIRST])
    assert float(mx.abs(warm - cold).max()) <= 1e-5


@pytest.mark.parametrize("other", [SECOND, SAME_SIZE], ids=["other_size", "same_token_count"])
def test_an_image_swapped_under_the_same_prompt_reuses_only_the_text_before_it(qwen, other):
    cache = PrefixCache(PrefixCacheSettings(block_size=4))
    generate_tokens(qwen, [FIRST], cache)
    cold = generate_tokens(qwen, [other], None)
    swapped, cached = generate_tokens(qwen, [other], cache)
    assert swapped == cold[0]
    assert 0 < cached <= first_image_position(qwen, [other])


def test_two_images_with_the_same_placeholder_count_never_share_a_block(qwen):
    """rgb_200x100 and a recoloured copy: the same grid (so the same token ids), other pixels."""
    from PIL import Image

    model, processor = qwen
    picture = Image.open(SAME_SIZE).convert("RGB")
    inverted = Image.eval(picture, lambda v: 255 - v)
    cache = PrefixCache(PrefixCacheSettings(block_size=4))
    prompt = media_prompt(processor, "Describe.", 1)
    ids = [processor.prepare_inputs(prompt, [p])["input_ids"][0].tolist() for p in (picture, inverted)]
    assert ids[0] == ids[1]
    list(stream_generate(model, processor, prompt, image=[picture], prefix_cache=cache, max_tokens=2))
    events = list(stream_generate(model, processor, prompt, image=[inverted], prefix_cache=cache, max_tokens=2))
    first = ids[0].index(processor.tokenizer.convert_tokens_to_ids(processor.image_token))
    assert events[-1].cached_tokens <= first


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_warm_equals_cold_or_is_skipped(family):
    loaded = load(published(family))
    cache = PrefixCache(PrefixCacheSettings(block_size=4))
    cold = generate_tokens(loaded, [FIRST], None)
    assert generate_tokens(loaded, [FIRST], cache) == cold
    warm, cached = generate_tokens(loaded, [FIRST], cache)
    assert warm == cold[0]
    stats = cache.stats()
    if stats.skipped:
        assert cached == 0 and stats.memory_blocks == 0
    else:
        assert cached > 0 and stats.hits == 1


# -- hybrid models: recurrent layers kept whole at one block boundary per prompt


@pytest.fixture(scope="module")
def hybrid() -> tuple[Any, Any]:
    return load(FIXTURES / "qwen3_5" / "hf5")


def test_a_hybrid_models_warm_logits_are_within_1e5_of_cold(hybrid):
    """Qwen3.5: the attention layers come back from blocks, the recurrent ones from the state kept at the
    boundary; the prompt's last logits equal a cold prefill's."""
    cache = PrefixCache(PrefixCacheSettings(block_size=8))
    cold, _ = last_logits(hybrid, [FIRST], None)
    first, reused_first = last_logits(hybrid, [FIRST], cache)
    warm, reused = last_logits(hybrid, [FIRST], cache)
    assert reused_first == 0 and reused > 0
    assert float(mx.abs(warm - cold).max()) <= 1e-5 and float(mx.abs(first - cold).max()) <= 1e-5


def test_a_hybrid_models_next_turn_reuses_the_conversation(hybrid, tmp_path):
    """Turn two (turn one, its answer, a new question) restores turn one's prompt up to its kept boundary, from
    memory and from a disk tier read by a new cache, and answers as a cold run does."""
    model, processor = hybrid
    turn_one = media_prompt(processor, "Describe this picture in some detail, please.", 1)
    media = media_options(processor, [FIRST])

    def tokens(prompt: str, cache: PrefixCache | None) -> tuple[list[int], int]:
        events = list(
            stream_generate(model, processor, prompt, prefix_cache=cache, max_tokens=8, ignore_eos=True, **media)
        )
        return [e.token for e in events], events[-1].cached_tokens

    cache = PrefixCache(PrefixCacheSettings(block_size=8, disk_dir=tmp_path), model_id="qwen3_5-fixture")
    answer, _ = tokens(turn_one, cache)
    turn_two = turn_one + processor.decode(answer) + "<|im_end|>\n<|im_start|>user\nAnd the colours?<|im_end|>\n"
    cold, _ = tokens(turn_two, None)
    warm, reused = tokens(turn_two, cache)
    n_one = len(processor.prepare_inputs(turn_one, [FIRST])["input_ids"][0])
    assert warm == cold and reused >= (n_one - 16) // 8 * 8 > 0
    cache.close()
    from_disk = PrefixCache(PrefixCacheSettings(block_size=8, disk_dir=tmp_path), model_id="qwen3_5-fixture")
    again, reused_again = tokens(turn_two, from_disk)
    assert again == cold and reused_again >= reused
    from_disk.close()


def test_the_engine_keeps_a_hybrid_models_boundaries(hybrid):
    """In the batching engine a Qwen3.5 prompt seen before hits: a first request is prefilled alone so that its
    recurrent state is kept at its boundary; concurrent repeats then get the tokens each gets alone."""
    from vlm_runtime import Engine, GenerationConfig, Request

    model, processor = hybrid
    prompts = [media_prompt(processor, f"Question number {i}, about this picture, in some detail?", 1) for i in (1, 2)]
    media = [FIRST]
    config = GenerationConfig(max_tokens=6, ignore_eos=True)
    alone = [
        [e.token for e in stream_generate(model, processor, p, max_tokens=6, ignore_eos=True, image=media)]
        for p in prompts
    ]
    cache = PrefixCache(PrefixCacheSettings(block_size=8))
    with Engine(model, processor, max_batch_size=4, prefix_cache=cache) as engine:
        for round_ in range(2):
            streams = [engine.submit(Request(processor.prepare_inputs(p, media), config=config)) for p in prompts]
            events = [list(s) for s in streams]
            assert [[e.token for e in ev] for ev in events] == alone
            if round_:
                assert all(ev[-1].cached_tokens > 0 for ev in events)
