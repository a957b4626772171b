"""The numpy image pipeline: parity with stored transformers outputs, smart_resize properties, load_image."""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import vlm_models.processors.image as image_module
from vlm_models.processors import ImageLoadError, Qwen2VLImageProcessor, load_image, smart_resize

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
REFERENCE_NPZ = FIXTURES / "image_processor_reference.npz"
REFERENCE_JSON = FIXTURES / "image_processor_reference.json"
IMAGES = FIXTURES / "images"


# --- parity with transformers ------------------------------------------------------------------------------------


def _reference_cases() -> list:
    """(config name, image file name) for every stored reference; keys are '<config>/<image>/<array>'."""
    if not REFERENCE_NPZ.is_file():
        return [pytest.param(None, None, id="reference-missing")]
    with np.load(REFERENCE_NPZ) as arrays:
        pairs = sorted({tuple(key.split("/")[:2]) for key in arrays.files})
    return [pytest.param(config, name, id=f"{config}-{name}") for config, name in pairs]


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, np.ndarray], dict]:
    if not REFERENCE_NPZ.is_file():
        pytest.fail(f"{REFERENCE_NPZ} is missing: run tests/fixtures/make_fixtures.py")
    with np.load(REFERENCE_NPZ) as arrays:
        stored = {key: arrays[key] for key in arrays.files}
    return stored, json.loads(REFERENCE_JSON.read_text(encoding="utf-8"))["configs"]


def test_reference_covers_both_configs() -> None:
    if not REFERENCE_NPZ.is_file():
        pytest.fail(f"{REFERENCE_NPZ} is missing: run tests/fixtures/make_fixtures.py")
    configs = {config for config, _ in (p.values for p in _reference_cases())}
    assert configs == {"fixture", "default"}
    assert set(json.loads(REFERENCE_JSON.read_text(encoding="utf-8"))["configs"]) >= {"fixture", "default"}


@pytest.mark.parametrize(("config", "name"), _reference_cases())
def test_matches_transformers(config: str, name: str, reference) -> None:
    stored, configs = reference
    processor = Qwen2VLImageProcessor.from_config(configs[config])
    out = processor([load_image(IMAGES / name)])

    expected_grid = stored[f"{config}/{name}/image_grid_thw"]
    assert out["image_grid_thw"].dtype == np.int64
    np.testing.assert_array_equal(out["image_grid_thw"], expected_grid.reshape(out["image_grid_thw"].shape))

    expected = stored[f"{config}/{name}/pixel_values"]
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_values"].shape == expected.shape
    assert np.abs(out["pixel_values"] - expected).max() <= 1e-5


# --- processor layout and config ---------------------------------------------------------------------------------


def _coordinate_image(height: int, width: int) -> Image.Image:
    """R = row, G = column, B = row + column (mod 256): every pixel says where it came from."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([y % 256, x % 256, (x + y) % 256], axis=-1).astype(np.uint8))


def test_patch_layout_is_merge_window_major_with_duplicated_frame() -> None:
    processor = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    height, width = 56, 84  # 4 x 6 patches, 2 x 3 merge windows; non-square to catch an h/w swap
    image = _coordinate_image(height, width)
    out = processor([image])
    p, m, t = 14, 2, 2
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert out["pixel_values"].shape == (24, 3 * t * p * p)

    chw = np.asarray(image).transpose(2, 0, 1).astype(np.float32)
    row = 0
    for block_r in range(height // (p * m)):
        for block_c in range(width // (p * m)):
            for in_r in range(m):
                for in_c in range(m):
                    r, c = block_r * m + in_r, block_c * m + in_c
                    patch = chw[:, r * p : (r + 1) * p, c * p : (c + 1) * p]
                    expected = np.stack([patch] * t, axis=1)  # (C, T, P, P)
                    np.testing.assert_array_equal(out["pixel_values"][row].reshape(3, t, p, p), expected)
                    row += 1


def test_batch_is_concatenation_of_single_images_in_order() -> None:
    processor = Qwen2VLImageProcessor()
    images = [_coordinate_image(60, 90), _coordinate_image(300, 200), _coordinate_image(33, 33)]
    batch = processor(images)
    singles = [processor([im]) for im in images]
    np.testing.assert_array_equal(batch["pixel_values"], np.concatenate([s["pixel_values"] for s in singles]))
    np.testing.assert_array_equal(batch["image_grid_thw"], np.concatenate([s["image_grid_thw"] for s in singles]))
    assert batch["pixel_values"].shape[0] == int(np.prod(batch["image_grid_thw"], axis=1).sum())


def test_normalization_values() -> None:
    processor = Qwen2VLImageProcessor(do_resize=False)
    out = processor([Image.new("RGB", (28, 28), (255, 0, 128))])
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    expected = (np.array([255, 0, 128]) / 255 - mean) / std
    per_channel = out["pixel_values"].reshape(-1, 3, 2 * 14 * 14)
    np.testing.assert_allclose(per_channel.min(axis=(0, 2)), expected, atol=1e-6)
    np.testing.assert_allclose(per_channel.max(axis=(0, 2)), expected, atol=1e-6)


def test_rgba_input_to_processor_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (28, 28), (255, 0, 0, 0))
    raw = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)([transparent])
    assert np.all(raw["pixel_values"] == 255.0)


def test_unpatchable_size_without_resize_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="multiple of"):
        Qwen2VLImageProcessor(do_resize=False)([Image.new("RGB", (30, 28))])


def test_extreme_aspect_ratio_image_is_refused() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        Qwen2VLImageProcessor()([Image.new("RGB", (300, 1))])


def test_num_image_tokens() -> None:
    processor = Qwen2VLImageProcessor()
    assert processor.num_image_tokens(np.array([1, 34, 46])) == 391
    assert Qwen2VLImageProcessor(merge_size=1).num_image_tokens((2, 4, 6)) == 48
    out = processor([_coordinate_image(480, 640)])
    assert processor.num_image_tokens(out["image_grid_thw"][0]) == out["pixel_values"].shape[0] // 4


def test_from_config_defaults_and_unknown_keys() -> None:
    default = Qwen2VLImageProcessor.from_config({})
    assert default == Qwen2VLImageProcessor()
    assert (default.min_pixels, default.max_pixels) == (56 * 56, 28 * 28 * 1280)
    assert default.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert default.image_std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    cfg = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_normalize": False,
        "something_new": {"x": 1},
    }
    p = Qwen2VLImageProcessor.from_config(cfg)
    assert (p.min_pixels, p.max_pixels, p.patch_size, p.factor) == (3136, 12845056, 16, 32)
    assert p.image_mean == (0.5, 0.5, 0.5) and p.do_normalize is False


def test_from_config_size_keys_and_precedence() -> None:
    size_only = Qwen2VLImageProcessor.from_config({"size": {"shortest_edge": 1000, "longest_edge": 50000}})
    assert (size_only.min_pixels, size_only.max_pixels) == (1000, 50000)
    # transformers 5.x: top-level min_pixels/max_pixels override size.shortest_edge/longest_edge
    both = Qwen2VLImageProcessor.from_config(
        {"size": {"shortest_edge": 1000, "longest_edge": 50000}, "min_pixels": 2000, "max_pixels": 90000}
    )
    assert (both.min_pixels, both.max_pixels) == (2000, 90000)
    mixed = Qwen2VLImageProcessor.from_config({"size": {"shortest_edge": 1000}, "max_pixels": 90000})
    assert (mixed.min_pixels, mixed.max_pixels) == (1000, 90000)
    one = Qwen2VLImageProcessor.from_config({"max_pixels": 90000})
    assert (one.min_pixels, one.max_pixels) == (56 * 56, 90000)
    with pytest.raises(ValueError, match="max_pixels"):
        Qwen2VLImageProcessor.from_config({"size": {"shortest_edge": 1000}})


def test_from_config_bounds_change_output_size() -> None:
    image = [_coordinate_image(1000, 1000)]
    small = Qwen2VLImageProcessor.from_config({"max_pixels": 280 * 280})(image)
    large = Qwen2VLImageProcessor.from_config({"size": {"shortest_edge": 3136, "longest_edge": 560 * 560}})(image)
    assert small["image_grid_thw"].tolist() == [[1, 20, 20]]
    assert large["image_grid_thw"].tolist() == [[1, 40, 40]]


# --- smart_resize ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [  # computed with transformers 5.23 smart_resize
        ((480, 640, 28, 3136, 1003520), (476, 644)),
        ((1080, 1920, 28, 3136, 1003520), (728, 1316)),
        ((4000, 3000, 28, 3136, 12845056), (4004, 2996)),
        ((10, 10, 28, 3136, 1003520), (56, 56)),
        ((1, 150, 28, 3136, 1003520), (28, 700)),
        ((3000, 20, 28, 3136, 1003520), (2996, 28)),
        ((37, 53, 28, 3136, 1003520), (56, 84)),
        ((8000, 8000, 28, 3136, 1003520), (980, 980)),
        ((100, 20000, 28, 3136, 1003520), (56, 14140)),
    ],
)
def test_smart_resize_known_values(args: tuple[int, ...], expected: tuple[int, int]) -> None:
    assert smart_resize(*args) == expected


sides = st.integers(min_value=1, max_value=20000)
factors = st.sampled_from([14, 16, 28, 32])


def _aspect(height: int, width: int) -> float:
    return max(height, width) / min(height, width)


@given(height=sides, width=sides, factor=factors, min_pixels=st.integers(1, 10**6), max_pixels=st.integers(1, 10**8))
@settings(max_examples=500, deadline=None)
def test_smart_resize_sides_are_positive_multiples_of_factor(height, width, factor, min_pixels, max_pixels) -> None:
    if _aspect(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width, factor, min_pixels, max_pixels)
        return
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    assert h >= factor and w >= factor
    assert h % factor == 0 and w % factor == 0


@given(
    height=sides,
    width=sides,
    factor=factors,
    min_tokens=st.integers(1, 64),
    ratio=st.integers(50, 5000),
)
@settings(max_examples=500, deadline=None)
def test_smart_resize_area_within_bounds(height, width, factor, min_tokens, ratio) -> None:
    # With aspect <= 10, min_pixels >= factor**2 and max_pixels >= 50 * min_pixels, rounding a side by at most one
    # factor can neither push the area past max_pixels nor below min_pixels (and no side is clamped to factor).
    if _aspect(height, width) > 10:
        return
    min_pixels = min_tokens * factor * factor
    max_pixels = ratio * min_pixels
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    assert min_pixels <= h * w <= max_pixels


@given(height=sides, width=sides, factor=factors)
@settings(max_examples=500, deadline=None)
def test_smart_resize_keeps_aspect_ratio(height, width, factor) -> None:
    if _aspect(height, width) > 200:
        return
    h, w = smart_resize(height, width, factor, 56 * 56, 28 * 28 * 1280)
    k = min(h, w) / factor
    if k <= 2:  # a side at one or two factors can be dominated by rounding or clamping
        return
    # every (non-clamped) side is within one factor of the scaled side, so the ratio moves by at most k/(k-2)
    drift = (h / w) / (height / width)
    assert (k - 2) / k <= drift <= k / (k - 2)


@given(height=sides, width=sides, factor=factors)
@settings(max_examples=300, deadline=None)
def test_smart_resize_fixed_point(height, width, factor) -> None:
    min_pixels, max_pixels = 56 * 56, 28 * 28 * 1280
    if _aspect(height, width) > 200:
        return
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    # (rounding can push a near-200 aspect ratio just past 200, which a second call would then refuse)
    if min_pixels <= h * w <= max_pixels and _aspect(h, w) <= 200:
        assert smart_resize(h, w, factor, min_pixels, max_pixels) == (h, w)


def test_smart_resize_errors() -> None:
    assert smart_resize(1, 200) == smart_resize(1, 200)  # exactly 200 is allowed
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(20100, 100)
    for bad in [(0, 10), (10, 0), (-5, 10)]:
        with pytest.raises(ValueError, match="positive"):
            smart_resize(*bad)


# --- load_image --------------------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    for source in (missing, str(missing)):
        with pytest.raises(ImageLoadError, match="not found") as info:
            load_image(source)
        assert str(missing) in str(info.value)


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("hello, not a picture\n")
    with pytest.raises(ImageLoadError) as info:
        load_image(text)
    assert str(text) in str(info.value)
    assert "\n" not in str(info.value)


def test_directory_and_truncated_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not a file"):
        load_image(tmp_path)
    truncated = tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    truncated.write_bytes(_png_bytes(Image.fromarray(noise))[:2000])
    with pytest.raises(ImageLoadError) as info:
        load_image(truncated)
    assert str(truncated) in str(info.value)


def test_bad_base64_data_url() -> None:
    source = "data:image/png;base64,@@not*base64!!"
    with pytest.raises(ImageLoadError, match="base64") as info:
        load_image(source)
    assert source in str(info.value)


def test_data_url_that_is_not_an_image() -> None:
    source = _data_url(b"plain text, definitely not a PNG")
    with pytest.raises(ImageLoadError) as info:
        load_image(source)
    assert source in str(info.value)


def test_data_url_with_non_image_type_or_no_base64() -> None:
    png = _png_bytes(Image.new("RGB", (4, 4)))
    for source in (_data_url(png, "text/plain"), "data:image/png,rawbytes"):
        with pytest.raises(ImageLoadError, match="data URL") as info:
            load_image(source)
        assert source[:20] in str(info.value)


def test_long_data_url_is_abbreviated_in_message() -> None:
    source = _data_url(b"x" * 10_000)
    with pytest.raises(ImageLoadError) as info:
        load_image(source)
    assert source[:40] in str(info.value) and len(str(info.value)) < 500


def test_data_url_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_module, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(_data_url(_png_bytes(_coordinate_image(64, 64))))


def test_data_url_round_trip() -> None:
    original = _coordinate_image(37, 53)
    loaded = load_image(_data_url(_png_bytes(original)))
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(original))


def test_path_str_and_bytes_agree(tmp_path: Path) -> None:
    original = _coordinate_image(20, 30)
    path = tmp_path / "pic.png"
    original.save(path)
    arrays = [np.asarray(load_image(s)) for s in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()))]
    for array in arrays:
        np.testing.assert_array_equal(array, np.asarray(original))


@pytest.mark.parametrize("scheme", ["file", "ftp", "gopher"])
def test_non_http_url_refused(tmp_path: Path, scheme: str) -> None:
    path = tmp_path / "pic.png"
    _coordinate_image(8, 8).save(path)
    source = f"{scheme}://{path}"
    with pytest.raises(ImageLoadError, match="unsupported URL scheme") as info:
        load_image(source)
    assert source in str(info.value)


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageLoadError, match="int"):
        load_image(42)  # type: ignore[arg-type]


def test_rgba_composited_on_white() -> None:
    pixels = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    loaded = np.asarray(load_image(Image.fromarray(pixels, "RGBA")))
    assert loaded.shape == (1, 3, 3)
    assert loaded[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, not the hidden red
    assert loaded[0, 1].tolist() == [0, 0, 255]  # opaque -> unchanged
    assert all(abs(v - 127) <= 1 for v in loaded[0, 2])  # half-transparent black -> mid grey


def test_grey_and_palette_become_rgb() -> None:
    grey = load_image(Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), "L"))
    assert grey.mode == "RGB"
    assert np.asarray(grey).tolist() == [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    assert np.asarray(load_image(palette)).tolist() == [[[10, 20, 30], [200, 0, 0]]]
    palette.info["transparency"] = 1  # palette index 1 transparent -> white
    assert np.asarray(load_image(palette)).tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_transparent_png_file(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    Image.new("LA", (3, 2), (0, 0)).save(path)
    assert np.all(np.asarray(load_image(path)) == 255)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), (0, 128, 0)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)


# --- http(s) through a local server (no outside network) -------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes]] = {}  # noqa: RUF012

    def do_GET(self) -> None:
        status, content_type, body = self.routes.get(self.path, (404, "text/plain", b"missing"))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_image(server: str) -> None:
    original = _coordinate_image(30, 20)
    _Handler.routes["/pic.png"] = (200, "image/png", _png_bytes(original))
    np.testing.assert_array_equal(np.asarray(load_image(f"{server}/pic.png")), np.asarray(original))


def test_http_errors(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _Handler.routes["/page"] = (200, "text/html", b"<html>hi</html>")
    with pytest.raises(ImageLoadError, match="did not return an image") as info:
        load_image(f"{server}/page")
    assert f"{server}/page" in str(info.value) and "text/html" in str(info.value)

    with pytest.raises(ImageLoadError, match="404") as info:
        load_image(f"{server}/absent.png")
    assert f"{server}/absent.png" in str(info.value)

    _Handler.routes["/big.png"] = (200, "image/png", _png_bytes(_coordinate_image(64, 64)))
    monkeypatch.setattr(image_module, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(f"{server}/big.png")


def test_unreachable_url() -> None:
    source = "http://127.0.0.1:9/x.png"  # discard port: connection refused, no outside traffic
    with pytest.raises(ImageLoadError, match="cannot fetch") as info:
        load_image(source)
    assert source in str(info.value)


def test_processor_sizes_from_loaded_image_are_consistent() -> None:
    # smart_resize inputs are (height, width): a wide picture must give a wide grid.
    out = Qwen2VLImageProcessor()([load_image(_coordinate_image(100, 400))])
    _, gh, gw = out["image_grid_thw"][0]
    assert gw > gh and math.isclose(gw / gh, 4, rel_tol=0.25)
