"""Media made inside the test, so what they hold is known exactly: a tone (stereo, another rate, several
containers and codecs, and as the sound track of a video) read back as 16 kHz mono samples with the right length,
pitch and level, its Whisper features peaking in the tone's mel band; and a clip of solid coloured frames whose
frames, sampled indices and normalized patches are the colours written. Then the bad-input cases of issue 16:
each one clear line."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from vlm_models.audio import Audio, AudioLoadError, audio_duration, load_audio
from vlm_models.processors.mel import WhisperFeatureExtractor
from vlm_models.processors.qwen2_vl import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Qwen2VLVideoProcessor
from vlm_models.video import VideoLoadError, VideoSampling, read_video

from .conftest import serving

RATE, TONE_HZ, SECONDS, LEVEL = 22_050, 440.0, 1.5, 0.5
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128)]


def tone(rate: int = RATE) -> np.ndarray:
    """(samples, 2): the tone on the left channel, silence on the right (so the mono mix is half as loud)."""
    t = np.arange(int(SECONDS * rate)) / rate
    left = LEVEL * np.sin(2 * np.pi * TONE_HZ * t)
    return np.stack([left, np.zeros_like(left)], axis=1).astype(np.float32)


def encode_with_pyav(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def pitch_and_level(samples: np.ndarray, rate: int = 16_000) -> tuple[float, float]:
    middle = samples[len(samples) // 4 : 3 * len(samples) // 4]  # away from codec edges
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    return float(np.fft.rfftfreq(len(middle), 1 / rate)[spectrum.argmax()]), float(np.abs(middle).max())


@pytest.mark.parametrize(
    "container",
    ["wav", "flac", "ogg-opus", "mp3", "m4a-aac"],
)
def test_a_synthesised_tone_reads_back_as_written(tmp_path: Path, container: str) -> None:
    samples = tone()
    if container in ("wav", "flac"):
        path = tmp_path / f"tone.{container}"
        soundfile.write(path, samples, RATE)
        data = path.read_bytes()
    else:
        fmt, codec = {"ogg-opus": ("ogg", "libopus"), "mp3": ("mp3", "libmp3lame"), "m4a-aac": ("mp4", "aac")}[
            container
        ]
        rate = 48_000 if codec == "libopus" else RATE  # Opus runs at 48 kHz
        data = encode_with_pyav(tone(rate), rate, fmt, codec)
    mono = load_audio(data, 16_000)
    # Length: 1.5 s, exactly for the lossless ones, within a lossy encoder's priming and padding (AAC's is
    # about 0.08 s here); pitch and level: the tone, mixed down from two channels.
    slack = 1e-3 if container in ("wav", "flac") else 0.1
    assert abs(len(mono) / 16_000 - SECONDS) < slack, len(mono)
    pitch, level = pitch_and_level(mono)
    assert abs(pitch - TONE_HZ) < 2.0 and abs(level - LEVEL / 2) < 0.03, (pitch, level)
    duration = audio_duration(data)
    assert duration is None or abs(duration - SECONDS) < slack
    if container == "wav":  # lossless and exactly resampled where the rate matches: the samples themselves
        np.testing.assert_allclose(load_audio(Audio(samples, RATE), RATE), samples.mean(axis=1), atol=1e-4)


def test_the_sound_track_of_a_video_is_read(tmp_path: Path) -> None:
    path = tmp_path / "with_sound.mp4"
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=Fraction(10))
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        sound = out.add_stream("aac", rate=RATE, layout="stereo")
        for i in range(int(SECONDS * 10)):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 15 * i, np.uint8), format="rgb24")
            for packet in video.encode(frame):
                out.mux(packet)
        chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone().T), format="fltp", layout="stereo")
        chunk.sample_rate = RATE
        for packet in [*sound.encode(chunk), *sound.encode(None), *video.encode(None)]:
            out.mux(packet)
    pitch, level = pitch_and_level(load_audio(path, 16_000))
    assert abs(pitch - TONE_HZ) < 2.0 and abs(level - LEVEL / 2) < 0.03
    assert read_video(path).total_frames == 15


def test_the_tone_s_whisper_features_peak_in_its_mel_band() -> None:
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    mono = load_audio(Audio(tone(), RATE), 16_000)
    features = extractor([mono])
    assert features["attention_mask"].sum() == len(mono) // 160 + (len(mono) % 160 > 0)
    frames = features["input_features"][0][:, 10 : int(SECONDS * 100) - 10]  # inside the tone
    fft_bin = round(TONE_HZ / (16_000 / extractor.n_fft))
    expected_band = int(extractor.mel_filters[fft_bin].argmax())
    assert set(frames.argmax(axis=0).tolist()) <= {expected_band - 1, expected_band, expected_band + 1}
    silence = features["input_features"][0][:, int(SECONDS * 100) + 5 :]
    assert silence.max() <= frames.max() - 1.9  # Whisper's floor: 8 (log10) below the peak, scaled by 1/4


def coloured_clip(path: Path, fps: int = 7) -> None:
    """One solid colour per frame, lossless (PNG frames in QuickTime), 56x84 pixels (a multiple of 28)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("png", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = 84, 56, "rgb24"
        for colour in COLOURS:
            frame = av.VideoFrame.from_ndarray(np.full((56, 84, 3), colour, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def test_a_clip_of_coloured_frames_reads_and_patches_as_written(tmp_path: Path) -> None:
    path = tmp_path / "colours.mov"
    coloured_clip(path)
    video = read_video(path)
    assert video.total_frames == len(COLOURS) and video.fps == 7
    assert [tuple(int(v) for v in f[0, 0]) for f in video.frames] == COLOURS
    assert all((f == f[0, 0]).all() for f in video.frames)  # solid
    processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=56 * 84)
    out = processor([video])
    # Seven frames: padded to eight by repeating the last, four temporal patches of a 4x6 grid (56x84 unresized).
    assert out.arrays["video_grid_thw"].tolist() == [[4, 4, 6]]
    patches = out.arrays["pixel_values_videos"].reshape(4, 24, 3, 2, 14 * 14)  # (t, patch, C, T', P*P)
    frames = [*COLOURS, COLOURS[-1]]
    for t in range(4):
        for k in range(2):
            colour = np.asarray(frames[2 * t + k], np.float32) / 255
            expected = (colour - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
            np.testing.assert_allclose(
                patches[t, :, :, k], np.broadcast_to(expected[None, :, None], (24, 3, 196)), atol=1e-5
            )
    # Sampling 2 frames a second from the 1 s clip: min_frames (4) evenly from the first frame.
    sampled = processor.with_sampling(VideoSampling(fps=2))
    indices = sampled.frame_indices(video.total_frames, video.fps)
    assert indices.tolist() == [0, 1, 3, 5]
    picked = sampled([read_video(path, select=sampled.frame_indices)])
    assert picked.arrays["video_grid_thw"].tolist() == [[2, 4, 6]]


def test_bad_media_gets_one_clear_line(tmp_path: Path) -> None:
    """Not audio, not a video, an unsupported codec, zero frames, zero-length audio, a rate soxr cannot take."""
    text = tmp_path / "notes.mp3"
    text.write_text("these are words, not sound")
    cases = [
        (lambda: load_audio(text, 16_000), AudioLoadError, "cannot decode audio"),
        (lambda: load_audio(np.zeros(0, np.float32), 16_000), AudioLoadError, "holds no samples"),
        (lambda: load_audio(np.full(100, np.nan, np.float32), 16_000), AudioLoadError, "NaN"),
        (lambda: load_audio(Audio(np.zeros(10, np.float32), 0), 16_000), AudioLoadError, "sampling rate"),
        (lambda: load_audio(Audio(np.zeros(1000, np.float32), 10**12), 16_000), AudioLoadError, "outside"),
        (lambda: load_audio(Audio(np.zeros(1000, np.float32), 3), 16_000), AudioLoadError, "outside"),
        (lambda: read_video(text), VideoLoadError, "cannot read video"),
        (lambda: read_video(b""), VideoLoadError, "empty"),
    ]
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(0, np.float32), 16_000)
    cases.append((lambda: load_audio(silent, 16_000), AudioLoadError, "holds no samples"))
    sound_only = tmp_path / "sound_only.m4a"
    sound_only.write_bytes(encode_with_pyav(tone(), RATE, "mp4", "aac"))
    cases.append((lambda: read_video(sound_only), VideoLoadError, "no video stream"))
    for run, error, says in cases:
        with pytest.raises(error) as caught:
            run()
        message = str(caught.value)
        assert says in message and "\n" not in message, message


def test_an_audio_url_reads_as_the_file(tmp_path: Path) -> None:
    """``--audio URL`` / ``audio="https://..."``: fetched (bounded), then decoded as the file would be; a missing
    one is one line."""
    soundfile.write(tmp_path / "tone.flac", tone(), RATE)
    with serving(tmp_path) as base:
        np.testing.assert_array_equal(
            load_audio(f"{base}/tone.flac", 16_000), load_audio(tmp_path / "tone.flac", 16_000)
        )
        with pytest.raises(AudioLoadError, match=r"cannot fetch audio .*HTTP 404") as caught:
            load_audio(f"{base}/missing.wav", 16_000)
        assert "\n" not in str(caught.value)
