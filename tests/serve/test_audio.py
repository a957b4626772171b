"""Audio over the OpenAI APIs: ``input_audio`` parts (base64 + format) in chat completions and in the Responses
API (kept for ``previous_response_id``) give what generate gives; image + audio in one message keep the order
written; bad clips, clips over the byte or duration caps, and audio for a model that does not hear get a 4xx in
the API's error shape, and the server keeps serving."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile

from vlm_models import apply_chat_template, load
from vlm_runtime import generate

from .conftest import ROOT, Server, make_server

FIXTURES = ROOT / "tests" / "fixtures"
AUDIO = FIXTURES / "audio"
CLIP = AUDIO / "two_tones.wav"


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def audio_part(data: str, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


@pytest.fixture(scope="module")
def qwen2_audio() -> tuple[Any, Any]:
    return load(FIXTURES / "qwen2_audio" / "hf4")


@pytest.fixture(scope="module")
def audio_server(qwen2_audio) -> Iterator[Server]:
    yield from make_server(qwen2_audio, max_media_bytes=200_000, max_audio_seconds=1.2, max_request_audio_seconds=2.2)


def chat(server: Server, content: list[dict[str, Any]], max_tokens: int = 6) -> httpx.Response:
    body = {"model": server.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return httpx.post(f"{server.base}/chat/completions", json=body, timeout=60)


def test_input_audio_matches_generate(audio_server, qwen2_audio) -> None:
    model, processor = qwen2_audio
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is it?"}]}]
    expected = generate(model, processor, apply_chat_template(processor, None, messages), audio=[CLIP], max_tokens=6)
    for fmt, data in (("wav", CLIP), ("flac", None)):
        if data is None:  # the same samples as FLAC: another decoder, the same answer
            samples, rate = soundfile.read(CLIP, dtype="float32")
            buffer = io.BytesIO()
            soundfile.write(buffer, samples, rate, format="FLAC")
            encoded = base64.b64encode(buffer.getvalue()).decode()
        else:
            encoded = b64(data)
        response = chat(audio_server, [audio_part(encoded, fmt), {"type": "text", "text": "What is it?"}])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"]["content"] == expected.text
        assert body["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_responses_input_audio_and_the_next_turn(audio_server, qwen2_audio) -> None:
    model, processor = qwen2_audio
    content = [audio_part(b64(CLIP)), {"type": "input_text", "text": "What is it?"}]
    body = {"model": audio_server.model_id, "input": [{"role": "user", "content": content}], "max_output_tokens": 5}
    first = httpx.post(f"{audio_server.base}/responses", json=body, timeout=60)
    assert first.status_code == 200, first.text
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is it?"}]}]
    expected = generate(model, processor, apply_chat_template(processor, None, messages), audio=[CLIP], max_tokens=5)
    answer = first.json()["output"][0]["content"][0]["text"]
    assert answer == expected.text
    follow = {"model": audio_server.model_id, "input": "And again?", "previous_response_id": first.json()["id"]}
    second = httpx.post(f"{audio_server.base}/responses", json={**follow, "max_output_tokens": 4}, timeout=60)
    assert second.status_code == 200, second.text
    turns = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And again?"}]
    again = generate(model, processor, apply_chat_template(processor, None, turns), audio=[CLIP], max_tokens=4)
    assert second.json()["output"][0]["content"][0]["text"] == again.text  # the stored clip came back


def test_image_and_audio_in_the_order_written() -> None:
    """Gemma 4 sees and hears: the clip first, then the image, as the message says; the answer is generate's
    for that order (and differs from the other order's prompt)."""
    model, processor = load(FIXTURES / "gemma4" / "hub")
    image = FIXTURES / "images" / "rgb_56x56.png"
    image_url = "data:image/png;base64," + b64(image)
    for server in make_server((model, processor), max_media_bytes=200_000):
        content = [audio_part(b64(CLIP)), {"type": "image_url", "image_url": {"url": image_url}}]
        response = chat(server, [*content, {"type": "text", "text": "Describe."}])
        assert response.status_code == 200, response.text
        parts = [{"type": "audio"}, {"type": "image"}, {"type": "text", "text": "Describe."}]
        prompt = apply_chat_template(processor, None, [{"role": "user", "content": parts}])
        assert prompt.index("<|audio|>") < prompt.index("<|image|>")
        expected = generate(model, processor, prompt, image=[image], audio=[CLIP], max_tokens=6)
        assert response.json()["choices"][0]["message"]["content"] == expected.text
        assert response.json()["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_qwen2_5_omni_hears_and_sees_over_the_api() -> None:
    """Qwen2.5-Omni's thinker: an image then a clip, as written; the answer is generate's."""
    model, processor = load(FIXTURES / "qwen2_5_omni" / "hub")
    image = FIXTURES / "images" / "rgb_56x56.png"
    image_url = "data:image/png;base64," + b64(image)
    for server in make_server((model, processor), max_media_bytes=200_000):
        content = [{"type": "image_url", "image_url": {"url": image_url}}, audio_part(b64(CLIP))]
        response = chat(server, [*content, {"type": "text", "text": "Describe."}])
        assert response.status_code == 200, response.text
        parts = [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Describe."}]
        prompt = apply_chat_template(processor, None, [{"role": "user", "content": parts}])
        assert prompt.index("<|IMAGE|>") < prompt.index("<|AUDIO|>")
        expected = generate(model, processor, prompt, image=[image], audio=[CLIP], max_tokens=6)
        assert response.json()["choices"][0]["message"]["content"] == expected.text
        assert response.json()["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_gemma3n_hears_and_sees_over_the_api() -> None:
    """Gemma 3n: a clip then an image, as written (its fixed-length audio slot and image slot expanded); the
    answer is generate's."""
    model, processor = load(FIXTURES / "gemma3n" / "hub")
    image = FIXTURES / "images" / "rgb_56x56.png"
    image_url = "data:image/png;base64," + b64(image)
    for server in make_server((model, processor), max_media_bytes=200_000):
        content = [audio_part(b64(CLIP)), {"type": "image_url", "image_url": {"url": image_url}}]
        response = chat(server, [*content, {"type": "text", "text": "Describe."}])
        assert response.status_code == 200, response.text
        parts = [{"type": "audio"}, {"type": "image"}, {"type": "text", "text": "Describe."}]
        prompt = apply_chat_template(processor, None, [{"role": "user", "content": parts}])
        assert prompt.index("<audio_soft_token>") < prompt.index("<image_soft_token>")
        expected = generate(model, processor, prompt, image=[image], audio=[CLIP], max_tokens=6)
        assert response.json()["choices"][0]["message"]["content"] == expected.text
        assert response.json()["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_bad_audio_requests_get_4xx(audio_server, server) -> None:
    long_clip = io.BytesIO()
    soundfile.write(long_clip, np.zeros(16000 * 2, np.float32), 16000, format="WAV")  # 2 s: over the 1.2 s cap
    noise = np.random.default_rng(0).standard_normal(150_000).astype(np.float32)
    big = io.BytesIO()
    soundfile.write(big, noise, 16000, format="WAV", subtype="FLOAT")  # 600 KB: over the byte cap
    cases = [
        (server, [audio_part(b64(CLIP))], 400, "does not take audio input"),  # Qwen2-VL: no audio
        (audio_server, [audio_part("not base64!")], 400, "invalid base64"),
        (audio_server, [audio_part(base64.b64encode(b"plain text, no sound").decode())], 400, "cannot decode audio"),
        (audio_server, [audio_part(b64(CLIP), "../wav")], 400, "needs a format"),
        (audio_server, [{"type": "input_audio", "input_audio": {"format": "wav"}}], 400, "base64 data"),
        (audio_server, [audio_part(base64.b64encode(long_clip.getvalue()).decode())], 400, "at most 1.2 s per clip"),
        (audio_server, [audio_part(b64(CLIP))] * 4, 400, "over 2.2 s in all"),
        (audio_server, [audio_part(base64.b64encode(big.getvalue()).decode())], 413, "larger than"),
        (audio_server, [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], 400, "image"),
    ]
    for target, content, status, says in cases:
        response = chat(target, [*content, {"type": "text", "text": "What is it?"}])
        assert response.status_code == status, (says, response.text)
        error = response.json()["error"]
        assert says in error["message"] and error["message"].count("\n") == 0, (says, error)
    assert chat(audio_server, [audio_part(b64(CLIP)), {"type": "text", "text": "Still there?"}]).status_code == 200


def test_qwen2_5_omni_hears_a_video_sound_track_over_the_api(tmp_path) -> None:
    """``video_audio: true`` with a video part: the frames and the file's own track, interleaved, as
    ``vlm generate --video-audio`` gives them; refused in one line without a video or for a model that cannot."""
    from vlm_models.video import VideoSampling

    from ..models.test_qwen2_5_omni import clip_frames, sweep, write_video_with_sound

    model, processor = load(FIXTURES / "qwen2_5_omni" / "hub")
    path = tmp_path / "clip.mkv"
    write_video_with_sound(path, clip_frames(2, 56, 56, 3), sweep(48_000))
    question = [{"type": "video_url", "video_url": {"url": str(path)}}, {"type": "text", "text": "What is heard?"}]
    parts = [{"type": "video"}, {"type": "text", "text": "What is heard?"}]
    prompt = apply_chat_template(processor, None, [{"role": "user", "content": parts}])
    heard = generate(
        model, processor, prompt, videos=[path], video_sampling=VideoSampling(with_audio=True), max_tokens=6
    )
    seen = generate(model, processor, prompt, videos=[path], max_tokens=6)
    assert heard.prompt_tokens > seen.prompt_tokens  # the track's tokens are in the prompt
    for server in make_server((model, processor), allow_local_media=tmp_path, max_media_bytes=2_000_000):
        url = f"{server.base}/chat/completions"
        body = {"model": server.model_id, "messages": [{"role": "user", "content": question}], "max_tokens": 6}
        response = httpx.post(url, json={**body, "video_audio": True}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == heard.text
        assert response.json()["usage"]["prompt_tokens"] == heard.prompt_tokens
        plain = httpx.post(url, json=body, timeout=60).json()
        assert plain["usage"]["prompt_tokens"] == seen.prompt_tokens
        text_only = {**body, "messages": [{"role": "user", "content": "Hello"}], "video_audio": True}
        refused = httpx.post(url, json=text_only, timeout=60)
        assert refused.status_code == 400 and "has none" in refused.json()["error"]["message"]


def test_qwen3_omni_moe_hears_sees_and_hears_a_video_track_over_the_api(tmp_path) -> None:
    """Qwen3-Omni-MoE's thinker: a clip then an image, as written, and a video part heard with its own track
    (``video_audio``); the answers are generate's."""
    from vlm_models.video import VideoSampling

    from ..models.test_qwen2_5_omni import clip_frames, sweep, write_video_with_sound

    model, processor = load(FIXTURES / "qwen3_omni_moe" / "hub")
    image = FIXTURES / "images" / "rgb_56x56.png"
    path = tmp_path / "clip.mkv"
    write_video_with_sound(path, clip_frames(2, 64, 64, 3), sweep(24_000))
    for server in make_server((model, processor), allow_local_media=tmp_path, max_media_bytes=2_000_000):
        image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(image)}}
        response = chat(server, [audio_part(b64(CLIP)), image_part, {"type": "text", "text": "Describe."}])
        assert response.status_code == 200, response.text
        parts = [{"type": "audio"}, {"type": "image"}, {"type": "text", "text": "Describe."}]
        prompt = apply_chat_template(processor, None, [{"role": "user", "content": parts}])
        assert prompt.index("<|audio_pad|>") < prompt.index("<|image_pad|>")
        expected = generate(model, processor, prompt, image=[image], audio=[CLIP], max_tokens=6)
        assert response.json()["choices"][0]["message"]["content"] == expected.text
        question = [{"type": "video_url", "video_url": {"url": str(path)}}, {"type": "text", "text": "Heard?"}]
        body = {"model": server.model_id, "messages": [{"role": "user", "content": question}], "max_tokens": 6}
        response = httpx.post(f"{server.base}/chat/completions", json={**body, "video_audio": True}, timeout=60)
        assert response.status_code == 200, response.text
        prompt = apply_chat_template(
            processor, None, [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Heard?"}]}]
        )
        heard = generate(
            model, processor, prompt, videos=[path], video_sampling=VideoSampling(with_audio=True), max_tokens=6
        )
        assert response.json()["choices"][0]["message"]["content"] == heard.text
        assert response.json()["usage"]["prompt_tokens"] == heard.prompt_tokens


def test_video_audio_for_a_model_that_cannot_hear_videos_is_refused(server) -> None:
    """Qwen2-VL takes videos but hears nothing: one line, before any media is fetched (the file does not exist)."""
    body = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mov"}}]}],
        "video_audio": True,
        "max_tokens": 2,
    }
    response = httpx.post(f"{server.base}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "this model cannot hear a video's sound track"
