"""Drafters that read the target's hidden states: EAGLE-3 heads in the speculators layout and DFlash block
drafters in the z-lab layout (tiny random ones from tests/fixtures/make_fixtures_eagle3.py and
make_fixtures_dflash.py): loaded by kind, EAGLE-3 in both weight namings, with or without embeddings of its own;
greedy output with an image equals plain greedy decoding over 256 tokens alone and 128 in a batch (acceptance
with random weights is low: the rejections are what is tested); a prompt partly held by the prefix cache; one-line
refusals; the command line."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from vlm_models import apply_chat_template, load
from vlm_models.cli import main
from vlm_models.demo import demo_model_path
from vlm_models.drafting import DrafterError, drafter_kind, load_drafter
from vlm_models.eagle3 import sanitize
from vlm_runtime import PrefixCache, batch_generate, stream_generate
from vlm_runtime.prefix_cache import PrefixCacheSettings

from .conftest import FIXTURES

TARGET = FIXTURES / "qwen2_vl" / "hf4"
HEADS = [FIXTURES / "eagle3" / "qwen2_vl", FIXTURES / "eagle3" / "qwen2_vl_midlayer", FIXTURES / "dflash" / "qwen2_vl"]
IDS = ["eagle3-own-embeddings", "eagle3-midlayer-target-embeddings", "dflash"]
IMAGE = FIXTURES / "images" / "rgb_112x168.png"


@pytest.fixture(scope="module")
def target():
    return load(TARGET)


def greedy(model, processor, prompt, drafter=None, n=256, **options) -> list:
    return list(
        stream_generate(
            model,
            processor,
            prompt,
            image=[IMAGE],
            max_tokens=n,
            ignore_eos=True,
            draft_model=drafter,
            num_draft_tokens=4,
            **options,
        )
    )


@pytest.mark.parametrize("head", HEADS, ids=IDS)
def test_256_greedy_tokens_with_an_image_equal_plain_decoding(target, head: Path) -> None:
    model, processor = target
    drafter, kind = load_drafter(head, target_processor=processor, target=model)
    assert kind == head.parent.name
    assert drafter.target_layers == ((0, 1, 2) if kind == "eagle3" else (1, 2))  # DFlash names layers by output
    prompt = apply_chat_template(processor, None, "Describe this image.", num_images=1)
    plain = greedy(model, processor, prompt)
    fast = greedy(model, processor, prompt, drafter)
    assert [r.token for r in fast] == [r.token for r in plain]
    assert fast[-1].draft_tokens > 0


@pytest.mark.parametrize("head", [HEADS[0], HEADS[2]], ids=["eagle3", "dflash"])
def test_a_batch_with_images_equals_plain_batched_greedy(target, head: Path) -> None:
    model, processor = target
    drafter, _ = load_drafter(head, target=model)
    prompts = [
        (apply_chat_template(processor, None, "Describe this image.", num_images=1), [IMAGE]),
        (apply_chat_template(processor, None, "A longer question, in text only, for the batch.", num_images=0), None),
    ]
    options = dict(images=[i for _, i in prompts], max_tokens=128, ignore_eos=True, num_draft_tokens=3)
    plain = batch_generate(model, processor, [p for p, _ in prompts], **options)
    fast = batch_generate(model, processor, [p for p, _ in prompts], draft_model=drafter, **options)
    assert [r.text for r in fast] == [r.text for r in plain]
    assert all(r.draft_tokens > 0 for r in fast)


@pytest.mark.parametrize("head", [HEADS[1], HEADS[2]], ids=["eagle3", "dflash"])
def test_a_prompt_the_prefix_cache_partly_holds_drafts_from_the_rest(target, head: Path) -> None:
    model, processor = target
    drafter, _ = load_drafter(head, target=model)
    cache = PrefixCache(PrefixCacheSettings(block_size=16))
    prompt = apply_chat_template(processor, None, "Describe this image, then say more about it.", num_images=1)
    plain = greedy(model, processor, prompt, n=96)
    greedy(model, processor, prompt, drafter, n=8, prefix_cache=cache)
    again = greedy(model, processor, prompt, drafter, n=96, prefix_cache=cache)
    assert again[-1].cached_tokens > 0
    assert [r.token for r in again] == [r.token for r in plain]


def test_sanitize_is_pure_and_idempotent() -> None:
    weights = {"midlayer.self_attn.q_proj.weight": mx.zeros((2, 4)), "d2t": mx.zeros((3,)), "fc.weight": mx.ones(2)}
    once = sanitize(weights)
    assert set(once) == {"layers.0.self_attn.q_proj.weight", "fc.weight"}
    assert sanitize(once).keys() == once.keys() and "d2t" in weights


def test_refusals_are_one_line(tmp_path: Path) -> None:
    assert drafter_kind(json.loads((HEADS[0] / "config.json").read_text())) == "eagle3"
    with pytest.raises(DrafterError, match="no embeddings of its own: load it with its target model"):
        load_drafter(HEADS[1])
    gemma, gemma_processor = load(FIXTURES / "gemma3" / "hf4")
    drafter, _ = load_drafter(HEADS[0])  # loaded without its target: the loop refuses it
    with pytest.raises(ValueError, match=r"reads the target's hidden states .* does not expose"):
        list(stream_generate(gemma, gemma_processor, "hi", max_tokens=4, draft_model=drafter))
    with pytest.raises(DrafterError, match=r"reads the target's hidden states, which Model does not expose"):
        load_drafter(HEADS[0], target=gemma)
    # Heads trained for another target: layers it lacks, features of another width (a 6-layer, 128-wide target).
    demo, _ = load(demo_model_path())
    with pytest.raises(DrafterError, match="reads 192 feature channels; this target's layers give 384"):
        load_drafter(HEADS[0], target=demo)
    small, _ = load(TARGET)
    config = json.loads((HEADS[0] / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = [0, 1, 7]
    far = tmp_path / "far"
    far.mkdir()
    (far / "config.json").write_text(json.dumps(config))
    (far / "model.safetensors").write_bytes((HEADS[0] / "model.safetensors").read_bytes())
    with pytest.raises(DrafterError, match=r"cannot read the hidden states of layers \[7\]"):
        load_drafter(far, target=small)
    # A head trained for a target of another width.
    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((HEADS[0] / "config.json").read_text())
    config["target_hidden_size"] = 32
    (wide / "config.json").write_text(json.dumps(config))
    (wide / "model.safetensors").write_bytes((HEADS[0] / "model.safetensors").read_bytes())
    with pytest.raises(DrafterError, match="do not fit their config"):
        load_drafter(wide)
    config = json.loads((HEADS[0] / "config.json").read_text())
    config["transformer_layer_config"]["num_hidden_layers"] = 2
    (wide / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterError, match="heads of 2 layers are not supported"):
        load_drafter(wide)


def test_dflash_refusals_are_one_line(target, tmp_path: Path) -> None:
    model, _ = target
    with pytest.raises(DrafterError, match="no embeddings or head of its own: load it with its target model"):
        load_drafter(HEADS[2])
    config = json.loads((HEADS[2] / "config.json").read_text())
    for change, message in [
        ({"architectures": ["DFlash2DraftModel"]}, "DFlash2 drafters"),
        ({"layer_types": ["sliding_attention"] * 2}, "sliding-window layers are not supported"),
        ({"dflash_config": {**config["dflash_config"], "mask_token_id": 9999}}, "mask_token_id 9999 is not a token"),
    ]:
        folder = tmp_path / message.split()[0]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        (folder / "model.safetensors").write_bytes((HEADS[2] / "model.safetensors").read_bytes())
        with pytest.raises(DrafterError, match=message):
            load_drafter(folder, target=model)


@pytest.mark.parametrize("head", [HEADS[1], HEADS[2]], ids=["eagle3", "dflash"])
def test_the_command_line_drafts_with_a_head(capsys, head: Path) -> None:
    args = ["generate", "--model", str(TARGET), "--image", str(IMAGE), "--max-tokens", "24"]
    assert main([*args, "--draft-model", str(head), "--draft-kind", head.parent.name]) == 0
    drafted = capsys.readouterr()
    assert "drafted:" in drafted.err
    assert main(args) == 0
    assert capsys.readouterr().out == drafted.out
