"""Speculative decoding on real architectures: image prompts, a drafter of another family that shares the
target's tokenizer, the shipped demo model as its own drafter, 256 greedy tokens equal to plain decoding in
float32; loading drafters by kind, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm_models import apply_chat_template, load
from vlm_models.cli import main
from vlm_models.demo import demo_model_path
from vlm_models.drafting import DrafterError, drafter_kind, load_drafter
from vlm_runtime import stream_generate
from vlm_runtime.batch import BatchGenerator
from vlm_runtime.settings import generation_settings

from .conftest import FIXTURES

TARGET = FIXTURES / "qwen2_vl" / "hf4"
SIBLING = FIXTURES / "qwen2_5_vl" / "hf4"  # another family, the same tokenizer
IMAGE = FIXTURES / "images" / "rgb_112x168.png"


def greedy(model, processor, prompt: str, images, draft=None, n: int = 256) -> list:
    return list(
        stream_generate(
            model, processor, prompt, image=images, max_tokens=n, ignore_eos=True, draft_model=draft, num_draft_tokens=5
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("drafter_path", [TARGET, SIBLING], ids=["itself", "qwen2.5-vl"])
def test_256_greedy_tokens_with_an_image_equal_plain_decoding(drafter_path: Path) -> None:
    model, processor = load(TARGET)
    drafter, kind = load_drafter(drafter_path, target_processor=processor)
    assert kind == "draft"
    prompt = apply_chat_template(processor, None, "Describe this image.", num_images=1)
    plain = greedy(model, processor, prompt, [IMAGE])
    fast = greedy(model, processor, prompt, [IMAGE], drafter)
    assert [r.token for r in fast] == [r.token for r in plain]
    assert fast[-1].draft_tokens > 0
    if drafter_path == TARGET:
        assert fast[-1].accepted_draft_tokens == fast[-1].draft_tokens


@pytest.mark.slow
def test_the_demo_model_verified_in_blocks_decodes_as_it_does_token_by_token() -> None:
    model, processor = load(demo_model_path())
    drafter, _ = load_drafter(demo_model_path(), target_processor=processor)
    image = Path(__file__).resolve().parents[2] / "examples" / "shapes.png"
    prompt = apply_chat_template(processor, None, "What shapes are in this image?", num_images=1)
    plain = greedy(model, processor, prompt, [image])
    fast = greedy(model, processor, prompt, [image], drafter)
    assert [r.token for r in fast] == [r.token for r in plain]
    assert fast[-1].accepted_draft_tokens == fast[-1].draft_tokens > 100


@pytest.mark.parametrize(
    "config, kind",
    [
        ({"model_type": "qwen2_vl"}, "draft"),
        ({"speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"]}, "eagle3"),
        ({"model_type": "dflash", "architectures": ["DFlashDraftModel"]}, "dflash"),
        ({"model_type": "gemma4_assistant"}, "mtp"),
    ],
)
def test_the_kind_is_read_from_the_config(config: dict, kind: str) -> None:
    assert drafter_kind(config) == kind


def test_unbuilt_kinds_and_other_tokenizers_are_refused_with_one_line(tmp_path: Path) -> None:
    assistant = tmp_path / "assistant"
    assistant.mkdir()
    (assistant / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant"}))
    with pytest.raises(DrafterError, match="mtp drafters are not supported yet"):
        load_drafter(assistant)
    with pytest.raises(DrafterError, match="not 'eagle3'"):
        load_drafter(TARGET, kind="eagle3")
    _, processor = load(TARGET)
    with pytest.raises(DrafterError, match="another tokenizer"):
        load_drafter(FIXTURES / "llava" / "hf4", target_processor=processor)


def test_the_command_line_drafts_and_reports_acceptance(capsys) -> None:
    args = ["generate", "--model", str(TARGET), "--image", str(IMAGE), "--max-tokens", "24"]
    assert main([*args, "--draft-model", str(TARGET), "--num-draft-tokens", "3"]) == 0
    drafted = capsys.readouterr()
    assert "drafted:" in drafted.err and "accepted:" in drafted.err
    assert main(args) == 0
    assert capsys.readouterr().out == drafted.out  # the same answer as without the drafter
    assert main([*args, "--draft-model", str(FIXTURES / "llava" / "hf4")]) == 2
    assert "another tokenizer" in capsys.readouterr().err


def batched(model, processor, drafter=None, n: int = 128, **options) -> list:
    """Ragged prompts, one with an image, another with two, decoded as one batch: each request's events."""
    prompts = [
        (apply_chat_template(processor, None, "Describe this image.", num_images=1), [IMAGE]),
        (apply_chat_template(processor, None, "Just text, and longer than the other prompts are.", num_images=0), []),
        (
            apply_chat_template(processor, None, "Compare.", num_images=2),
            [IMAGE, FIXTURES / "images" / "rgb_56x56.png"],
        ),
    ]
    settings = generation_settings(max_tokens=n, ignore_eos=True, num_draft_tokens=4, **options)
    engine = BatchGenerator(model, processor, cache_settings=settings.cache, drafter=drafter)
    order = {
        engine.submit(settings.request(processor.prepare_inputs(p, images))): i for i, (p, images) in enumerate(prompts)
    }
    events: list[list] = [[] for _ in prompts]
    while engine.has_work():
        for event in engine.step():
            events[order[event.uid]].append(event)
    return events


@pytest.mark.parametrize(
    "target, drafter_path",
    [(TARGET, TARGET), (TARGET, SIBLING), (FIXTURES / "gemma3" / "hf4", FIXTURES / "gemma3" / "hf4")],
    ids=["qwen2-vl-itself", "qwen2.5-vl-drafts-qwen2-vl", "gemma3-sliding-window"],
)
def test_a_batch_with_images_drafts_row_by_row_and_equals_plain_batched_greedy(
    target: Path, drafter_path: Path
) -> None:
    model, processor = load(target)
    drafter, _ = load_drafter(drafter_path, target_processor=processor)
    plain = batched(model, processor)
    fast = batched(model, processor, drafter)
    for a, b in zip(fast, plain):
        assert [e.token for e in a] == [e.token for e in b] and len(b) == 128  # token for token
        assert a[-1].draft_tokens > 0
        if drafter_path == target:
            assert a[-1].accepted_draft_tokens == a[-1].draft_tokens


def test_a_batch_keeps_the_targets_logprobs_and_stop_strings() -> None:
    model, processor = load(TARGET)
    drafter, _ = load_drafter(SIBLING, target_processor=processor)
    first = batched(model, processor, n=48)[0]
    stop = "".join(e.text for e in first)[10:13]
    options = dict(n=48, logprobs=True, top_logprobs=2, stop=[stop])
    plain, fast = batched(model, processor, **options), batched(model, processor, drafter, **options)
    for a, b in zip(fast, plain):
        assert [(e.token, e.text, e.finish_reason, e.stop_string) for e in a] == [
            (e.token, e.text, e.finish_reason, e.stop_string) for e in b
        ]
        assert [e.logprob for e in a] == pytest.approx([e.logprob for e in b], abs=1e-4)
        assert [[t for t, _ in e.top_logprobs] for e in a] == [[t for t, _ in e.top_logprobs] for e in b]
    assert plain[0][-1].finish_reason == "stop"
