"""Every generation option of the wrong type is a ValueError naming it, like a wrong value (issue 19)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_runtime import GenerationConfig, SamplingParams, ThinkingConfig, generate
from vlm_runtime.cache_settings import CacheSettings
from vlm_runtime.settings import OPTION_NAMES, GenerationSettings, generation_settings

from .toy import ByteProcessor, ToyModel


class Opaque:
    """A value no option's type admits."""

    def __repr__(self) -> str:
        return "Opaque()"


@pytest.mark.parametrize("option", sorted(OPTION_NAMES))
def test_a_value_of_no_admitted_type_names_the_option(option: str) -> None:
    with pytest.raises(ValueError, match=rf"^{option} must be .*, got Opaque\(\)$"):
        generation_settings(**{option: Opaque()})


def test_every_settings_field_is_an_option() -> None:
    # The parametrisation above covers every field of the four settings classes.
    groups = (SamplingParams, GenerationConfig, ThinkingConfig, CacheSettings)
    fields = {f.name for group in groups for f in dataclasses.fields(group)}
    assert {name.removeprefix("thinking_") for name in OPTION_NAMES} == fields


@pytest.mark.parametrize(
    "option, value",
    [("temperature", "abc"), ("top_k", 2.5), ("max_tokens", "5"), ("ignore_eos", 1), ("seed", 1.0), ("stop", 5)],
)
def test_generate_reports_a_wrong_type_as_a_value_error(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{option} must be "):
        generate(ToyModel(), ByteProcessor(), "hi", **{option: value})


def test_defaults_pass_and_numpy_scalars_count_as_numbers() -> None:
    import numpy as np

    settings = generation_settings(temperature=np.float32(0.5), top_k=np.int64(3), max_tokens=np.int32(4))
    assert settings.sampling.top_k == 3 and settings.config.max_tokens == 4
    assert generation_settings() == GenerationSettings()


_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.integers(0, 300), st.floats(-5, 5), max_size=2),
)


@given(option=st.sampled_from(sorted(OPTION_NAMES)), value=_ANY_VALUE)
def test_any_value_is_accepted_or_a_value_error(option: str, value: object) -> None:
    try:
        generation_settings(**{option: value})
    except ValueError as error:  # never a TypeError from a comparison, nor anything else
        assert str(error) and "\n" not in str(error)
