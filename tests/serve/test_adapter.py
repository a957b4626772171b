"""``vlm serve --adapter-path``: the server loads the base model with a LoRA adapter written by ``vlm train`` and
answers as that fine-tuned model does."""

from __future__ import annotations

from pathlib import Path

import openai

from vlm_models import apply_chat_template, load
from vlm_runtime import generate

from ..train.test_adapters import trained_adapter
from .conftest import MODEL, start

MESSAGES = [{"role": "user", "content": "What shape is it?"}]


def test_server_answers_with_the_adapter(tmp_path: Path) -> None:
    from vlm_serve import ModelHost, ServeSettings, create_app

    adapter, _ = trained_adapter(tmp_path)
    tuned, processor = load(MODEL, adapter_path=adapter)
    prompt = apply_chat_template(processor, None, MESSAGES)
    expected = generate(tuned, processor, prompt, max_tokens=12, ignore_eos=True).text
    base, _ = load(MODEL)
    assert generate(base, processor, prompt, max_tokens=12, ignore_eos=True).text != expected

    settings = ServeSettings(model=str(MODEL), adapter_path=str(adapter))
    engine = ModelHost(settings)  # loads the model itself, adapter applied, on the first request
    server, thread, url = start(create_app(engine, settings))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=str(MODEL), messages=MESSAGES, max_tokens=12, extra_body={"ignore_eos": True}
        )
        assert reply.choices[0].message.content == expected
    finally:
        server.should_exit = True
        thread.join(20)
        engine.close()
