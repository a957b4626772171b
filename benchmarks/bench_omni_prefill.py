"""Prefill time against audio length (Qwen2-Audio) and against the number of video frames (Qwen2-VL).

Random-weight models built in memory from the tiny fixtures' configs with the layer widths scaled up (``--preset``),
driven through the fixtures' processors (so the token ids and the prompt layout are the real families'): for
each clip length / frame count the script times, separately and as the median of ``--runs`` warm runs,

* ``features``: reading and preprocessing (log-mel, or decoding, resizing and patching the frames);
* ``tower``: ``embed_prompt`` (the audio encoder or vision tower and the merge), evaluated;
* ``decoder``: the chunked prefill of the prompt's embeddings to the first token's logits.

Qwen2-Audio pads every clip to its 30 s window, so its encoder costs the same for any length; only the decoder's
prompt (25 tokens a second) grows. A Qwen2-VL clip's tokens grow with its frames (one run of h*w/4 tokens per two
frames), and so do both the tower's and the decoder's work.

    uv run --frozen python benchmarks/bench_omni_prefill.py --preset small
    uv run --frozen python benchmarks/bench_omni_prefill.py --preset wide --runs 2   # the 7B / 2B widths, 2 layers
    uv run --frozen python benchmarks/bench_omni_prefill.py --only gemma3n            # Gemma 3n's audio tower
    python3 benchmarks/bench_omni_prefill.py --preset 2b --dtype bfloat16 --runs 2    # on the accelerator
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DTYPE = ["float32"]
"""The weights' dtype (--dtype; bfloat16 on the accelerator)."""
PRESETS = {
    # Whisper-base-like encoder and a small decoder; Qwen2-VL's tower at a quarter width.
    "small": {
        "audio": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
        "text": dict(
            hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4
        ),
        "vision": dict(embed_dim=320, depth=4, num_heads=4, hidden_size=1024),
    },
    # Qwen2-Audio-7B's and Qwen2-VL-2B's widths with the depths cut to 2 (a 2-core CPU cannot run 32 + 32).
    "wide": {
        "audio": dict(d_model=1280, encoder_layers=2, encoder_attention_heads=20, encoder_ffn_dim=5120),
        "text": dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
        "vision": dict(embed_dim=1280, depth=2, num_heads=16, hidden_size=1536),
    },
    # Full depth for the accelerator: Whisper-large's encoder (Qwen2-Audio's) and Qwen2-VL-2B's tower and decoder.
    "2b": {
        "audio": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120),
        "text": dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
        ),
        "vision": dict(embed_dim=1280, depth=32, num_heads=16, hidden_size=1536),
    },
}


def scaled_model(family: str, preset: dict, window_positions: int | None = None):
    import mlx.core as mx

    from vlm_models.registry import architecture_for

    config = json.loads((FIXTURES / family / "hf5" / "config.json").read_text())
    config = copy.deepcopy(config)
    config["text_config"] = {**config.get("text_config", {}), **preset["text"]}
    if family == "qwen2_audio":
        config["audio_config"] = {**config["audio_config"], **preset["audio"], "max_source_positions": window_positions}
    else:
        vision = dict(preset["vision"])
        vision["hidden_size"] = preset["text"]["hidden_size"]
        config["vision_config"] = {**config["vision_config"], **vision}
        half = preset["text"]["hidden_size"] // preset["text"]["num_attention_heads"] // 2
        rope = dict(config["text_config"].get("rope_parameters") or {})
        config["text_config"]["rope_parameters"] = {**rope, "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}
    model = architecture_for(config["model_type"]).load_module().Model.from_hf_config(config)
    if DTYPE[0] != "float32":
        model.set_dtype(getattr(mx, DTYPE[0]))
    mx.eval(model.parameters())
    return model


def timed(function, arrays=lambda value: value):
    """Seconds to compute and evaluate ``function()`` (``arrays`` picks what to evaluate), and its value."""
    import mlx.core as mx

    start = time.perf_counter()
    value = function()
    mx.eval(arrays(value))
    return time.perf_counter() - start, value


def measure(model, make_inputs, runs: int) -> dict[str, float]:
    from vlm_runtime.generate import prefill

    rows = []
    for _ in range(runs + 1):  # the first run warms up
        t_features, inputs = timed(make_inputs)
        t_tower, prompt = timed(lambda: model.embed_prompt(**inputs), lambda p: p.inputs_embeds)  # noqa: B023
        t_decoder, _ = timed(lambda: prefill(model, prompt, model.make_cache(), 2048))  # noqa: B023
        rows.append((t_features, t_tower, t_decoder, int(inputs["input_ids"].shape[1])))
    rows = rows[1:]
    keys = ("features", "tower", "decoder")
    out = {k: statistics.median(r[i] for r in rows) for i, k in enumerate(keys)}
    out["tokens"] = rows[0][3]
    return out


def audio_rows(preset: dict, seconds: list[float], runs: int) -> list[tuple[str, dict]]:
    from vlm_models import apply_chat_template, load
    from vlm_models.audio import Audio
    from vlm_models.processors.qwen2_audio import Qwen2AudioFeatureExtractor

    _, processor = load(FIXTURES / "qwen2_audio" / "hf4")
    processor.audio_processor = Qwen2AudioFeatureExtractor(chunk_length=30)  # the released checkpoints' window
    model = scaled_model("qwen2_audio", preset, window_positions=1500)
    prompt = apply_chat_template(processor, None, "What is said?", num_audios=1)
    rows = []
    for s in seconds:
        t = np.arange(int(16_000 * s)) / 16_000
        clip = Audio((0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t)).astype(np.float32), 16_000)
        rows.append(
            (f"{s:g} s audio", measure(model, lambda c=clip: processor.prepare_inputs(prompt, audios=[c]), runs))
        )
    return rows


def video_rows(preset: dict, frame_counts: list[int], runs: int) -> list[tuple[str, dict]]:
    import av

    from vlm_models import apply_chat_template, load
    from vlm_models.video import VideoSampling

    _, processor = load(FIXTURES / "qwen2_vl" / "hf4")  # 224x224 at most per frame: 64 tokens per two frames
    model = scaled_model("qwen2_vl", preset)
    prompt = apply_chat_template(processor, None, "What happens?", num_videos=1)
    folder = Path(tempfile.mkdtemp())
    clip = folder / "clip.mp4"
    with av.open(str(clip), "w") as out:  # 64 frames at 8 fps, 224x224, moving gradients
        stream = out.add_stream("mpeg4", rate=Fraction(8))
        stream.width = stream.height = 224
        stream.pix_fmt = "yuv420p"
        yy, xx = np.mgrid[0:224, 0:224]
        for i in range(max(frame_counts)):
            frame = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, np.full_like(xx, 8 * i % 256)], -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    rows = []
    for n in frame_counts:
        sampling = VideoSampling(num_frames=n)
        rows.append(
            (
                f"{n} frames",
                measure(
                    model, lambda s=sampling: processor.prepare_inputs(prompt, videos=[clip], video_sampling=s), runs
                ),
            )
        )
    return rows


GEMMA3N = {
    # A scaled-down E2B: the USM tower at a third of its width and depth over the real features (128 mel bins,
    # the subsampling's 128 / 32 channels, chunks of 12 with 12 frames of left context), 188 tokens per clip; a
    # 4-layer decoder of 1024 with AltUp, Laurel, per-layer inputs and KV sharing.
    "text": dict(
        hidden_size=1024,
        intermediate_size=[4096] * 6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        hidden_size_per_layer_input=64,
        laurel_rank=64,
        sliding_window=512,
    ),
    "audio": dict(
        hidden_size=512,
        conf_num_hidden_layers=4,
        conf_num_attention_heads=8,
        sscp_conv_channel_size=[128, 32],
        conf_attention_chunk_size=12,
        conf_attention_context_left=13,
    ),
}


def gemma3n_rows(seconds: list[float], runs: int) -> list[tuple[str, dict]]:
    """Gemma 3n: every clip takes 188 tokens whatever its length, but its tower runs over all its frames."""
    import dataclasses

    import mlx.core as mx

    from vlm_models import apply_chat_template, load
    from vlm_models.audio import Audio
    from vlm_models.models.gemma3n import Model

    _, processor = load(FIXTURES / "gemma3n" / "hub")
    processor.audio_processor = dataclasses.replace(processor.audio_processor, audio_seq_length=188)
    config = json.loads((FIXTURES / "gemma3n" / "hub" / "config.json").read_text())
    config["text_config"] = {**config["text_config"], **GEMMA3N["text"]}
    config["audio_config"] = {**config["audio_config"], **GEMMA3N["audio"]}
    config["audio_soft_tokens_per_image"] = 188
    model = Model.from_hf_config(config)
    mx.eval(model.parameters())
    prompt = apply_chat_template(processor, None, "What is said?", num_audios=1)
    rows = []
    for s in seconds:
        t = np.arange(int(16_000 * s)) / 16_000
        clip = Audio((0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t)).astype(np.float32), 16_000)
        rows.append(
            (
                f"Gemma 3n, {s:g} s audio",
                measure(model, lambda c=clip: processor.prepare_inputs(prompt, audios=[c]), runs),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seconds", type=float, nargs="+", default=[1, 5, 10, 20, 30])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument(
        "--only", choices=["audio", "video", "gemma3n"], help="measure one of the two (or Gemma 3n's audio alone)"
    )
    args = parser.parse_args()
    from vlm_kernels.cpu_blas import route_cpu_blas

    routing = route_cpu_blas()  # before MLX loads, as the `vlm` commands do (MLX's own CPU BLAS is netlib's)
    import mlx.core as mx

    preset = PRESETS[args.preset]
    DTYPE[0] = args.dtype
    print(
        f"{platform.processor() or platform.machine()}, mlx {mx.__version__}, device {mx.default_device()}, "
        f"preset {args.preset}, {args.dtype}, median of {args.runs} warm runs, CPU BLAS: {routing.reason}"
    )
    print("| input | prompt tokens | features ms | tower ms | decoder ms | prefill ms (tower + decoder) |")
    print("|---|---|---|---|---|---|")
    if args.only == "gemma3n":
        rows = gemma3n_rows(args.seconds, args.runs)
    else:
        rows = [] if args.only == "video" else audio_rows(preset, args.seconds, args.runs)
        rows += [] if args.only == "audio" else video_rows(preset, args.frames, args.runs)
    for label, row in rows:
        total = row["tower"] + row["decoder"]
        print(
            f"| {label} | {row['tokens']} | {1e3 * row['features']:.0f} | {1e3 * row['tower']:.0f} | "
            f"{1e3 * row['decoder']:.0f} | {1e3 * total:.0f} |"
        )


if __name__ == "__main__":
    main()
