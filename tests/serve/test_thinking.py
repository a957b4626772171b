"""Reasoning comes back apart from the answer: the fixture checkpoint with <think> / </think> added to its
tokenizer and a template that opens the block when asked."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from vlm_models import apply_chat_template, load
from vlm_runtime import generate

from .conftest import MODEL, Server, start

BUDGET = 5


def thinking_checkpoint(folder: Path) -> Path:
    shutil.copytree(MODEL, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for token_id, text in ((352, "<think>"), (353, "</think>")):  # free ids below the model's vocab of 384
        entry = {
            "id": token_id,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": False,
        }
        tokenizer["added_tokens"].append(entry)
        config["added_tokens_decoder"][str(token_id)] = {k: v for k, v in entry.items() if k != "id"}
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    opening = "{{- '<|im_start|>assistant\\n' -}}"
    assert opening in template
    template = template.replace(opening, opening + "{%- if enable_thinking -%}{{- '<think>\\n' -}}{%- endif -%}")
    config["chat_template"] = template
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return folder


@pytest.fixture(scope="module")
def thinker(tmp_path_factory) -> Iterator[tuple[Server, tuple]]:
    from vlm_serve import ModelHost, ServeSettings, create_app

    path = thinking_checkpoint(tmp_path_factory.mktemp("thinking") / "model")
    loaded = load(path)
    settings = ServeSettings(model=str(path), context_length=1024)
    app = create_app(ModelHost.from_model(str(path), *loaded, settings, context_length=1024), settings)
    server, thread, url = start(app)
    try:
        yield Server(url, str(path), app), loaded
    finally:
        server.should_exit = True
        thread.join(20)


def reference(loaded, prompt_text: str):
    model, processor = loaded
    prompt = apply_chat_template(processor, None, [{"role": "user", "content": prompt_text}], enable_thinking=True)
    return generate(model, processor, prompt, max_tokens=20, thinking_budget=BUDGET)


def test_openai_reasoning_content(thinker) -> None:
    server, loaded = thinker
    expected = reference(loaded, "think first")
    assert expected.reasoning and expected.text  # the budget closes the block, then the answer follows
    client = openai.OpenAI(base_url=server.base, api_key="x", max_retries=0)
    extra = {"enable_thinking": True, "thinking_budget": BUDGET}
    response = client.chat.completions.create(
        model=server.model_id, messages=[{"role": "user", "content": "think first"}], max_tokens=20, extra_body=extra
    )
    message = response.choices[0].message
    assert message.content == expected.text and message.model_extra["reasoning_content"] == expected.reasoning
    chunks = list(
        client.chat.completions.create(
            model=server.model_id,
            messages=[{"role": "user", "content": "think first"}],
            max_tokens=20,
            stream=True,
            extra_body=extra,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == expected.reasoning
    assert "".join(d.content or "" for d in deltas) == expected.text


def test_anthropic_thinking_block(thinker) -> None:
    server, loaded = thinker
    expected = reference(loaded, "ponder")
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    thinking = {"type": "enabled", "budget_tokens": BUDGET}
    message = client.messages.create(
        model=server.model_id, max_tokens=20, messages=[{"role": "user", "content": "ponder"}], thinking=thinking
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == expected.reasoning and message.content[1].text == expected.text
    with client.messages.stream(
        model=server.model_id, max_tokens=20, messages=[{"role": "user", "content": "ponder"}], thinking=thinking
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == expected.reasoning and final.content[1].text == expected.text


def test_thinking_with_structured_output_is_refused(thinker) -> None:
    server, _ = thinker
    client = openai.OpenAI(base_url=server.base, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="thinking"):
        client.chat.completions.create(
            model=server.model_id,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_object"},
            extra_body={"enable_thinking": True},
        )
