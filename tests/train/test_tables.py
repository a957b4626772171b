"""Parquet files and Hugging Face datasets folders (Arrow) as training data."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from vlm_train.data import BadSampleError, load_samples, resolve_data_files
from vlm_train.tables import TableColumns

from .conftest import IMAGE


def _image(path: Path = IMAGE) -> dict:
    """datasets' Image feature: encoded bytes plus the original path."""
    return {"bytes": path.read_bytes(), "path": path.name}


def qa_table(n: int = 4) -> pa.Table:
    return pa.table(
        {
            "image": [_image() for _ in range(n)],
            "question": [f"What is item {i}?" for i in range(n)],
            "answer": [f"Item {i}." for i in range(n)],
        }
    )


def _load(path: Path, processor, **kwargs):
    return load_samples(
        path, processor, max_length=500, on_bad_sample=kwargs.pop("policy", "error"), report=lambda bad: None, **kwargs
    )


def test_parquet_with_image_and_text_columns(tmp_path: Path, float_processor) -> None:
    pq.write_table(qa_table(), tmp_path / "train.parquet")
    samples, bad = _load(tmp_path / "train.parquet", float_processor)
    assert len(samples) == 4 and not bad
    assert all("pixel_values" in s.image_inputs for s in samples)
    answer = float_processor.tokenizer.decode(list(samples[2].input_ids[samples[2].loss_mask]))
    assert answer.startswith("Item 2.")
    assert samples[2].source == f"{tmp_path / 'train.parquet'}:row 3"


def test_custom_column_names(tmp_path: Path, float_processor) -> None:
    table = qa_table().rename_columns(["picture_bytes", "ask", "reply"])
    pq.write_table(table, tmp_path / "t.parquet")
    columns = TableColumns(image="picture_bytes", question="ask", answer="reply")
    samples, _ = _load(tmp_path / "t.parquet", float_processor, columns=columns)
    assert len(samples) == 4 and "pixel_values" in samples[0].image_inputs
    with pytest.raises(BadSampleError, match="row 1: no answer column 'nope'"):
        _load(tmp_path / "t.parquet", float_processor, columns=TableColumns(answer="nope"))


def test_messages_column_with_an_images_column(tmp_path: Path, float_processor) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
    ]
    table = pa.table({"messages": [messages, messages], "images": [[_image()], [_image()]]})
    pq.write_table(table, tmp_path / "m.parquet")
    samples, _ = _load(tmp_path / "m.parquet", float_processor)
    assert len(samples) == 2 and samples[0].image_inputs["image_grid_thw"].shape == (1, 3)


def test_bad_rows_are_reported_by_row(tmp_path: Path, float_processor) -> None:
    table = pa.table(
        {
            "image": [_image(), {"bytes": b"not an image", "path": "x.png"}, _image()],
            "question": ["Fine?", "Broken?", "No answer?"],
            "answer": ["Yes.", "No.", None],
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    samples, bad = _load(tmp_path / "train.parquet", float_processor, policy="skip")
    assert len(samples) == 1
    assert [b.source.rsplit(":", 1)[1] for b in bad] == ["row 2", "row 3"]
    assert "no assistant turn" in bad[1].reason


def test_datasets_save_to_disk_layout(tmp_path: Path, float_processor) -> None:
    """A DatasetDict saved to disk: train/ and validation/ folders of Arrow stream shards."""
    for split, n in (("train", 3), ("validation", 2)):
        folder = tmp_path / "ds" / split
        folder.mkdir(parents=True)
        table = qa_table(n)
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    train, valid = resolve_data_files(tmp_path / "ds", None)
    assert train == tmp_path / "ds" / "train" and valid == tmp_path / "ds" / "validation"
    assert len(_load(train, float_processor)[0]) == 3
    assert len(_load(valid, float_processor)[0]) == 2


def test_hub_style_parquet_shards(tmp_path: Path, float_processor) -> None:
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    pq.write_table(qa_table(2), data / "train-00000-of-00002.parquet")
    pq.write_table(qa_table(3), data / "train-00001-of-00002.parquet")
    pq.write_table(qa_table(1), data / "test-00000-of-00001.parquet")
    train, valid = resolve_data_files(tmp_path / "repo", None)
    assert valid is None
    assert len(_load(train, float_processor)[0]) == 5


def test_train_on_parquet_from_the_command_line(tmp_path: Path, capsys) -> None:
    from vlm_models.cli import main as vlm

    from .conftest import FLOAT_MODEL

    pq.write_table(qa_table().rename_columns(["image", "ask", "reply"]), tmp_path / "train.parquet")
    code = vlm(
        [
            "train",
            "--model",
            str(FLOAT_MODEL),
            "--data",
            str(tmp_path / "train.parquet"),
            "--question-column",
            "ask",
            "--answer-column",
            "reply",
            "--output",
            str(tmp_path / "out"),
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "adapters.safetensors").is_file()
