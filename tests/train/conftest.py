"""Shared pieces for the vlm-train tests: the tiny fixture checkpoints and small chat data sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from vlm_models import load

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FLOAT_MODEL = FIXTURES / "qwen2_vl" / "hf4"
QUANTIZED_MODEL = FIXTURES / "qwen2_vl" / "mlx_community_4bit"
IMAGE = FIXTURES / "images" / "rgb_56x56.png"
OTHER_IMAGE = FIXTURES / "images" / "rgb_112x168.png"


def chat(question: str, answer: str, image: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image", "image": image}] if image else []
    content.append({"type": "text", "text": question})
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def small_dataset(folder: Path, n_train: int = 8, n_valid: int = 2) -> Path:
    """train.jsonl / valid.jsonl in ``folder``: short answers about two images, some samples text-only."""
    rows = []
    for i in range(n_train + n_valid):
        image = str(IMAGE if i % 2 else OTHER_IMAGE) if i % 3 else None
        rows.append(chat(f"What is item {i}?", f"Item {i} is a red circle.", image))
    write_jsonl(folder / "train.jsonl", rows[:n_train])
    write_jsonl(folder / "valid.jsonl", rows[n_train:])
    return folder


def probe_logits(model: Any, processor: Any) -> mx.array:
    """Logits of the model on a fixed prompt with an image."""
    from vlm_models import apply_chat_template

    prompt = apply_chat_template(processor, None, "What is item 3?", num_images=1)
    inputs = processor.prepare_inputs(prompt, [str(IMAGE)])
    logits = model(**inputs).logits
    mx.eval(logits)
    return logits


@pytest.fixture(scope="session")
def float_processor():
    return load(FLOAT_MODEL)[1]
