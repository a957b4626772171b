"""Training on image samples works for every family vlm-models loads: each assistant turn follows exactly the
prompt ``generate`` sees, the training forward of a padded batch (conversations with two, one and no images, and
two turns) gives each answer token the loss that prefilling its prompt and decoding the answer gives it, and a
few LoRA steps cut the loss. The image processors' ``collate`` joins per-sample outputs as one call over all the
images would."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_models import apply_chat_template, load
from vlm_models.adapters import LoRAConfig, LoRALinear, target_paths
from vlm_runtime.generate import prefill
from vlm_train.config import TrainingConfig
from vlm_train.data import collate, load_samples
from vlm_train.trainer import Trainer, token_losses

from ..models.conftest import IMAGE_FAMILIES, published
from .conftest import FIXTURES, write_jsonl

IMAGES = FIXTURES / "images"
# Conversations of (question, answer, images) turns: two images of different sizes (so different tile counts,
# sides or grids), one, none, and two turns with an image each.
CONVERSATIONS = [
    [("Which one is wider?", "The second one, by far.", ["rgb_112x168.png", "rgb_200x100.png"])],
    [("What is it?", "A red square.", ["rgb_56x56.png"])],
    [("Say hello.", "Hello there!", [])],
    [("What is it?", "A red square.", ["rgb_56x56.png"]), ("And this?", "A wide one.", ["rgb_200x100.png"])],
]
SINGLE_TURN = {"paligemma2"}
"""PaliGemma's prompt is the images, <bos>, the task and a newline: a second turn would rewrite the first."""
REWRITES_HISTORY = {"qwen3_5", "qwen3_5_moe"}
"""Qwen3.5's template writes the last answer with its (empty) thinking block and earlier ones without: the first turn
of a two-turn sample is not where the second one's prompt begins, and the sample is refused with that reason. Its
prompt opens the thinking block (thinking is on by default), so an answer starts by closing it."""


def messages_of(turns, image_paths: bool = True) -> list[dict]:
    """Chat messages of ``turns``; image items carry their path (a JSONL sample) or nothing (a template)."""
    messages = []
    for question, answer, images in turns:
        content = [{"type": "image", "image": str(IMAGES / n)} if image_paths else {"type": "image"} for n in images]
        content.append({"type": "text", "text": question})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def training_data(folder: Path, conversations) -> Path:
    return write_jsonl(folder / "train.jsonl", [{"messages": messages_of(turns)} for turns in conversations])


def inference_answer_logprobs(model, processor, prompt: str, images: list[str], answer: list[int]) -> np.ndarray:
    """log p(answer[j] | prompt, answer[:j]) the way ``generate`` computes it: the prompt through the processor,
    one prefill, then one decode step per answer token."""
    inputs = processor.prepare_inputs(prompt, [str(IMAGES / name) for name in images])
    cache = model.make_cache()
    logits = [prefill(model, model.embed_prompt(**inputs), cache, step_size=4096)]
    for token in answer[:-1]:
        hidden = model.hidden_states(model.embed_tokens(mx.array([[token]])), cache=cache)
        logits.append(model.compute_logits(hidden[:, -1, :]))
    stacked = mx.concatenate(logits).astype(mx.float32)
    logprobs = stacked - mx.logsumexp(stacked, axis=-1, keepdims=True)
    return np.array(logprobs)[np.arange(len(answer)), answer]


def end_of_run(mask: np.ndarray, start: int) -> int:
    """Where the run of True values that starts at ``start`` ends."""
    falses = np.flatnonzero(~mask[start:])
    return start + int(falses[0]) if len(falses) else len(mask)


# Training data holds image conversations: audio samples are not supported by vlm train yet.
@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_training_loss_is_the_inference_loss(tmp_path: Path, family: str) -> None:
    model, processor = load(published(family))
    bad = []
    samples, _ = load_samples(
        training_data(tmp_path, CONVERSATIONS), processor, max_length=4096, on_bad_sample="skip", report=bad.append
    )
    conversations = CONVERSATIONS
    if family in SINGLE_TURN:
        assert len(bad) == 1 and bad[0].source.endswith(":4") and "not one sequence" in bad[0].reason
        conversations = CONVERSATIONS[:3]
    if family in REWRITES_HISTORY:
        assert len(bad) == 1 and bad[0].source.endswith(":4") and "does not render turn 2 as a prefix" in bad[0].reason
        conversations = CONVERSATIONS[:3]
    assert not bad or family in SINGLE_TURN | REWRITES_HISTORY
    batch = collate(samples, 0, processor.image_processor)
    losses, mask = (np.array(a) for a in token_losses(model, batch))
    assert len({len(s) for s in samples}) > 1  # padded rows
    tokenizer = processor.tokenizer
    for row, (turns, sample) in enumerate(zip(conversations, samples)):
        done, images = 0, []  # tokens checked so far, images so far
        for i, (_, answer_text, turn_images) in enumerate(turns):
            images += turn_images
            prompt = apply_chat_template(processor, None, messages_of(turns[: i + 1], image_paths=False)[:-1])
            prompt_ids = processor(prompt, [str(IMAGES / name) for name in images])["input_ids"][0].tolist()
            # The prompt is generate's, token for token; the loss covers the answers and their end markers only.
            assert sample.input_ids[: len(prompt_ids)].tolist() == prompt_ids, f"{family} sample {row} turn {i}"
            assert not sample.loss_mask[done : len(prompt_ids)].any()
            stop = end_of_run(sample.loss_mask, len(prompt_ids))
            answer = sample.input_ids[len(prompt_ids) : stop].tolist()
            decoded = tokenizer.decode(answer, skip_special_tokens=True)
            if family in REWRITES_HISTORY:  # the prompt opens the thinking block; the answer closes it first
                assert decoded.startswith("\n</think>\n\n")
                decoded = decoded.split("</think>")[-1]
            assert decoded.strip() == answer_text
            if i == len(turns) - 1:
                assert stop == len(sample)
                assert processor.eos_token_ids.intersection(answer), f"{family}: the answer never stops"
            expected = -inference_answer_logprobs(model, processor, prompt, images, answer)
            ours = losses[row, len(prompt_ids) - 1 : stop - 1]
            np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=f"{family} sample {row} turn {i}")
            done = stop
        assert mask[row].sum() == sample.loss_mask.sum()
    # Without images the sample is the tokenizer's own encoding of the rendered conversation (the answer is not
    # tokenized apart from its context), plus an EOS where the template writes no stop.
    text_only = samples[2].input_ids.tolist()
    rendered = tokenizer.apply_chat_template(
        messages_of(CONVERSATIONS[2]), chat_template=processor.chat_template, tokenize=False
    )
    encoded = processor.token_ids(rendered)
    assert text_only in (encoded, encoded + [tokenizer.eos_token_id])


# Training data holds image conversations: audio samples are not supported by vlm train yet.
@pytest.mark.slow  # a few training steps per family
@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_a_few_lora_steps_on_image_samples_cut_the_loss(tmp_path: Path, family: str) -> None:
    """Adapters on the decoder, the vision tower and the projector (where it has linear layers): the loss falls,
    and the vision tower's adapters learn too, so the gradient reaches the pixels."""
    data = training_data(tmp_path, CONVERSATIONS[:3])
    path = published(family)
    lora = LoRAConfig(targets=("language", "vision", "projector"))
    config = TrainingConfig(
        model=str(path),
        train_data=str(data),
        output=str(tmp_path / "out"),
        steps=8,
        batch_size=3,
        learning_rate=1e-2,
        lr_schedule="constant",
        lora=lora,
        progress=False,
    )
    model, processor = load(path)
    vision = set(target_paths(model, LoRAConfig(targets=("vision",))))
    assert vision
    trainer = Trainer(model, processor, config, report=lambda message: None)
    assert [len(s.image_inputs) > 0 for s in trainer.train_samples] == [True, True, False]
    before = trainer.evaluate(trainer.train_samples)
    for _ in range(config.steps):
        trainer.train_step()
    after = trainer.evaluate(trainer.train_samples)
    assert after < 0.7 * before, (family, before, after)
    learned = {path for path, m in model.named_modules() if isinstance(m, LoRALinear) and mx.any(m.lora_b != 0)}
    # Most of them: a tower whose features come from an earlier layer (LLaVA's -2) leaves the last one unused.
    assert len(vision & learned) > len(vision) / 2, sorted(vision - learned)


def _picture(seed: int, height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def image_processors() -> dict[str, object]:
    return {family: load(published(family))[1].image_processor for family in IMAGE_FAMILIES}


@given(
    family=st.sampled_from(IMAGE_FAMILIES),
    sizes=st.lists(st.tuples(st.integers(8, 120), st.integers(8, 120)), min_size=2, max_size=4),
    cut=st.integers(1, 3),
)
@settings(max_examples=25, deadline=None)
def test_collating_samples_equals_one_call_over_their_images(image_processors, family, sizes, cut) -> None:
    """Images split between samples and collated are the inputs one prompt holding them all would get (for
    Idefics3, whose first axis is the prompt, the same frames in order once the all-zero padding is dropped)."""
    processor = image_processors[family]
    pictures = [_picture(i, h, w) for i, (h, w) in enumerate(sizes)]
    cut = min(cut, len(pictures) - 1)
    split = processor.collate([processor(pictures[:cut]), processor(pictures[cut:])])
    whole = processor(pictures)
    for outputs in (split, whole):
        outputs.pop("rows_cols", None)  # Idefics3's tile grids: prompt expansion only, no model input
    if family in ("idefics3", "smolvlm"):
        split, whole = _real_frames(split), _real_frames(whole)
    assert set(split) == set(whole)
    for name, value in whole.items():
        np.testing.assert_array_equal(split[name], value, err_msg=f"{family} {name}")


def _real_frames(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Idefics3's (prompts, frames, ...) inputs as one list of frames, without the all-zero padding ones."""
    flat = {name: value.reshape(-1, *value.shape[2:]) for name, value in outputs.items()}
    pixels = flat["pixel_values"]
    real = np.abs(pixels).reshape(len(pixels), -1).max(axis=1) > 0
    return {name: value[real] for name, value in flat.items()}
