"""Qwen3.5 beyond the shared parity suites (which run its hf5 and mlx_community layouts): the gated delta rule
(chunked == token by token, prompts prefilled in pieces, the state carried across chunks really matters), padding
that leaves the recurrent state alone, the checkpoint layouts (MTP tensors dropped, MLX converters' 1 + w norms),
video, the text-only checkpoints, quantized folders (mlx-vlm's and ours), the prompt cache with recurrent layers,
rows joining a running batch, and thinking through the template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_models import apply_chat_template, load
from vlm_models.convert import ConvertOptions, QuantizeOptions, convert
from vlm_models.loading import ModelLoadError
from vlm_models.models import qwen3_5
from vlm_models.nn.gated_delta import gated_delta_chunked, gated_delta_step, l2_normalize
from vlm_models.nn.moe import QuantizedSwitchLinear, SparseMoE
from vlm_runtime import (
    BatchGenerator,
    BatchRecurrentCache,
    GenerationConfig,
    PromptCache,
    RecurrentCache,
    Request,
    SamplingParams,
    generate,
    generate_step,
    load_prompt_cache,
    make_sampler,
)
from vlm_runtime.generate import run_generation
from vlm_runtime.recurrent_cache import SNAPSHOT_MARGIN
from vlm_runtime.settings import generation_settings

from .conftest import FIXTURES, Reference, check_chunked_prefill, check_quantized_fixture, inputs_of, logits_of

ROOT = FIXTURES / "qwen3_5"
IMAGES = FIXTURES / "images"
TOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference("qwen3_5")


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hf5")


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


def greedy_tokens(model, inputs: dict, n: int, step: int = 2048) -> list[int]:
    config = GenerationConfig(max_tokens=n, prefill_step_size=step)
    return [t for t, _ in generate_step(model, inputs, sampler=make_sampler(SamplingParams()), config=config)]


# -- the gated delta rule


def random_rule_inputs(rng: np.random.Generator, batch: int, heads: int, length: int, key: int, value: int):
    def normal(*shape):
        return mx.array(rng.normal(size=shape).astype(np.float32))

    q = l2_normalize(normal(batch, heads, length, key)) * key**-0.5
    k = l2_normalize(normal(batch, heads, length, key))
    # Decays from almost none to strong: some heads remember across many chunks.
    g = mx.array(-np.exp(rng.uniform(-7, 0.5, size=(batch, heads, length))).astype(np.float32))
    beta = mx.array(rng.uniform(0, 1, size=(batch, heads, length)).astype(np.float32))
    return q, k, normal(batch, heads, length, value), g, beta, normal(batch, heads, key, value)


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 200),
    split=st.integers(0, 200),
    chunk=st.sampled_from([4, 16, 64]),
    heads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_chunked_rule_is_the_token_by_token_rule(length: int, split: int, chunk: int, heads: int, seed: int) -> None:
    """Any length, any chunk size, from a non-zero state, in one piece or two: the outputs and the final state are
    those of one ``gated_delta_step`` per token."""
    q, k, v, g, beta, state = random_rule_inputs(np.random.default_rng(seed), 2, heads, length, 8, 6)
    outputs, stepped = [], state
    for t in range(length):
        out, stepped = gated_delta_step(q[:, :, t], k[:, :, t], v[:, :, t], g[..., t], beta[..., t], stepped)
        outputs.append(out)
    expected = mx.stack(outputs, axis=2)
    out, final = gated_delta_chunked(q, k, v, g, beta, state, chunk=chunk)
    np.testing.assert_allclose(np.array(out), np.array(expected), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.array(final), np.array(stepped), atol=2e-5, rtol=0)
    cut = min(split, length)
    if 0 < cut < length:
        first, middle = gated_delta_chunked(
            q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], g[..., :cut], beta[..., :cut], state
        )
        rest, end = gated_delta_chunked(
            q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], g[..., cut:], beta[..., cut:], middle
        )
        np.testing.assert_allclose(np.array(mx.concatenate([first, rest], 2)), np.array(expected), atol=2e-5, rtol=0)
        np.testing.assert_allclose(np.array(end), np.array(stepped), atol=2e-5, rtol=0)


@pytest.mark.parametrize("step", [7, 64, 100])
def test_chunked_prefill_matches(model, ref: Reference, step: int) -> None:
    """Prefill in pieces that split the delta rule's chunks anywhere (7), on their edges (64) or between (100)."""
    for case in ("long", "two_images"):
        check_chunked_prefill(model, ref, case, step)


def test_the_state_carried_across_chunks_matters(model, ref: Reference) -> None:
    """The long case proves the recurrence: forgetting the state between two prefill pieces moves the last logits
    far past the tolerance (the fixture has heads whose memory lasts across chunks)."""
    inputs = inputs_of(ref, "long")
    prompt = model.embed_prompt(**inputs)
    cache = model.make_cache()
    cut = prompt.inputs_embeds.shape[1] // 2
    model.hidden_states(prompt.inputs_embeds[:, :cut], cache=cache, position_ids=prompt.position_ids[..., :cut])
    for layer in cache:
        if isinstance(layer, RecurrentCache):
            layer.slots[1] = mx.zeros_like(layer.recurrent_state)
    hidden = model.hidden_states(
        prompt.inputs_embeds[:, cut:], cache=cache, position_ids=prompt.position_ids[..., cut:]
    )
    diff = np.abs(np.array(model.compute_logits(hidden[:, -1])) - ref.get("long", "logits")[:, -1]).max()
    assert diff > 100 * TOL


def test_layer_kinds_and_caches(model) -> None:
    kinds = [layer.layer_type for layer in model.model.language_model.layers]
    assert kinds == ["linear_attention", "full_attention"] * 2
    assert [type(c).__name__ for c in model.make_cache()] == ["RecurrentCache", "KVCache"] * 2


def test_layer_types_from_full_attention_interval(tmp_path: Path, ref: Reference) -> None:
    """Configs that give only ``full_attention_interval`` (no ``layer_types``) build the same layers."""
    path = Path(shutil.copytree(ROOT / "hf5", tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    del config["text_config"]["layer_types"]
    (path / "config.json").write_text(json.dumps(config))
    assert np.abs(logits_of(load(path)[0], ref, "text") - ref.get("text", "logits")).max() <= TOL


def test_bad_layer_types_are_one_clear_error(tmp_path: Path) -> None:
    path = Path(shutil.copytree(ROOT / "hf5", tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["layer_types"] = [
        "linear_attention",
        "sliding_attention",
        "linear_attention",
        "full_attention",
    ]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="layer_types must name 4 layers"):
        load(path)


# -- padding and batches


def test_padding_leaves_the_recurrent_state_unchanged(model, ref: Reference) -> None:
    """A left-padded batch of two prompts: each row's recurrent state after prefill is the state the prompt alone
    reaches, although the padding columns held non-zero inputs, and a row already holding state keeps it while
    padding columns pass."""
    short, long_ = inputs_of(ref, "text"), inputs_of(ref, "one_image")
    prompts = [model.embed_prompt(**short), model.embed_prompt(**long_)]
    alone = []
    for prompt in prompts:
        cache = model.make_cache()
        model.hidden_states(prompt.inputs_embeds, cache=cache, position_ids=prompt.position_ids)
        alone.append(cache)
    n = max(p.inputs_embeds.shape[1] for p in prompts)
    padding = [n - p.inputs_embeds.shape[1] for p in prompts]
    noise = mx.random.normal((1, padding[0], prompts[0].inputs_embeds.shape[-1]), key=mx.random.key(0))
    embeds = mx.concatenate([mx.concatenate([noise, prompts[0].inputs_embeds], 1), prompts[1].inputs_embeds])
    positions = mx.concatenate(
        [mx.pad(prompts[0].position_ids, [(0, 0), (0, 0), (padding[0], 0)]), prompts[1].position_ids], axis=1
    )
    from vlm_runtime.batch_cache import batch_cache_like

    batched = [batch_cache_like(layer, padding) for layer in model.make_cache()]
    model.hidden_states(embeds, cache=batched, position_ids=positions)
    for i, layer in enumerate(batched):
        if isinstance(layer, BatchRecurrentCache):
            for row in range(2):
                for mine, theirs in zip(layer.extract(row).state, alone[row][i].state):
                    np.testing.assert_allclose(np.array(mine), np.array(theirs), atol=1e-5, rtol=0)
    # A row with state: columns its mask hides change nothing.
    layer = model.model.language_model.layers[0].linear_attn
    cache = alone[1][0]
    before = [np.array(a) for a in cache.state]
    x = mx.random.normal((1, 5, embeds.shape[-1]), key=mx.random.key(1))
    layer(x, cache, valid=mx.zeros((1, 5), mx.bool_))
    np.testing.assert_array_equal(np.array(cache.recurrent_state), before[1])


def test_rows_joining_and_leaving_a_running_batch_equal_each_alone(loaded) -> None:
    """Requests admitted at different steps (so merged with extra left padding), of different lengths, one with an
    image, leave at different times: every row's tokens are those it gets alone."""
    model, processor = loaded
    prompts = [
        (apply_chat_template(processor, None, "Describe this picture.", num_images=1), [IMAGES / "rgb_112x168.png"]),
        (apply_chat_template(processor, None, "Hello!"), []),
        (apply_chat_template(processor, None, "Write a short poem about the sea and the sky, please."), []),
    ]
    lengths = [9, 5, 7]
    engine = BatchGenerator(model, processor)
    uids, tokens = [], {}
    for i, (prompt, images) in enumerate(prompts):
        config = GenerationConfig(max_tokens=lengths[i], ignore_eos=True)
        uids.append(engine.submit(Request(processor.prepare_inputs(prompt, images), config=config)))
        for event in engine.step():
            tokens.setdefault(event.uid, []).append(event.token)
    while engine.has_work():
        for event in engine.step():
            tokens.setdefault(event.uid, []).append(event.token)
    for uid, (prompt, images), n in zip(uids, prompts, lengths):
        single = greedy_tokens(model, processor.prepare_inputs(prompt, images), n)
        assert tokens[uid] == single


# -- layouts


def test_mtp_tensors_are_dropped_and_the_rest_kept(model) -> None:
    raw = dict(mx.load(str(ROOT / "hf5" / "model.safetensors")))
    assert any(k.startswith("mtp.") for k in raw)
    sanitized = model.sanitize(raw)
    assert not any("mtp" in k for k in sanitized)
    assert len(sanitized) == len(raw) - sum(k.startswith("mtp.") for k in raw)


def test_mlx_converters_norms_and_convolutions_map_back(model) -> None:
    """mlx-vlm's folder stores the zero-centred norms as 1 + w and the convolution as (channels, kernel, 1):
    sanitize gives transformers' values, and mlx_community_names writes mlx-vlm's tensors back exactly."""
    ours = model.sanitize(dict(mx.load(str(ROOT / "hf5" / "model.safetensors"))))
    peer = dict(mx.load(str(ROOT / "mlx_community" / "model.safetensors")))
    norm = "model.language_model.layers.0.input_layernorm.weight"
    np.testing.assert_allclose(
        np.array(peer["language_model.model.layers.0.input_layernorm.weight"]), np.array(ours[norm]) + 1, atol=1e-6
    )
    from_peer = model.sanitize(peer)
    assert from_peer.keys() == ours.keys()
    for key in ours:
        np.testing.assert_allclose(np.array(from_peer[key]), np.array(ours[key]), atol=1e-6, err_msg=key)
    written = model.mlx_community_names(ours)
    assert written.keys() == peer.keys()
    for key in peer:
        np.testing.assert_allclose(np.array(written[key]), np.array(peer[key]), atol=1e-6, err_msg=key)
    # A linear-attention output norm is an ordinary one: never shifted.
    gated = "model.language_model.layers.0.linear_attn.norm.weight"
    assert not qwen3_5.is_centred_norm(gated) and qwen3_5.is_centred_norm(norm)


def test_video_and_image_prompt_matches_transformers(model) -> None:
    video = np.load(ROOT / "video_reference.npz")
    names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    inputs = {name: mx.array(video[name]) for name in names}
    np.testing.assert_array_equal(np.array(model.embed_prompt(**inputs).position_ids), video["position_ids"])
    assert np.abs(np.array(model(**inputs).logits) - video["logits"]).max() <= TOL
    assert greedy_tokens(model, inputs, video["greedy"].size) == video["greedy"].reshape(-1).tolist()


# -- the text-only checkpoints


@pytest.mark.parametrize("layout", ["hf5", "mlx_community"])
def test_text_only_checkpoint_matches_transformers(layout: str) -> None:
    """Qwen3_5ForCausalLM (its own names, model.layers.*) and our conversion of it (mlx-vlm 0.7.10 cannot convert
    it: it looks for an image processor)."""
    text_ref = Reference("qwen3_5_text")
    model, processor = load(FIXTURES / "qwen3_5_text" / layout)
    for case in text_ref.cases:
        inputs = inputs_of(text_ref, case)
        assert np.abs(np.array(model(**inputs).logits) - text_ref.get(case, "logits")).max() <= TOL, case
        expected = text_ref.get(case, "greedy").reshape(-1).tolist()
        assert greedy_tokens(model, inputs, len(expected), step=50) == expected
        prompt = text_ref.meta["cases"][case]["prompt"]
        np.testing.assert_array_equal(processor(prompt)["input_ids"], text_ref.get(case, "input_ids"))
    with pytest.raises(ValueError, match="text-only checkpoint: it takes no pixel_values"):
        model.embed_prompt(inputs["input_ids"], pixel_values=mx.zeros((4, 1536)))


def test_text_only_checkpoint_is_the_multimodal_decoder(model) -> None:
    text_model, _ = load(FIXTURES / "qwen3_5_text" / "hf5")
    ids = mx.array([[5, 17, 99, 3, 250, 41]])
    np.testing.assert_allclose(np.array(text_model(ids).logits), np.array(model(ids).logits), atol=1e-5, rtol=0)


# -- quantized


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_5_text"])
def test_our_quantized_folders_load_and_compute_their_weights(family: str) -> None:
    """Ours (``vlm convert -q --skip-vision``; mlx-vlm's are checked in test_peer_layouts.py): quantized, equal to
    its own dequantized weights, following the reference; it also loads in mlx-vlm (checked when the fixture was
    written: the same logits as ours)."""
    cases = ("text", "long_text") if family == "qwen3_5_text" else ("one_image", "text", "long")
    check_quantized_fixture(family, Reference(family), cases)


def test_convert_quantizes_the_linear_attention_and_round_trips(tmp_path: Path, ref: Reference) -> None:
    options = ConvertOptions(quantize=QuantizeOptions.for_mode("affine", 8, 32))
    report = convert(ROOT / "hf5", tmp_path / "q8", options)
    prefix = "language_model.model.layers.0.linear_attn."
    assert {prefix + name for name in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b")} <= set(report.quantized)
    assert report.kept_float[prefix + "out_proj"] == "input width 48 is not a multiple of the group size 32"
    quantized, _ = load(report.destination)
    ours, expected = logits_of(quantized, ref, "long"), ref.get("long", "logits")
    rel = np.abs(ours - expected).mean() / np.abs(expected).mean()
    corr = np.corrcoef(ours.reshape(-1), expected.reshape(-1))[0, 1]
    assert rel < 0.1 and corr > 0.99, (rel, corr)  # 8 bits: close to the float model
    back = convert(report.destination, tmp_path / "float", ConvertOptions(dequantize=True))
    restored, _ = load(back.destination)
    np.testing.assert_allclose(logits_of(restored, ref, "long"), ours, atol=TOL, rtol=0)


def test_moe_experts_quantize_and_the_router_matches_transformers(tmp_path: Path) -> None:
    moe_ref = Reference("qwen3_5_moe")
    model, _ = load(FIXTURES / "qwen3_5_moe" / "hf5")
    layers = model.model.language_model.layers
    assert all(isinstance(layer.mlp, SparseMoE) and "shared_expert" in layer.mlp for layer in layers)
    for case in moe_ref.cases:
        chosen = {}
        for i, layer in enumerate(layers):
            original = layer.mlp.route

            def record(x, i=i, original=original, chosen=chosen):
                experts, weights = original(x)
                chosen[i] = np.sort(np.array(experts).reshape(-1, experts.shape[-1]), axis=-1)
                return experts, weights

            layer.mlp.route = record
        try:
            model(**inputs_of(moe_ref, case))
        finally:
            for layer in layers:
                layer.mlp.route = type(layer.mlp).route.__get__(layer.mlp)
        for i in range(len(layers)):
            expected = moe_ref.get(case, f"experts/{i}")
            if expected is not None:
                np.testing.assert_array_equal(chosen[i], expected, err_msg=f"{case} layer {i}")
    options = ConvertOptions(quantize=QuantizeOptions.for_mode("affine", 4, 32))
    report = convert(FIXTURES / "qwen3_5_moe" / "hf5", tmp_path / "q", options)
    prefix = "language_model.model.layers.1.mlp."
    assert {prefix + "switch_mlp.gate_proj", prefix + "switch_mlp.up_proj", prefix + "gate"} <= set(report.quantized)
    assert prefix + "shared_expert.gate_proj" in report.quantized
    quantized, _ = load(report.destination)
    assert isinstance(quantized.model.language_model.layers[1].mlp.experts.gate_proj, QuantizedSwitchLinear)
    for folder in ("mlx_community_4bit", "mlx_vlm_4bit"):
        peer, _ = load(FIXTURES / "qwen3_5_moe" / folder)
        assert isinstance(peer.model.language_model.layers[3].mlp.experts.up_proj, QuantizedSwitchLinear), folder


def test_the_shared_expert_matters() -> None:
    moe_ref = Reference("qwen3_5_moe")
    moe, _ = load(FIXTURES / "qwen3_5_moe" / "hf5")
    for layer in moe.model.language_model.layers:
        layer.mlp.shared_expert_gate.weight = mx.full(layer.mlp.shared_expert_gate.weight.shape, -30.0)
    assert np.abs(logits_of(moe, moe_ref, "text") - moe_ref.get("text", "logits")).max() > 100 * TOL


# -- the prompt cache


def run(model, processor, ids: list[int], prompt_cache: PromptCache | None = None, n: int = 6):
    """Generate from token ids (decoding the model's random tokens to text would not round-trip)."""
    settings_ = generation_settings(max_tokens=n, ignore_eos=True)
    results = list(
        run_generation(
            model,
            processor,
            settings_.request({"input_ids": mx.array([ids])}),
            settings_.cache,
            prompt_cache=prompt_cache,
        )
    )
    return [r.token for r in results], results[-1].cached_tokens


def test_prompt_cache_reuses_a_whole_stored_state_and_nothing_else(loaded, tmp_path: Path) -> None:
    """A prompt that extends everything the cache holds reuses all of it; one that diverges inside it goes back
    only as far as a state the cache kept (a recurrent state cannot be rolled back token by token). Each gives a
    fresh generation's tokens, and a saved cache continues the same from the file."""
    model, processor = loaded
    first = processor(apply_chat_template(processor, None, "Describe the weather today."))["input_ids"][0].tolist()
    cache = PromptCache()
    run(model, processor, first, cache)
    held = list(cache.tokens)
    assert len(held) == len(first) + 5  # the last generated token was never fed
    follow = held + processor.encode(" And tomorrow?")
    tokens, reused = run(model, processor, follow, cache)
    assert reused == len(held) and tokens == run(model, processor, follow)[0]
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    assert [type(c).__name__ for c in load_prompt_cache(path)[0]] == ["RecurrentCache", "KVCache"] * 2
    restored, _ = PromptCache.load(path)
    more = list(restored.tokens) + processor.encode(" Sunny.")
    tokens, reused = run(model, processor, more, restored)
    assert reused == len(cache.tokens) and tokens == run(model, processor, more)[0]
    # Diverging inside what the cache holds: back to the state the first prefill kept SNAPSHOT_MARGIN tokens before
    # its end, and no further.
    diverging = first[:-3] + processor.encode(" spring?")
    tokens, reused = run(model, processor, diverging, cache)
    assert reused == len(first) - SNAPSHOT_MARGIN and tokens == run(model, processor, diverging)[0]
    early = first[: len(first) - SNAPSHOT_MARGIN - 2] + processor.encode(" winter")
    tokens, reused = run(model, processor, early, cache)
    assert reused == 0 and tokens == run(model, processor, early)[0]


# -- thinking and the chat template


def test_thinking_through_the_template(loaded) -> None:
    """Thinking is on by default (the prompt opens the block), ``enable_thinking=False`` writes an empty one; the
    runtime reads the reasoning apart from the answer and a budget closes the block."""
    model, processor = loaded
    on = apply_chat_template(processor, None, "Hello!")
    off = apply_chat_template(processor, None, "Hello!", enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    result = generate(model, processor, on, max_tokens=12, ignore_eos=True, thinking_budget=4)
    assert len(processor.encode("</think>")) == 1
    first = greedy_tokens(model, processor.prepare_inputs(on), 4)
    assert result.reasoning == processor.decode(first) + "\n"  # the budget's closing "\n</think>"
    assert result.generation_tokens == 12
    plain = generate(model, processor, off, max_tokens=6, ignore_eos=True)
    assert plain.reasoning == ""
