"""Training data from tables: parquet files and Hugging Face ``datasets`` folders (Arrow shards written by
``save_to_disk``), read with pyarrow (the ``vlm-train[datasets]`` extra).

A row becomes a chat sample: a ``messages`` column is used as is (path-less image items take the row's
``images`` in order); otherwise an image column and question / answer columns make one user turn (image, then
question) and one assistant turn.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TABLE_SUFFIXES", "TableColumns", "is_table", "read_rows", "row_to_record", "table_files"]

TABLE_SUFFIXES = (".parquet", ".arrow")
_IMAGE_COLUMNS = ("image", "images", "img", "picture")
_QUESTION_COLUMNS = ("question", "query", "prompt", "instruction", "user")
_ANSWER_COLUMNS = ("answer", "response", "output", "caption", "text", "assistant")


@dataclass(frozen=True)
class TableColumns:
    """Column names; ``None`` picks the first present of the usual names."""

    image: str | None = None
    question: str | None = None
    answer: str | None = None


def is_table(path: Path) -> bool:
    return path.suffix in TABLE_SUFFIXES or (path.is_dir() and bool(table_files(path)))


def table_files(path: Path) -> list[Path]:
    """The shards of a split: the file itself, the files a glob names (``train-*.parquet``), or the parquet /
    arrow files in a folder, sorted."""
    if "*" in path.name:
        return sorted(path.parent.glob(path.name))
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.suffix in TABLE_SUFFIXES and p.is_file())


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ValueError("reading parquet or Arrow data needs pyarrow: pip install 'vlm-train[datasets]'") from None
    return pyarrow


def _batches(file: Path) -> Iterator[Any]:
    pa = _pyarrow()
    try:
        if file.suffix == ".parquet":
            yield from pa.parquet.ParquetFile(file).iter_batches(batch_size=256)
            return
        with file.open("rb") as handle:
            try:
                reader = pa.ipc.open_stream(handle)  # what datasets' save_to_disk writes
            except pa.ArrowInvalid:
                handle.seek(0)
                reader = pa.ipc.open_file(handle)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                return
            yield from reader
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"cannot read {file}: {exc}") from None


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(source, row)`` for every row of every shard; the source is ``file:row N`` (1-based)."""
    for file in table_files(path):
        number = 0
        for batch in _batches(file):
            for row in batch.to_pylist():
                number += 1
                yield f"{file}:row {number}", row


def _pick(row: Mapping[str, Any], chosen: str | None, candidates: tuple[str, ...], what: str) -> str | None:
    if chosen is not None:
        if chosen not in row:
            raise ValueError(f"no {what} column {chosen!r} (columns: {', '.join(row)})")
        return chosen
    return next((c for c in candidates if c in row), None)


def _image_value(value: Any) -> Any:
    """A path, URL or encoded bytes; datasets' Image feature stores ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, Mapping):
        return value.get("bytes") or value.get("path")
    return value


def row_to_record(row: Mapping[str, Any], columns: TableColumns) -> dict[str, Any]:
    """The JSONL form of one row (raises ValueError naming what is missing)."""
    image_column = _pick(row, columns.image, _IMAGE_COLUMNS, "image")
    images = row.get(image_column) if image_column else None
    if images is not None and not isinstance(images, list):
        images = [images]
    images = [_image_value(v) for v in images or [] if v is not None]
    if "messages" in row and row["messages"] is not None:
        return {"messages": row["messages"], "images": images}
    question = _pick(row, columns.question, _QUESTION_COLUMNS, "question")
    answer = _pick(row, columns.answer, _ANSWER_COLUMNS, "answer")
    if answer is None:
        raise ValueError(f"no 'messages' and no answer column (columns: {', '.join(row)})")
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    if question is not None and row[question]:
        content.append({"type": "text", "text": str(row[question])})
    if not content:
        raise ValueError("the row has neither an image nor a question")
    messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if row[answer] is not None and str(row[answer]):
        messages.append({"role": "assistant", "content": str(row[answer])})
    return {"messages": messages}
