"""``PixelBudget``: image sizes are checked from the header, before decoding; JPEGs over the per-image bound are
decoded at a reduced scale; the per-request total holds across images."""

from __future__ import annotations

import io
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from vlm_models.processors.image import ImageLoadError, ImageTooLarge, PixelBudget, _draft_scale, load_image


def encoded(size: tuple[int, int], fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "white" if mode != "1" else 1).save(buffer, format=fmt)
    return buffer.getvalue()


def test_a_png_over_the_bound_is_refused_before_decoding(monkeypatch) -> None:
    bomb = encoded((6000, 6000), "PNG", mode="1")  # a few KB; 108 MB once in RGB
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(ImageTooLarge, match="6000x6000"):
        load_image(bomb, PixelBudget(per_image=10_000_000))
    assert decoded == []  # refused on the header alone
    load_image(bomb, PixelBudget(per_image=36_000_000))
    assert decoded[0] == (6000, 6000)  # the same image within a larger bound is decoded, through that method


def test_within_the_bound_nothing_changes() -> None:
    data = encoded((640, 480), "JPEG")
    assert load_image(data, PixelBudget(per_image=640 * 480)).size == (640, 480)
    assert load_image(data).size == (640, 480)


@pytest.mark.parametrize(
    "size, limit, expected", [((4000, 3000), 3_000_000, (2000, 1500)), ((4001, 3001), 200_000, (501, 376))]
)
def test_a_large_jpeg_is_decoded_at_a_reduced_scale(size, limit, expected) -> None:
    picture = load_image(encoded(size, "JPEG"), PixelBudget(per_image=limit))
    assert picture.size == expected and picture.mode == "RGB"
    assert picture.size[0] * picture.size[1] <= limit


def test_a_jpeg_too_large_even_at_one_eighth_is_refused() -> None:
    with pytest.raises(ImageTooLarge, match="at most 1000 pixels"):
        load_image(encoded((800, 800), "JPEG"), PixelBudget(per_image=1000))


def test_the_total_holds_across_images() -> None:
    budget = PixelBudget(per_image=1_000_000, total=2_500_000)
    data = encoded((1000, 1000), "PNG")
    load_image(data, budget)
    load_image(data, budget)
    with pytest.raises(ImageTooLarge, match="2500000 pixels in all"):
        load_image(data, budget)
    assert issubclass(ImageTooLarge, ImageLoadError)  # callers that catch load errors catch this one too


def test_budgets_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PixelBudget(per_image=0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 100_000), st.integers(1, 100_000), st.integers(1, 10**9))
def test_draft_scale_is_the_smallest_that_fits(width, height, limit) -> None:
    scale = _draft_scale(width, height, limit)

    def fits(s: int) -> bool:
        return math.ceil(width / s) * math.ceil(height / s) <= limit

    if scale is None:
        assert not fits(8)
    else:
        assert scale in (2, 4, 8) and fits(scale)
        assert all(not fits(smaller) for smaller in (2, 4, 8) if smaller < scale)
