"""Reading videos (files written here with PyAV, frame folders, frame lists) and the torchvision-equal frame
resize's invariants; the equality with transformers' video processing is in test_qwen3_vl_video.py."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_models.processors.frames import resize_frames
from vlm_models.video import Video, VideoLoadError, read_video


def moving_frames(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A gradient that shifts every frame, so each frame is told apart by its mean."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack(
        [np.stack([(xx * 3 + 10 * t) % 256, (yy * 4) % 256, np.full_like(xx, 20 * t % 256)], -1) for t in range(count)]
    ).astype(np.uint8)


def write_video(path: Path, frames: np.ndarray, fps: float, codec: str, pix_fmt: str) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize(
    "name, codec, pix_fmt, lossless",
    [("clip.mp4", "h264", "yuv420p", False), ("clip.mov", "png", "rgb24", True), ("clip.mkv", "ffv1", "bgr0", True)],
)
def test_a_video_file_reads_into_its_frames_and_rate(tmp_path: Path, name, codec, pix_fmt, lossless) -> None:
    """mp4/h264 (lossy), mov/png, and mkv/ffv1 (whose header keeps no frame count: the packets are counted)."""
    frames = moving_frames(10)
    video = read_video(write_video(tmp_path / name, frames, 5.0, codec, pix_fmt))
    assert video.frames.shape == frames.shape and video.frames.dtype == np.uint8
    assert (video.fps, video.total_frames) == (5.0, 10)
    np.testing.assert_array_equal(video.frame_indices, np.arange(10))
    error = np.abs(video.frames.astype(int) - frames).mean()
    assert error == 0 if lossless else error < 8


def test_only_the_selected_frames_are_kept(tmp_path: Path) -> None:
    frames = moving_frames(12)
    path = write_video(tmp_path / "clip.mov", frames, 6.0, "png", "rgb24")
    seen = []

    def select(total: int, fps: float) -> list[int]:
        seen.append((total, fps))
        return [9, 0, 4, 4]

    video = read_video(path, select=select)
    assert seen == [(12, 6.0)]
    np.testing.assert_array_equal(video.frame_indices, [0, 4, 9])
    np.testing.assert_array_equal(video.frames, frames[[0, 4, 9]])
    np.testing.assert_array_equal(video.take([4, 9, 9]), frames[[4, 9, 9]])
    with pytest.raises(ValueError, match=r"frames \[5\] of the source video were not read"):
        video.take([5])


def test_a_folder_or_list_of_frames_is_a_video(tmp_path: Path) -> None:
    frames = moving_frames(5)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{i:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    video = read_video(folder, fps=2.5, select=lambda total, fps: [1, 3])
    assert (video.total_frames, video.fps) == (5, 2.5)
    np.testing.assert_array_equal(video.frames, frames[[1, 3]])
    listed = read_video([folder / "frame_004.png", folder / "frame_000.png"], fps=1.0)
    np.testing.assert_array_equal(listed.frames, frames[[4, 0]])
    same = Video.from_frames(frames, 2.5)
    assert read_video(same) is same


def test_bad_sources_fail_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video\n")
    (tmp_path / "no_frames").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "mixed" / "b.png")
    (tmp_path / "mixed" / "c.png").write_text("broken")
    cases = [
        (tmp_path / "missing.mp4", {}, "video not found"),
        (tmp_path / "empty.mp4", {}, "cannot read video"),
        (tmp_path / "text.mp4", {}, "cannot read video"),
        (tmp_path / "no_frames", {"fps": 1.0}, "holds no frame images"),
        (tmp_path / "mixed", {}, "give the rate they were captured at"),
        (tmp_path / "mixed", {"fps": 0.0}, "frame rate must be positive"),
        (tmp_path / "mixed", {"fps": 1.0, "select": lambda n, f: [0, 1]}, "frames differ in size"),
        (tmp_path / "mixed", {"fps": 1.0, "select": lambda n, f: [2]}, "c.png"),
        (tmp_path / "mixed", {"fps": 1.0, "select": lambda n, f: [3]}, "outside its 3 frames"),
        ([], {"fps": 1.0}, "at least one frame"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(VideoLoadError, match=message) as caught:
            read_video(source, **kwargs)
        assert "\n" not in str(caught.value), source
    with pytest.raises(VideoLoadError, match="uint8"):
        Video.from_frames(np.zeros((2, 4, 4, 3), dtype=np.float32), 1.0)


@settings(max_examples=30, deadline=None)
@given(
    frames=st.integers(1, 3),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    target=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    level=st.integers(0, 255),
    resample=st.sampled_from([int(Image.Resampling.BILINEAR), int(Image.Resampling.BICUBIC)]),
)
def test_frame_resize_invariants(frames, size, target, level, resample) -> None:
    """A flat frame stays flat at its level whatever the sizes (the integer weights of each output sum to one
    within rounding), the shape is the one asked for, and a frame already that size comes back unchanged."""
    flat = np.full((frames, *size, 3), level, dtype=np.uint8)
    out = resize_frames(flat, target, resample)
    assert out.shape == (frames, *target, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - level).max() <= 1
    noise = np.random.default_rng(level).integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_frames(noise, size, resample), noise)


def test_a_long_decode_shows_a_progress_bar(tmp_path: Path, monkeypatch, capsys) -> None:
    import vlm_models.video as video_module

    path = write_video(tmp_path / "clip.mov", moving_frames(6), 3.0, "png", "rgb24")
    read_video(path)
    assert "decoding video" not in capsys.readouterr().err
    monkeypatch.setattr(video_module, "LONG_VIDEO_FRAMES", 4)
    read_video(path)
    assert "decoding video" in capsys.readouterr().err
