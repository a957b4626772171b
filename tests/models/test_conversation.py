"""The UI-free conversation: its JSON form, the /params parser, and bad saved files refused in one line."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_models.conversation import Conversation, Turn, parse_params

texts = st.text(max_size=40)
sources = st.lists(st.text(min_size=1, max_size=20), max_size=2)
turns = st.builds(
    Turn,
    role=st.sampled_from(["user", "assistant"]),
    text=texts,
    images=sources,
    videos=sources,
    audios=sources,
    reasoning=texts,
)


@given(st.builds(Conversation, system=st.none() | texts, turns=st.lists(turns, max_size=5)))
def test_json_round_trip(conversation: Conversation) -> None:
    written = json.dumps(conversation.to_json())
    assert Conversation.from_json(json.loads(written)) == conversation


def test_messages_put_media_first_in_order() -> None:
    turn = Turn("user", "what is this?", images=["a.png", "b.png"], audios=["c.wav"])
    assert turn.message() == {
        "role": "user",
        "content": [{"type": "image"}, {"type": "image"}, {"type": "audio"}, {"type": "text", "text": "what is this?"}],
    }
    talk = Conversation(None, [turn, Turn("assistant", "two"), Turn("user", "and?", images=["d.png"])])
    assert talk.media("images") == ["a.png", "b.png", "d.png"] and talk.media("audios") == ["c.wav"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "not a saved conversation"),
        ({"format": "other"}, "not a saved conversation"),
        ({"format": "vlm.conversation/1", "turns": {}}, "turns must be a list"),
        ({"format": "vlm.conversation/1", "turns": [{"role": "tool", "text": ""}]}, "turn 1: a turn needs a role"),
        ({"format": "vlm.conversation/1", "turns": [{"role": "user", "text": 3}]}, "turn 1: text and reasoning"),
        ({"format": "vlm.conversation/1", "turns": [{"role": "user", "text": "", "images": "a.png"}]}, "images must"),
        ({"format": "vlm.conversation/1", "system": 1, "turns": []}, "system must be a string"),
    ],
)
def test_bad_saved_conversations_are_one_line(data, message) -> None:
    with pytest.raises(ValueError, match=message):
        Conversation.from_json(data, "talk.json")


def test_params_parse_values_by_kind() -> None:
    assert parse_params("temperature=0.7 max_tokens=64 seed=none ignore_eos=true stop=a,b top-k=5") == {
        "temperature": 0.7,
        "max_tokens": 64,
        "seed": None,
        "ignore_eos": True,
        "stop": ["a", "b"],
        "top_k": 5,
    }
    with pytest.raises(ValueError, match="unknown parameter 'temprature'"):
        parse_params("temprature=1")
    with pytest.raises(ValueError, match="write name=value"):
        parse_params("temperature")
