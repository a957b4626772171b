"""The chat page served at ``/``: what is shipped and served (static checks), and the page itself in a real
headless browser (Debian's chromium through Selenium) against a live ``vlm serve`` with the shipped demo model."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.interactive import DEMO_QUESTION, SHAPES, generate_answer, quiet_env, vlm_command
from vlm_serve import ServeSettings, create_app
from vlm_serve.chat_page import PAGE_PATHS

STATIC = Path(str(files("vlm_serve") / "static"))
KEY = "page-key"


def client(**options) -> TestClient:
    from vlm_models.demo import demo_model_path

    return TestClient(
        create_app(settings=ServeSettings(model=str(demo_model_path()), **options)), base_url="http://127.0.0.1"
    )


def test_the_page_and_its_assets_are_served_at_root() -> None:
    with client() as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert 'data-key-required="false"' in page.text
        for path in re.findall(r'(?:src|href)="(/[^"]*)"', page.text):
            asset = http.get(path)
            assert asset.status_code == 200 and asset.content, path
        assert {p for p in re.findall(r'(?:src|href)="(/[^"]*)"', page.text)} | {"/"} == PAGE_PATHS


def test_no_chat_page_turns_it_off() -> None:
    import argparse

    from vlm_serve.cli import add_arguments, settings_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from(parser.parse_args(["--model", "m"])).chat_page is True
    settings = settings_from(parser.parse_args(["--model", "m", "--no-chat-page"]))
    assert settings.chat_page is False
    with client(chat_page=False) as http:
        for path in PAGE_PATHS:
            assert http.get(path).status_code == 404, path
        assert http.get("/health").status_code == 200
    with client(chat_page=False, api_key=KEY) as http:
        assert http.get("/").status_code == 401  # off: not an open path either


def test_with_an_api_key_the_page_loads_and_asks_for_the_key() -> None:
    with client(api_key=KEY) as http:
        page = http.get("/")
        assert page.status_code == 200 and 'data-key-required="true"' in page.text
        assert 'id="key-form"' in page.text and 'type="password"' in page.text
        assert http.get("/chat/chat.js").status_code == 200
        assert http.get("/v1/models").status_code == 401  # the API still needs it
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_shipped_files_name_no_external_url() -> None:
    shipped = sorted(STATIC.iterdir())
    assert {p.name for p in shipped} == {"index.html", "chat.js", "markdown.js", "chat.css"}
    for path in shipped:
        text = path.read_text()
        assert not re.search(r"\b(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name  # no host named
        assert "@import" not in text and "url(" not in text, path.name
    page = (STATIC / "index.html").read_text()
    assert all(ref.startswith(("/chat/", "data:")) for ref in re.findall(r'(?:src|href)="([^"]*)"', page))


# ---- the page in a browser ----

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(*extra: str, model: Path | None = None) -> Iterator[str]:
    """``vlm serve`` with ``model`` (the demo model by default) in a child process; yields its URL."""
    from vlm_models.demo import demo_model_path

    port = _free_port()
    model = model or demo_model_path()
    command = vlm_command("serve", "--model", str(model), "--port", str(port), "--log-level", "warning")
    process = subprocess.Popen([*command, *extra], env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["loaded"]:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vlm serve did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "no headless browser here: install chromium and chromium-driver (apt-get install -y chromium chromium-driver, as .ci/run does)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "artifacts"
    folder.mkdir(exist_ok=True)
    return folder


def wait_for(condition, timeout: float = 30, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def last_answer(driver) -> dict:
    return driver.execute_script(
        "const m = [...document.querySelectorAll('.message.assistant')].pop();"
        "return m ? {text: m.querySelector('.content').innerText.trim(), note: (m.querySelector('.note') || {}).innerText || ''} : null;"
    )


@pytest.mark.slow
def test_the_page_answers_about_an_uploaded_image_stops_and_remembers(browser, artifacts) -> None:
    from selenium.webdriver.common.keys import Keys

    expected = generate_answer()
    with live_server() as url:
        browser.get(f"{url}/")
        wait_for(lambda: by_id(browser, "model").get_attribute("value") == "demo_model", what="the model list")
        by_id(browser, "file").send_keys(str(SHAPES))
        wait_for(lambda: browser.execute_script("return document.querySelectorAll('#attachments img').length") == 1)
        # count the answer's updates: a streamed answer arrives in pieces, not at once
        browser.execute_script(
            "window.updates = 0; new MutationObserver(() => window.updates++)"
            ".observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});"
        )
        by_id(browser, "input").send_keys(DEMO_QUESTION, Keys.ENTER)
        wait_for(lambda: last_answer(browser) and not by_id(browser, "send").get_attribute("hidden"), what="the answer")
        assert last_answer(browser)["text"] == expected
        assert browser.execute_script("return window.updates") > 3
        assert browser.execute_script("return document.querySelectorAll('.message.user img').length") == 1
        assert browser.execute_script("return document.querySelectorAll('#attachments img').length") == 0  # sent
        browser.save_screenshot(str(artifacts / "chat_page_answer.png"))

        by_id(browser, "toggle-params").click()
        tokens = by_id(browser, "p-max_tokens")
        tokens.clear()
        tokens.send_keys("4000")
        by_id(browser, "p-ignore_eos").click()
        by_id(browser, "input").send_keys("Tell me more.", Keys.ENTER)
        wait_for(lambda: len(last_answer(browser)["text"].split()) > 15, what="a long answer streaming")
        assert by_id(browser, "stop").is_displayed()
        browser.save_screenshot(str(artifacts / "chat_page_streaming.png"))
        by_id(browser, "stop").click()
        wait_for(lambda: last_answer(browser)["note"] == "stopped", what="the stopped note")
        stopped_at = last_answer(browser)["text"]
        time.sleep(1.0)
        assert last_answer(browser)["text"] == stopped_at and len(stopped_at.split()) < 3000
        metrics = f"{url}/metrics"
        wait_for(lambda: httpx.get(metrics).json()["engine"]["cancelled"] >= 1, what="the server to cancel")
        browser.save_screenshot(str(artifacts / "chat_page_stopped.png"))

        browser.refresh()
        wait_for(lambda: len(browser.execute_script("return document.querySelectorAll('.message')")) == 4)
        text = by_id(browser, "messages").text
        assert DEMO_QUESTION in text and expected in text and "stopped" in text
        saved = json.loads(browser.execute_script("return localStorage.getItem('vlm-chat.conversations')"))
        assert len(saved) == 1 and [m["role"] for m in saved[0]["messages"]] == ["user", "assistant"] * 2
        assert saved[0]["messages"][0]["images"][0].startswith("data:image/png;base64,")
        assert saved[0]["messages"][1]["content"] == expected and saved[0]["messages"][3]["stopped"] is True
        browser.save_screenshot(str(artifacts / "chat_page_reloaded.png"))
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors  # no script errors, no CSP violations


@pytest.mark.slow
def test_the_page_renders_markdown_safely(browser) -> None:
    with live_server() as url:
        browser.get(f"{url}/")
        html = browser.execute_script(
            "return renderMarkdown('<img src=x onerror=alert(1)> **bold** `<b>`\\n\\n- one\\n- two\\n\\n"
            "```\\n<script>x</script>\\n```\\n[site](javascript:alert(1)) [ok](https://a.example/x)')"
        )
        assert "<img" not in html and "<script" not in html and "&lt;img src=x" in html
        assert "<strong>bold</strong>" in html and "<code>&lt;b&gt;</code>" in html
        assert "<ul>\n<li>one</li>\n<li>two</li>\n</ul>" in html
        assert 'href="javascript' not in html and 'href="https://a.example/x"' in html


@pytest.mark.slow
def test_with_an_api_key_the_page_asks_for_it(browser, artifacts) -> None:
    with live_server("--api-key", KEY) as url:
        browser.get(f"{url}/")
        wait_for(lambda: by_id(browser, "key-form").is_displayed(), what="the key prompt")
        browser.save_screenshot(str(artifacts / "chat_page_key_prompt.png"))
        by_id(browser, "api-key").send_keys(KEY)
        by_id(browser, "key-form").submit()
        wait_for(lambda: by_id(browser, "model").get_attribute("value") == "demo_model", what="the model list")
        assert not by_id(browser, "key-form").is_displayed()


@pytest.mark.slow
def test_reasoning_is_shown_apart_from_the_answer(browser, artifacts, tmp_path) -> None:
    """The server tests' thinking fixture (its template opens a thinking block) under a thinking budget: the page
    shows the streamed reasoning_content apart from the content, each as the API gives it unstreamed."""
    from selenium.webdriver.common.keys import Keys

    from tests.serve.test_thinking import thinking_checkpoint

    model = thinking_checkpoint(tmp_path / "thinker")
    with live_server("--enable-thinking", "--thinking-budget", "5", model=model) as url:
        browser.get(f"{url}/")
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        wait_for(lambda: by_id(browser, "model").get_attribute("value") == "thinker", what="the model list")
        by_id(browser, "toggle-params").click()
        tokens = by_id(browser, "p-max_tokens")
        tokens.clear()
        tokens.send_keys("12")
        by_id(browser, "input").send_keys("hi", Keys.ENTER)
        wait_for(lambda: last_answer(browser) and not by_id(browser, "send").get_attribute("hidden"), what="the answer")
        shown = browser.execute_script(
            "const m = [...document.querySelectorAll('.message.assistant')].pop();"
            "return {reasoning: m.querySelector('.reasoning').textContent, content: m.querySelector('.content').textContent};"
        )
        body = {
            "model": "thinker",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "temperature": 0,
            "top_p": 1,
            "top_k": 0,
            "max_tokens": 12,
        }
        message = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        assert message["reasoning_content"].strip() and message["content"].strip()
        assert shown["reasoning"].strip() == message["reasoning_content"].strip()
        assert shown["content"].strip() == message["content"].strip()
        browser.save_screenshot(str(artifacts / "chat_page_reasoning.png"))


@pytest.mark.slow
def test_pasted_and_dropped_images_are_attached_as_data_urls(browser) -> None:
    import base64

    png = base64.b64encode(SHAPES.read_bytes()).decode()
    with live_server() as url:
        browser.get(f"{url}/")
        browser.execute_script(
            "const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
            "const files = () => { const d = new DataTransfer(); d.items.add(new File([bytes], 's.png', {type: 'image/png'}));"
            "  d.items.add(new File(['not an image'], 'n.txt', {type: 'text/plain'})); return d; };"
            "document.getElementById('input').dispatchEvent(new ClipboardEvent('paste', {clipboardData: files(), bubbles: true}));"
            "document.getElementById('messages').dispatchEvent(new DragEvent('drop', {dataTransfer: files(), bubbles: true}));",
            png,
        )
        wait_for(lambda: browser.execute_script("return document.querySelectorAll('#attachments img').length") == 2)
        sources = browser.execute_script("return [...document.querySelectorAll('#attachments img')].map((i) => i.src)")
        assert sources == [f"data:image/png;base64,{png}"] * 2  # the text file is left out


@pytest.mark.slow
def test_when_local_storage_is_full_the_oldest_conversations_go(browser) -> None:
    from selenium.webdriver.common.keys import Keys

    with live_server() as url:
        browser.get(f"{url}/")
        old = [
            {
                "id": f"old{i}",
                "title": f"old {i}",
                "updated": i,
                "messages": [{"role": "user", "content": "x" * 1_500_000}],
            }
            for i in range(3)
        ]
        browser.execute_script("localStorage.setItem('vlm-chat.conversations', arguments[0])", json.dumps(old))
        browser.refresh()
        wait_for(lambda: by_id(browser, "model").get_attribute("value") == "demo_model", what="the model list")
        by_id(browser, "file").send_keys(str(SHAPES))
        wait_for(lambda: browser.execute_script("return document.querySelectorAll('#attachments img').length") == 1)
        filler = "y" * 1_000_000  # with the old ones, over the browser's quota of about 5 M characters
        browser.execute_script("document.getElementById('input').value = arguments[0]", filler)
        by_id(browser, "input").send_keys(Keys.ENTER)
        wait_for(lambda: not by_id(browser, "send").get_attribute("hidden") and last_answer(browser), what="the answer")
        saved = json.loads(browser.execute_script("return localStorage.getItem('vlm-chat.conversations')"))
        ids = [c["id"] for c in saved]
        assert "old0" not in ids and len(ids) < 4  # the oldest went first
        assert saved[-1]["messages"][0]["content"] == filler  # the new conversation is kept
