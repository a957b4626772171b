"""``vlm chat`` driven through a pseudo-terminal with the shipped demo model, as a user types at it."""

from __future__ import annotations

import json
import re

import pytest

from tests.interactive import DEMO_QUESTION, SHAPES, generate_answer, quiet_env, vlm_command

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.slow  # each test starts the command and loads the demo model

PROMPT = "you>"
TIMEOUT = 60
# prompt_toolkit turns bracketed paste on when it draws the prompt and off when the line is accepted: what the chat
# prints for a line lies between the two.
LINE_ACCEPTED, PROMPT_SHOWN = "\x1b[?2004l", "\x1b[?2004h"


@pytest.fixture
def chat():
    child = pexpect.spawn(
        vlm_command()[0],
        vlm_command("chat")[1:],
        env=quiet_env(),
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 200),
    )
    child.expect("Ctrl-D leaves")
    child.expect_exact(PROMPT_SHOWN)
    yield child
    if child.isalive():
        child.terminate(force=True)


def say(child, line: str) -> str:
    """Type ``line``; everything printed until the next prompt."""
    child.sendline(line)
    child.expect_exact(LINE_ACCEPTED)
    child.expect_exact(PROMPT_SHOWN)
    return _plain(child.before)


def _plain(text: str) -> str:
    """Terminal output without escape sequences and carriage returns."""
    return re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\r", "", text)


def test_image_question_gives_the_generate_answer_and_later_turns_use_the_feature_cache(chat) -> None:
    expected = generate_answer()
    assert "attached" in say(chat, f"/image {SHAPES}")
    first = say(chat, DEMO_QUESTION)
    assert expected in first
    assert "image(s) from the feature cache" not in first  # the encoder ran for the new image
    second = say(chat, "How many shapes are there?")  # multi-turn: the image is in the history
    assert "1 image(s) from the feature cache" in second
    assert re.search(r"\((\d+) reused\)", second) and int(re.search(r"\((\d+) reused\)", second)[1]) > 0


def test_save_clear_load_round_trip(chat, tmp_path) -> None:
    saved = tmp_path / "talk.json"
    say(chat, f"/image {SHAPES}")
    answer = say(chat, DEMO_QUESTION)
    assert "saved 2 turns" in say(chat, f"/save {saved}")
    data = json.loads(saved.read_text())
    assert [t["role"] for t in data["turns"]] == ["user", "assistant"]
    assert data["turns"][0] == {"role": "user", "text": DEMO_QUESTION, "images": [str(SHAPES)]}
    assert data["turns"][1]["text"] in answer
    say(chat, "/clear")
    saved_again = tmp_path / "after_clear.json"
    assert "saved 0 turns" in say(chat, f"/save {saved_again}")
    shown = say(chat, f"/load {saved}")
    assert "loaded 2 turns" in shown and data["turns"][1]["text"] in shown
    say(chat, f"/save {saved_again}")
    assert json.loads(saved_again.read_text()) == data
    # the loaded conversation goes on from where it was: its image comes back from its file
    assert "prompt tokens" in say(chat, "Which colour is the circle?")


def test_params_show_and_change_the_settings(chat) -> None:
    shown = say(chat, "/params")
    assert re.search(r"temperature\s+0\.0", shown) and re.search(r"max_tokens\s+256", shown)
    # ignore_eos: at temperature 0.5 the demo model may end sooner, and the limit is what is checked here
    changed = say(chat, "/params temperature=0.5 max_tokens=3 ignore_eos=true")
    assert re.search(r"temperature\s+0\.5", changed) and re.search(r"max_tokens\s+3\b", changed)
    status = re.search(r"(\d+) tokens at [\d.]+ tok/s; (\w+)\]", say(chat, "Hello"))
    assert status and (int(status[1]), status[2]) == (3, "length")  # the new limit applies
    assert "unknown parameter 'temprature'" in say(chat, "/params temprature=1")
    assert "error" in say(chat, "/params temperature=-1")  # checked by the settings classes


def test_clear_forgets_the_conversation(chat) -> None:
    say(chat, f"/image {SHAPES}")
    say(chat, DEMO_QUESTION)
    assert "conversation cleared" in say(chat, "/clear")
    again = say(chat, "Hello")
    assert re.search(r"\[(\d+) prompt tokens \(0 reused\)", again)  # nothing of the old turns is in the prompt
    assert "feature cache" not in again


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(chat, tmp_path) -> None:
    # long enough to be stopped midway (a larger max_tokens slows every step: the CPU decode attends over a
    # buffer of the prompt plus max_tokens)
    say(chat, "/params ignore_eos=true max_tokens=2000")
    chat.sendline("Tell me about shapes.")
    chat.expect_exact(LINE_ACCEPTED)
    chat.expect(r"(\w+\W+){10}")  # tokens are streaming
    chat.sendcontrol("c")
    chat.expect_exact("[stopped]")
    chat.expect_exact(PROMPT_SHOWN)
    say(chat, f"/save {tmp_path / 'stopped.json'}")
    turns = json.loads((tmp_path / "stopped.json").read_text())["turns"]
    assert turns[-1]["role"] == "assistant" and len(turns[-1]["text"].split()) >= 10  # kept as far as it got
    say(chat, "/params ignore_eos=false max_tokens=256")
    say(chat, "/clear")
    say(chat, f"/image {SHAPES}")
    assert generate_answer() in say(chat, DEMO_QUESTION)  # still alive, and the stopped turn did not corrupt it
    chat.sendcontrol("c")  # at the prompt: nothing to stop, the chat stays
    chat.expect_exact(PROMPT_SHOWN)
    assert "prompt tokens" in say(chat, "Hello")


def test_ctrl_d_and_exit_leave(chat) -> None:
    chat.sendcontrol("d")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    other = pexpect.spawn(vlm_command()[0], vlm_command("chat")[1:], env=quiet_env(), encoding="utf-8", timeout=TIMEOUT)
    other.expect_exact(PROMPT_SHOWN)
    other.sendline("/exit")
    other.expect(pexpect.EOF)
    other.close()
    assert other.exitstatus == 0


def test_bad_input_is_one_line_and_the_chat_stays(chat) -> None:
    assert "error: nope.png: no such file" in say(chat, "/image nope.png")
    assert "unknown command /imgae" in say(chat, "/imgae x")
    assert "does not take audio" in say(chat, "/audio x.wav")
    assert "Traceback" not in chat.before


def test_reasoning_is_shown_dimmed_apart_from_the_answer(tmp_path) -> None:
    """A checkpoint whose template opens a thinking block (the server tests' thinking fixture): the reasoning and
    the answer are what ``vlm generate`` prints for the same message, the reasoning in dim italics on its own."""
    import subprocess

    from tests.serve.test_thinking import thinking_checkpoint

    model = str(thinking_checkpoint(tmp_path / "thinker"))
    flags = ["--model", model, "--enable-thinking", "--thinking-budget", "5", "--max-tokens", "12"]
    printed = subprocess.run(
        vlm_command("generate", *flags, "--prompt", "hi"), capture_output=True, text=True, env=quiet_env(), check=True
    ).stdout
    reasoning, _, answer = printed.removeprefix("<think>").partition("</think>\n")
    assert reasoning.strip() and answer.strip()
    child = pexpect.spawn(vlm_command()[0], vlm_command("chat", *flags)[1:], env=quiet_env(), encoding="utf-8")
    child.expect_exact(PROMPT_SHOWN)
    child.sendline("hi")
    child.expect_exact(LINE_ACCEPTED)
    child.expect_exact(PROMPT_SHOWN)
    raw = child.before
    child.terminate(force=True)
    dimmed = "".join(re.findall(r"\x1b\[2;3m(.*?)\x1b\[0m", raw, re.S))  # rich's dim italic spans
    assert dimmed.strip() == reasoning.strip()
    shown = _plain(raw)
    assert shown.index(reasoning.strip()) < shown.index(answer.strip())


def test_load_refuses_a_conversation_whose_image_is_gone(chat, tmp_path) -> None:
    saved = tmp_path / "gone.json"
    turns = [
        {"role": "user", "text": "hi", "images": [str(tmp_path / "deleted.png")]},
        {"role": "assistant", "text": "x"},
    ]
    saved.write_text(json.dumps({"format": "vlm.conversation/1", "system": None, "turns": turns}))
    assert f"error: {saved}, turn 1: {tmp_path / 'deleted.png'}: no such file" in say(chat, f"/load {saved}")
    assert f"error: {SHAPES}: not JSON" in say(chat, f"/load {SHAPES}")
    assert "error: give a file" in say(chat, "/load")
    assert "0 reused" in say(chat, "Hello")  # the chat goes on, with nothing loaded


def test_image_from_a_url_is_fetched_once(chat) -> None:
    from tests.models.conftest import serving

    with serving(SHAPES.parent) as base:
        url = f"{base}/{SHAPES.name}"
        assert f"attached {url}" in say(chat, f"/image {url}")
    # the server is gone: the answers below come from the image fetched when it was attached
    assert generate_answer() in say(chat, DEMO_QUESTION)
    assert "1 image(s) from the feature cache" in say(chat, "How many shapes are there?")
    assert "error" in say(chat, f"/image {base}/missing.png")
