"""Chat samples: the loss mask covers exactly the assistant turns; bad samples are reported with file and line;
batches cover every sample and pad without leaking into the masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_train.data import BadSampleError, DataError, collate, encode_messages, epoch_batches, load_samples

from .conftest import IMAGE, chat, write_jsonl

TEXT = st.text(alphabet="abcdefghij klmnop.,?!'0123", min_size=1, max_size=30)


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": [{"type": "text", "text": draw(TEXT)}]})
        messages.append({"role": "assistant", "content": draw(TEXT)})
    return messages


@given(messages=conversations())
@settings(max_examples=40, deadline=None)
def test_loss_mask_is_exactly_the_assistant_turns(float_processor, messages) -> None:
    sample = encode_messages(float_processor, messages)
    tokenizer = float_processor.tokenizer

    def text_of(ids) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # The masked tokens spell the answers, each with the end-of-turn marker the model must learn to emit ...
    assert text_of(sample.input_ids[sample.loss_mask]) == "".join(f"{a}<|im_end|>\n" for a in answers)
    # ... and the rest spells everything else: system, user turns and the assistant headers, in order.
    rest = text_of(sample.input_ids[~sample.loss_mask])
    full = text_of(sample.input_ids)
    assert full == tokenizer.apply_chat_template(messages, chat_template=float_processor.chat_template, tokenize=False)
    for message in messages:
        if message["role"] != "assistant":
            text = message["content"] if isinstance(message["content"], str) else message["content"][0]["text"]
            assert text in rest
    assert rest.count("<|im_start|>assistant\n") == len(answers)


def test_images_expand_into_placeholders_outside_the_mask(float_processor) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A circle."},
    ]
    sample = encode_messages(float_processor, messages, [str(IMAGE)])
    pad_id = float_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_image_tokens = int((sample.input_ids == pad_id).sum())
    grid = sample.image_inputs["image_grid_thw"][0]
    assert n_image_tokens == float_processor.image_processor.num_image_tokens(grid) > 0
    assert not sample.loss_mask[sample.input_ids == pad_id].any()
    assert sample.image_inputs["pixel_values"].shape[0] == int(np.prod(grid))


def _bad_file(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "train.jsonl",
        [
            chat("Good?", "Yes.", str(IMAGE)),
            chat("Where?", "Nowhere.", "missing.png"),
            {"messages": [{"role": "user", "content": "Only a question"}]},
            chat("Long?", "word " * 200),
            "{not json",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "video", "video": "a.mp4"}]},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "",
            chat("Fine?", "Fine."),
        ],
    )


def test_bad_samples_are_reported_with_file_and_line_and_skipped(tmp_path: Path, float_processor) -> None:
    file = _bad_file(tmp_path)
    reported = []
    samples, bad = load_samples(file, float_processor, max_length=200, on_bad_sample="skip", report=reported.append)
    assert [s.source for s in samples] == [f"{file}:1", f"{file}:8"]
    assert reported == bad
    by_line = {b.source.rsplit(":", 1)[1]: b.reason for b in bad}
    assert set(by_line) == {"2", "3", "4", "5", "6"}
    assert "missing.png" in by_line["2"] and "not found" in by_line["2"]
    assert "no assistant turn" in by_line["3"]
    assert "longer than the maximum length 200" in by_line["4"]
    assert "not valid JSON" in by_line["5"]
    assert "video" in by_line["6"]
    assert all(str(b).startswith(f"{file}:") for b in bad)


def test_bad_sample_stops_the_run_when_asked(tmp_path: Path, float_processor) -> None:
    file = _bad_file(tmp_path)
    with pytest.raises(BadSampleError) as info:
        load_samples(file, float_processor, max_length=200, on_bad_sample="error", report=lambda b: None)
    message = str(info.value)
    assert message.startswith(f"{file}:2: ") and "missing.png" in message and "\n" not in message


def test_a_file_with_no_usable_sample(tmp_path: Path, float_processor) -> None:
    file = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="no usable sample"):
        load_samples(file, float_processor, max_length=200, on_bad_sample="skip", report=lambda b: None)


def test_relative_image_paths_are_relative_to_the_file(tmp_path: Path, float_processor) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(IMAGE.read_bytes())
    file = write_jsonl(tmp_path / "train.jsonl", [json.dumps(chat("What?", "That.", "pics/a.png"))])
    samples, bad = load_samples(file, float_processor, max_length=500, on_bad_sample="error", report=lambda b: None)
    assert not bad and "pixel_values" in samples[0].image_inputs


@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=80),
    batch_size=st.integers(1, 8),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
)
@settings(max_examples=60, deadline=None)
def test_every_sample_once_per_epoch_in_a_reproducible_order(lengths, batch_size, seed, epoch) -> None:
    batches = epoch_batches(lengths, batch_size, seed, epoch)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert batches == epoch_batches(lengths, batch_size, seed, epoch)


def test_length_grouping_pads_less_than_random_batches() -> None:
    lengths = np.random.default_rng(0).integers(10, 1000, 512).tolist()
    grouped = epoch_batches(lengths, 8, seed=0, epoch=0)
    order = np.random.default_rng(1).permutation(512).tolist()
    shuffled = [order[i : i + 8] for i in range(0, 512, 8)]

    def padding(batches) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(shuffled) / 3


def test_collate_pads_right_and_masks_padding(float_processor) -> None:
    short = encode_messages(float_processor, chat("Hi?", "Yes.")["messages"])
    long = encode_messages(float_processor, chat("What is the colour of the sky today?", "Blue, mostly.")["messages"])
    batch = collate([short, long], 344, float_processor.image_processor)
    ids, attention, loss = (np.array(a) for a in (batch.input_ids, batch.attention_mask, batch.loss_mask))
    assert ids.shape == (2, len(long))
    assert attention[0].sum() == len(short) and attention[1].all()
    assert (ids[0, len(short) :] == 344).all()
    assert not loss[0, len(short) :].any()
    assert np.array_equal(loss[1], long.loss_mask)
    assert batch.inputs == {} and batch.n_tokens == len(short) + len(long)


def test_images_by_url(tmp_path: Path, float_processor) -> None:
    import http.server
    import threading

    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "a.png").write_bytes(IMAGE.read_bytes())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "served"), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
        question = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
        row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "A picture."}]}
        file = write_jsonl(tmp_path / "train.jsonl", [row])
        samples, bad = load_samples(file, float_processor, max_length=500, on_bad_sample="error", report=lambda b: None)
    finally:
        server.shutdown()
    assert not bad and "pixel_values" in samples[0].image_inputs


def test_an_image_after_the_last_answer_is_a_bad_sample(tmp_path: Path, float_processor) -> None:
    row = chat("What?", "That.", str(IMAGE))
    row["messages"].append({"role": "user", "content": [{"type": "image", "image": str(IMAGE)}]})
    file = write_jsonl(tmp_path / "train.jsonl", [row, chat("Fine?", "Fine.")])
    samples, bad = load_samples(file, float_processor, max_length=500, on_bad_sample="skip", report=lambda b: None)
    assert len(samples) == 1 and [b.source for b in bad] == [f"{file}:1"]
    assert "after the last assistant turn" in bad[0].reason


def test_samples_about_one_image_share_its_pixels(tmp_path):
    """Consecutive questions about the same image keep one copy of its processed pixels (equal values, one array);
    a different image keeps its own."""
    from vlm_models import load
    from vlm_train.data import load_samples
    from vlm_train.shapes import write_dataset

    write_dataset(tmp_path, count=2, val_count=0, size=56)
    _, processor = load(str(Path(__file__).resolve().parents[1] / "fixtures" / "qwen2_vl" / "hf4"))
    samples, _ = load_samples(
        tmp_path / "train.jsonl", processor, max_length=512, on_bad_sample="error", report=lambda bad: None
    )
    images = [
        json.loads(line)["messages"][0]["content"][0]["image"]
        for line in (tmp_path / "train.jsonl").read_text().splitlines()
    ]
    for (a, image_a), (b, image_b) in zip(zip(samples, images), zip(samples[1:], images[1:])):
        same = a.image_inputs["pixel_values"] is b.image_inputs["pixel_values"]
        assert same == (image_a == image_b)
    fresh = processor.image_processor([processor_image(tmp_path / images[-1])])["pixel_values"]
    np.testing.assert_array_equal(samples[-1].image_inputs["pixel_values"], fresh)


def processor_image(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_encoding_in_worker_processes_gives_the_same_samples(tmp_path):
    """``workers`` > 1: the same samples in the same order, the same bad-sample reports, pixels still shared."""
    from vlm_models import load
    from vlm_train.shapes import write_dataset

    write_dataset(tmp_path, count=3, val_count=0, size=56)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write("not json\n")
    _, processor = load(str(Path(__file__).resolve().parents[1] / "fixtures" / "qwen2_vl" / "hf4"))

    def encode(workers: int):
        reports = []
        samples, bad = load_samples(
            tmp_path / "train.jsonl",
            processor,
            max_length=512,
            on_bad_sample="skip",
            report=reports.append,
            workers=workers,
        )
        return samples, bad, reports

    serial, parallel = encode(1), encode(2)
    assert [str(b) for b in serial[1]] == [str(b) for b in parallel[1]] == [str(r) for r in parallel[2]]
    assert len(serial[0]) == len(parallel[0]) > 10
    for a, b in zip(serial[0], parallel[0]):
        assert a.source == b.source
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_array_equal(a.image_inputs["pixel_values"], b.image_inputs["pixel_values"])
    assert parallel[0][0].image_inputs["pixel_values"] is parallel[0][1].image_inputs["pixel_values"]
