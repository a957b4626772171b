"""PaliGemma 2 specifics: the prompt layout without a chat template, the whole prompt attending both ways, and
clear refusals of what is not supported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from vlm_models import ModelLoadError, apply_chat_template, load

from .conftest import FIXTURES, Reference

ROOT = FIXTURES / "paligemma2"


@pytest.fixture(scope="module")
def loaded():
    return load(ROOT / "hf4")


def test_prompt_layout_follows_transformers(loaded) -> None:
    """Images first, then <bos>, the prompt and a newline; <bos> is not added twice even though the published
    tokenizer config asks for one."""
    _, processor = loaded
    ref = Reference("paligemma2")
    ours = processor("<image>caption en", [FIXTURES / "images" / "rgb_112x168.png"])
    np.testing.assert_array_equal(ours["input_ids"], ref.get("one_image", "input_ids"))
    ids = ours["input_ids"][0].tolist()
    bos, image = ref.meta["special_token_ids"]["<bos>"], ref.meta["special_token_ids"]["<image>"]
    assert ids[:16] == [image] * 16 and ids[16] == bos and ids.count(bos) == 1
    assert processor.decode(ids[17:]) == "caption en\n"


def test_without_a_chat_template_the_prompt_is_images_then_text(loaded) -> None:
    _, processor = loaded
    ref = Reference("paligemma2")
    for case in ("one_image", "two_images"):
        meta = ref.meta["cases"][case]
        task = meta["text"].replace("<image>", "")
        assert apply_chat_template(processor, None, task, num_images=len(meta["images"])) == meta["text"]


def test_the_whole_prompt_attends_both_ways(loaded) -> None:
    model, _ = loaded
    ref = Reference("paligemma2")
    inputs = {k: mx.array(v) for k, v in ref.inputs("one_image").items()}
    prompt = model.embed_prompt(**inputs)
    assert np.array(prompt.attention_groups).tolist() == [[0] * inputs["input_ids"].shape[1]]
    causal = np.array(model.compute_logits(model.hidden_states(prompt.inputs_embeds)))
    assert np.abs(causal - ref.get("one_image", "logits")).max() > 1.0, "the fixture must depend on the prefix"


def test_paligemma_1_is_refused_by_name(tmp_path: Path) -> None:
    path = Path(shutil.copytree(ROOT / "hf4", tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'gemma' text model is not supported"):
        load(path)
