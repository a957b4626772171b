"""Chat samples from JSONL, encoded through the checkpoint's own chat template and processor (so each assistant
turn follows exactly the prompt ``generate`` would see) with a loss mask on the assistant turns, and
padding-aware batches of them, collated the way each family's image processor says.

A line is ``{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
{"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}``; content may be a string, image
items may also be ``{"type": "image_url", "image_url": {"url": ...}}``, and relative image paths are relative to
the JSONL file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from vlm_models.inputs import Processor
from vlm_models.processors.image import ImageLoadError, load_image

__all__ = [
    "BadSample",
    "BadSampleError",
    "Batch",
    "DataError",
    "EncodedSample",
    "collate",
    "encode_messages",
    "epoch_batches",
    "load_samples",
    "resolve_data_files",
]

_REMOTE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|data:)", re.IGNORECASE)


class DataError(ValueError):
    """The data cannot be used at all (no file, nothing left after skipping bad samples)."""


class BadSampleError(DataError):
    """One sample is unusable and ``--on-bad-sample error`` was chosen; the message starts with ``file:line``."""


class _SampleProblem(ValueError):
    """Raised while encoding one sample; becomes a :class:`BadSample` with the sample's source."""


@dataclass(frozen=True)
class BadSample:
    source: str
    """``file:line``."""
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class EncodedSample:
    source: str
    input_ids: np.ndarray
    """(length,) int32 token ids, image placeholders expanded."""
    loss_mask: np.ndarray
    """(length,) bool: True on the tokens the model learns to produce (the assistant turns)."""
    image_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    """The image processor's outputs for the sample's images (``pixel_values`` and what goes with it); empty
    for a text-only sample."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        return int(self.loss_mask[1:].sum())


@dataclass
class Batch:
    input_ids: mx.array
    attention_mask: mx.array
    loss_mask: mx.array
    inputs: dict[str, mx.array] = field(default_factory=dict)
    """The other model inputs: the samples' images as the image processor collates them, and per-token extras
    (PaliGemma's ``token_type_ids``)."""

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum().item())

    def model_inputs(self) -> dict[str, mx.array]:
        """Keyword arguments for ``model(...)``, named as the Hugging Face processor names them."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.inputs}


_VALID_NAMES = ("valid", "validation", "val")


def _split_in(folder: Path, names: tuple[str, ...]) -> Path | None:
    """``folder/<name>.jsonl``, a ``folder/<name>/`` split folder of shards, or ``<name>*`` shard files."""
    from .tables import TABLE_SUFFIXES, table_files

    for name in names:
        if (folder / f"{name}.jsonl").is_file():
            return folder / f"{name}.jsonl"
        if (folder / name).is_dir() and table_files(folder / name):
            return folder / name
        for suffix in TABLE_SUFFIXES:
            shards = sorted(folder.glob(f"{name}-*{suffix}")) + sorted(folder.glob(f"{name}{suffix}"))
            if shards:
                return shards[0] if len(shards) == 1 else folder / f"{name}-*{suffix}"  # a glob of the shards
    return None


def resolve_data_files(data: str | Path, val_data: str | Path | None) -> tuple[Path, Path | None]:
    """Where the training and validation splits are. ``data`` is a JSONL, parquet or Arrow file, or a folder:
    with ``train.jsonl`` (and ``valid.jsonl``); with ``train/`` and ``validation/`` split folders (a ``datasets``
    DatasetDict saved to disk, or a hub download's ``data/``); with ``train-*.parquet`` shards; or holding the
    shards of one split itself (a saved Dataset)."""
    from .tables import table_files

    path = Path(data)
    val = Path(val_data) if val_data else None
    if val is not None and not val.exists():
        raise DataError(f"validation data not found: {val}")
    if path.is_file():
        return path, val
    if not path.is_dir():
        raise DataError(f"training data not found: {path}")
    for folder in (path, path / "data"):
        if not folder.is_dir():
            continue
        train = _split_in(folder, ("train",))
        if train is not None:
            return train, val if val is not None else _split_in(folder, _VALID_NAMES)
    if table_files(path):
        return path, val
    raise DataError(f"{path} holds no train.jsonl, train split or parquet/arrow shards")


def _records(path: Path) -> tuple[int | None, Any]:
    """``(count or None, iterator of (source, raw record))``: JSON text for JSONL lines, dicts for table rows."""
    from .tables import is_table, read_rows

    if is_table(path):
        return None, read_rows(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    return len(lines), ((f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip())


# --------------------------------------------------------------------------------------------------- encoding


def _image_source(item: Mapping[str, Any], row_images: list[Any]) -> Any:
    value = item.get("image", item.get("image_url"))
    if isinstance(value, Mapping):
        value = value.get("url") or value.get("bytes") or value.get("path")
    if value is None and row_images:
        return row_images.pop(0)  # a path-less image item takes the sample's next image
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise _SampleProblem(f"an image item has no path or URL: {str(dict(item))[:200]}")
    return value


def _normalise(messages: Any, base: Path, row_images: Sequence[Any] = ()) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages in the template's form (image items become ``{"type": "image"}``) and the image sources."""
    if not isinstance(messages, list) or not messages:
        raise _SampleProblem("'messages' must be a non-empty list")
    pending = list(row_images)
    out, images = [], []
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise _SampleProblem("every message needs a 'role'")
        content = message.get("content")
        if isinstance(content, str):
            # As a text item: some templates (Idefics3's) render only content lists.
            out.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise _SampleProblem(f"a {message['role']} message has no text or content list")
        items = []
        for item in content:
            if not isinstance(item, Mapping):
                raise _SampleProblem("content items must be objects")
            kind = item.get("type") or ("image" if item.get("image") or item.get("image_url") else "text")
            if kind in ("image", "image_url"):
                source = _image_source(item, pending)
                if isinstance(source, str) and not _REMOTE.match(source) and not Path(source).is_absolute():
                    source = str(base / source)
                images.append(source)
                items.append({"type": "image"})
            elif kind == "text":
                items.append({"type": "text", "text": str(item.get("text") or "")})
            else:
                raise _SampleProblem(f"unsupported content type {kind!r} (text and images only)")
        out.append({"role": message["role"], "content": items})
    if pending:
        raise _SampleProblem(f"{len(pending)} image(s) of the sample have no image item in the messages")
    return out, images


def _render(processor: Processor, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    return processor.tokenizer.apply_chat_template(
        list(messages), chat_template=processor.chat_template, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(processor: Processor, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (its text and end marker, not
    the role header the template writes before it)."""
    full = _render(processor, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(processor, messages[:i], True)
        through = _render(processor, messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise _SampleProblem(
                f"the chat template does not render turn {i + 1} as a prefix of the conversation, so the assistant"
                " tokens cannot be located"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_messages(
    processor: Processor, messages: Sequence[Mapping[str, Any]], images: Sequence[Any] = (), source: str = ""
) -> EncodedSample:
    """Tokens of the whole conversation, with the loss mask on the assistant turns only.

    Each assistant turn follows its prompt (the conversation before it with the generation prompt) as the
    processor encodes that prompt for ``generate``: the family's image expansion, ``<bos>`` and framing. The turn
    is its rendered text and end-of-turn marker; where the template writes no marker that the checkpoint stops
    on (PaliGemma, LLaVA 1.5), the last turn ends with the tokenizer's EOS, so the model learns to stop."""
    if processor.chat_template is None:
        raise DataError("the checkpoint has no chat template, so chat samples cannot be formatted")
    if not any(m["role"] == "assistant" for m in messages):
        raise _SampleProblem("no assistant turn, nothing to learn")
    text, spans = assistant_spans(processor, messages)
    token = processor.image_token
    if text.count(token) != len(images):
        raise _SampleProblem(f"the conversation has {text.count(token)} image slot(s) but {len(images)} image(s)")
    if token in text[spans[-1][1] :]:
        raise _SampleProblem("an image comes after the last assistant turn, so nothing learns from it")
    try:
        pictures = [load_image(image) for image in images]
    except ImageLoadError as exc:
        raise _SampleProblem(str(exc)) from None

    ids: list[int] = []
    mask: list[bool] = []
    outputs: dict[str, np.ndarray] = {}
    for turn, (start, end) in enumerate(spans):
        try:
            prompt, outputs = processor.expand(text[:start], pictures[: text[:start].count(token)])
        except ValueError as exc:  # an image the processor cannot take (an extreme aspect ratio, ...)
            raise _SampleProblem(f"cannot process the images: {exc}") from None
        prompt_ids = processor.token_ids(prompt)
        if prompt_ids[: len(ids)] != ids:
            raise _SampleProblem(
                f"the prompt of assistant turn {turn + 1} does not start with the tokens of the conversation before"
                " it (the template or tokenizer writes earlier turns differently), so it is not one sequence"
            )
        mask.extend([False] * (len(prompt_ids) - len(ids)))
        answer = _answer_ids(processor, prompt, prompt_ids, text[start:end])
        eos = processor.tokenizer.eos_token_id
        if turn == len(spans) - 1 and eos is not None and not processor.eos_token_ids.intersection(answer):
            answer.append(int(eos))
        ids = prompt_ids + answer
        mask.extend([True] * len(answer))
    return EncodedSample(
        source=source,
        input_ids=np.asarray(ids, dtype=np.int32),
        loss_mask=np.asarray(mask, dtype=bool),
        image_inputs=outputs,
    )


def _answer_ids(processor: Processor, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
    """The answer's tokens as they follow the prompt in one encoding of both (a tokenizer that marks a word start
    would give an answer encoded alone a spurious one); encoded alone where a token spans the boundary."""
    whole = processor.token_ids(prompt + answer)
    if whole[: len(prompt_ids)] == prompt_ids:
        return whole[len(prompt_ids) :]
    return list(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])


def load_samples(
    file: Path,
    processor: Processor,
    *,
    max_length: int,
    on_bad_sample: str,
    report: Callable[[BadSample], None],
    progress: bool = False,
    columns: Any = None,
    workers: int = 1,
) -> tuple[list[EncodedSample], list[BadSample]]:
    """Every usable sample of ``file`` (JSONL, or a parquet / Arrow table read with ``columns``, a
    :class:`vlm_train.tables.TableColumns`); bad ones are reported (and skipped) or, with
    ``on_bad_sample="error"``, stop the run with :class:`BadSampleError` before any training. ``workers`` > 1
    encodes in that many processes; the samples, their order and the reports are the same."""
    from tqdm import tqdm

    from .tables import TableColumns

    columns = columns or TableColumns()
    total, records = _records(file)
    base = file.parent if file.is_file() or not file.exists() else file
    encoder = _Encoder(processor, max_length, columns, base)
    if workers > 1:
        results = _encode_in_processes(encoder, list(records), workers, progress, file.name)
    else:
        bar = tqdm(records, total=total, desc=f"encoding {file.name}", unit="sample", disable=not progress)
        results = (encoder(source, raw) for source, raw in bar)
    samples, bad = [], []
    for result in results:
        if isinstance(result, BadSample):
            if on_bad_sample == "error":
                raise BadSampleError(str(result)) from None
            bad.append(result)
            report(result)
            continue
        if samples:
            _share_image_inputs(result, samples[-1])
        samples.append(result)
    if not samples:
        raise DataError(f"{file} has no usable sample ({len(bad)} bad)")
    return samples, bad


@dataclass
class _Encoder:
    """One record to an :class:`EncodedSample`, or the :class:`BadSample` saying why not (picklable, so worker
    processes can run it)."""

    processor: Processor
    max_length: int
    columns: Any
    base: Path

    def __call__(self, source: str, raw: Any) -> EncodedSample | BadSample:
        from .tables import row_to_record

        try:
            if isinstance(raw, str):
                record = _parse_line(raw)
            else:
                try:
                    record = row_to_record(raw, self.columns)
                except ValueError as exc:
                    raise _SampleProblem(str(exc)) from None
            messages, images = _normalise(record["messages"], self.base, record.get("images") or ())
            sample = encode_messages(self.processor, messages, images, source)
            if len(sample) > self.max_length:
                raise _SampleProblem(f"{len(sample)} tokens, longer than the maximum length {self.max_length}")
            if sample.n_loss_tokens == 0:
                raise _SampleProblem("the assistant turns encode to no tokens")
        except _SampleProblem as exc:
            return BadSample(source, str(exc))
        return sample


_worker_encoder: _Encoder | None = None


def _start_worker(encoder: bytes) -> None:
    import pickle

    from vlm_models.loading import _auto_tokenizer

    global _worker_encoder
    _auto_tokenizer()  # transformers imported without its "PyTorch was not found" advice, before the processor
    _worker_encoder = pickle.loads(encoder)


def _encode_chunk(chunk: list[tuple[str, Any]]) -> list[EncodedSample | BadSample]:
    assert _worker_encoder is not None
    results = [_worker_encoder(source, raw) for source, raw in chunk]
    previous = None
    for result in results:  # shared before pickling: one copy of an image's pixels crosses the pipe
        if isinstance(result, EncodedSample):
            if previous is not None:
                _share_image_inputs(result, previous)
            previous = result
    return results


def _encode_in_processes(
    encoder: _Encoder, records: list[tuple[str, Any]], workers: int, progress: bool, name: str
) -> Iterable[EncodedSample | BadSample]:
    import multiprocessing
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    size = max(1, min(2000, -(-len(records) // (workers * 4))))
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    # spawn, not fork: the parent may hold an accelerator context that a forked child must not inherit
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(pickle.dumps(encoder),)
    ) as pool:
        bar = tqdm(total=len(records), desc=f"encoding {name}", unit="sample", disable=not progress)
        for part in pool.map(_encode_chunk, chunks):
            bar.update(len(part))
            yield from part
        bar.close()


def _share_image_inputs(sample: EncodedSample, previous: EncodedSample) -> None:
    """Point ``sample``'s image arrays at ``previous``'s where they are equal: data sets ask several questions
    about one image in a row, and each copy of the pixels would otherwise stay in memory for the whole run."""
    for key, value in sample.image_inputs.items():
        before = previous.image_inputs.get(key)
        if before is not None and before.shape == value.shape and before.dtype == value.dtype:
            if np.array_equal(before, value):
                sample.image_inputs[key] = before


def _parse_line(line: str) -> Mapping[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _SampleProblem(f"not valid JSON: {exc}") from None
    if not isinstance(record, Mapping) or "messages" not in record:
        raise _SampleProblem("a sample must be an object with 'messages'")
    return record


# --------------------------------------------------------------------------------------------------- batching


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Sample indices grouped into batches of similar length (little padding), in a shuffled order that depends
    only on ``(seed, epoch)``, so a resumed run sees the batches the uninterrupted run would have."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    # Sort within windows of a few batches: similar lengths share a batch, yet the epoch stays shuffled.
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(samples: Iterable[EncodedSample], pad_id: int, image_processor: Any) -> Batch:
    """Right-padded token ids, attention and loss masks, the images of all samples in order as
    ``image_processor.collate`` (:class:`vlm_models.processors.image.SampleBatching`) joins them, and the
    per-token inputs it asks for."""
    samples = list(samples)
    width = max(len(s) for s in samples)
    ids = np.full((len(samples), width), pad_id, dtype=np.int32)
    attention = np.zeros((len(samples), width), dtype=np.int32)
    loss = np.zeros((len(samples), width), dtype=bool)
    for row, sample in enumerate(samples):
        ids[row, : len(sample)] = sample.input_ids
        attention[row, : len(sample)] = 1
        loss[row, : len(sample)] = sample.loss_mask
    inputs: dict[str, Any] = {}
    if image_processor is not None:  # None: a family that takes no images (Qwen2-Audio), text samples only
        inputs = image_processor.collate([s.image_inputs for s in samples if s.image_inputs])
        inputs.update(image_processor.answer_inputs(np.maximum.accumulate(loss, axis=1)))
    return Batch(mx.array(ids), mx.array(attention), mx.array(loss), {k: mx.array(v) for k, v in inputs.items()})
