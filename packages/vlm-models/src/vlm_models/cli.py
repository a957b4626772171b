"""The ``vlm`` command: ``vlm generate``, ``vlm bench``, ``vlm convert``.

Other packages add subcommands through the ``vlm.commands`` entry-point group (a callable that takes the
subparsers object), so this module never imports them.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .command_parser import CommandParser, non_negative_int, positive_int, report

__all__ = [
    "add_activation_quantization_arg",
    "add_kv_cache_args",
    "add_model_args",
    "add_media_args",
    "add_sampling_args",
    "generation_settings",
    "kv_cache_options",
    "load_model",
    "main",
    "prepare_process",
    "run_command",
]


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .loading import ModelLoadError
    from .processors.image import ImageLoadError
    from .registry import UnsupportedModelError

    return (CommandError, ConfigError, ModelLoadError, ImageLoadError, UnsupportedModelError, ValueError, OSError)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model, its length limits and its KV cache: shared by generate, bench and chat."""
    parser.add_argument(
        "--model",
        default=None,
        help="local folder or Hugging Face repo id (default: the shipped shapes demo model, offline)",
    )
    parser.add_argument("--adapter-path", default=None, help="folder with adapters.safetensors from `vlm train`")
    parser.add_argument("--max-tokens", type=non_negative_int, default=256)
    parser.add_argument("--prefill-step-size", type=positive_int, default=2048)
    parser.add_argument("--trust-remote-code", action="store_true")
    add_activation_quantization_arg(parser)
    add_kv_cache_args(parser)


def add_activation_quantization_arg(parser: argparse.ArgumentParser) -> None:
    """``-qa``: shared by generate, bench, chat and serve."""
    parser.add_argument(
        "-qa",
        "--quantize-activations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run an mxfp8/nvfp4 checkpoint's linear layers activation-quantized (nn.QQLinear); default: on CUDA",
    )


def add_media_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    parser.add_argument("--video", action="append", default=[], help="video file, folder of frame images (repeatable)")
    parser.add_argument(
        "--audio", action="append", default=[], help="audio file or http(s) URL (wav, flac, mp3, m4a, ...; repeatable)"
    )
    parser.add_argument("--video-audio", action="store_true", help="hear each video's sound track too (Qwen2.5-Omni)")
    parser.add_argument("--video-fps", type=float, default=None, help="frames taken per second of video")
    parser.add_argument("--video-num-frames", type=int, default=None, help="take exactly this many frames")
    parser.add_argument("--video-max-frames", type=int, default=None, help="take at most this many frames")
    parser.add_argument(
        "--video-source-fps", type=float, default=None, help="the rate a folder of frames was captured at"
    )


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_media_args(parser)
    parser.add_argument("--prompt", default="Describe this image.", help="the user message")
    parser.add_argument("--system", default=None, help="system message")


def _bits(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() else value


def add_draft_args(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding's flags (``vlm generate`` and ``vlm serve``)."""
    from .drafting import DRAFT_KINDS

    parser.add_argument(
        "--draft-model",
        default=None,
        help="speculative decoding: a drafter (a smaller model sharing the target's tokenizer, or an EAGLE-3 "
        "head) as a folder or repo id",
    )
    parser.add_argument(
        "--draft-kind",
        default=None,
        choices=list(DRAFT_KINDS),
        help="the drafter's kind (default: read from its config)",
    )
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="most tokens drafted per round (default 4)")


def add_kv_cache_args(parser: argparse.ArgumentParser) -> None:
    """The KV cache options of ``vlm generate``, ``vlm bench`` and ``vlm serve`` (see ``kv_cache_options``)."""
    parser.add_argument("--max-kv-size", type=int, default=None, help="sliding-window KV cache of this many tokens")
    parser.add_argument(
        "--kv-bits",
        type=_bits,
        default=None,
        help="quantize the KV cache: 4 or 8 (affine), or 2, 2.5, 3, 3.5, 4 with --kv-quant-scheme turboquant "
        "(x.5: x-bit keys, x+1-bit values)",
    )
    parser.add_argument("--kv-group-size", type=int, default=64, choices=[32, 64, 128], help="affine scheme only")
    parser.add_argument("--kv-quant-scheme", default="affine", choices=["affine", "turboquant"])
    parser.add_argument("--kv-key-bits", type=_bits, default=None, help="turboquant: bits of the keys")
    parser.add_argument("--kv-value-bits", type=_bits, default=None, help="turboquant: bits of the values")


def kv_cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed KV cache options, as ``CacheSettings`` fields."""
    names = ("max_kv_size", "kv_bits", "kv_group_size", "kv_quant_scheme", "kv_key_bits", "kv_value_bits")
    return {name: getattr(args, name) for name in names}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--repetition-context-size", type=int, default=20)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--enable-thinking", action="store_true", help="ask the chat template to open a thinking block")
    parser.add_argument("--thinking-budget", type=int, default=None, help="tokens allowed inside the thinking block")
    parser.add_argument(
        "--thinking-start-token", default=None, help="default: the model's (<think>; Gemma 4: <|channel>)"
    )
    parser.add_argument(
        "--thinking-end-token", default=None, help="default: the model's (</think>; Gemma 4: <channel|>)"
    )
    add_draft_args(parser)
    parser.add_argument(
        "--prompt-cache-file",
        default=None,
        help="reuse the prompt cache saved in this file where it holds a prefix of the prompt; save it afterwards",
    )


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and processor ``--model`` names (the shipped demo model without it), with ``--adapter-path``."""
    from .loading import load

    if args.model is None:
        from .demo import demo_model_path

        args.model = str(demo_model_path())
    return load(
        args.model,
        adapter_path=args.adapter_path,
        trust_remote_code=args.trust_remote_code,
        quantize_activations=getattr(args, "quantize_activations", None),
    )


def check_media_args(args: argparse.Namespace) -> None:
    """What the media flags say that can be checked before the (slow) model load: local files that are not
    there, ``--video-audio`` without a video."""
    if args.video_audio and not args.video:
        raise CommandError("--video-audio hears the sound track of a --video; no --video was given")
    for flag, sources, what in (
        ("--image", args.image, "image file"),
        ("--video", args.video, "video"),  # a file or a folder of frames
        ("--audio", args.audio, "audio file"),
    ):
        for source in sources:
            is_url = _URL_SCHEME.match(source) is not None or source[:5].lower() == "data:"
            if not is_url and not Path(source).expanduser().exists():
                raise CommandError(f"{flag} {source}: {what} not found")


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _load_and_format(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from .chat import apply_chat_template

    check_media_args(args)
    model, processor = load_model(args)
    if args.video and not processor.supports_video:
        raise CommandError(f"{args.model}: this model does not take video input (--video)")
    if args.audio and not processor.supports_audio:
        raise CommandError(f"{args.model}: this model does not take audio input (--audio)")
    prompt = apply_chat_template(
        processor,
        None,
        args.prompt,
        num_images=len(args.image),
        num_videos=len(args.video),
        num_audios=len(args.audio),
        system=args.system,
        enable_thinking=True if getattr(args, "enable_thinking", False) else None,
    )
    return model, processor, prompt


def _media_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The videos and audio clips of the command line (and the videos' sampling), as keywords of stream_generate
    (none without them)."""
    audio = {"audios": args.audio} if args.audio else {}
    if not args.video:
        return audio
    return {"videos": args.video, "video_sampling": video_sampling(args), **audio}


def video_sampling(args: argparse.Namespace) -> Any:
    """How ``--video-fps``, ``--video-num-frames``, ... say to sample a video."""
    from .video import VideoSampling

    return VideoSampling(
        fps=args.video_fps,
        num_frames=args.video_num_frames,
        max_frames=args.video_max_frames,
        source_fps=args.video_source_fps,
        with_audio=args.video_audio,
    )


def _cache_settings(args: argparse.Namespace) -> Any:
    from vlm_runtime import CacheSettings

    return CacheSettings(**kv_cache_options(args))


def generation_settings(args: argparse.Namespace) -> Any:
    """The typed settings of ``vlm generate``'s flags (each checked by its settings class)."""
    from vlm_runtime import GenerationConfig, GenerationSettings, SamplingParams, ThinkingConfig

    return GenerationSettings(
        sampling=SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            repetition_penalty=args.repetition_penalty,
            repetition_context_size=args.repetition_context_size,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
        ),
        config=GenerationConfig(
            max_tokens=args.max_tokens,
            prefill_step_size=args.prefill_step_size,
            stop=args.stop,
            num_draft_tokens=args.num_draft_tokens,
        ),
        thinking=ThinkingConfig(args.thinking_budget, args.thinking_start_token, args.thinking_end_token),
        cache=_cache_settings(args),
    )


def _generate(args: argparse.Namespace) -> None:
    from vlm_runtime import PromptCache, stream_generate

    settings = generation_settings(args)  # bad values are reported before the model loads
    model, processor, prompt = _load_and_format(args)
    drafter = None
    if args.draft_model is not None:
        from .drafting import load_drafter

        drafter, _ = load_drafter(args.draft_model, target_processor=processor, kind=args.draft_kind, target=model)
    if args.verbose:
        print(f"prompt:\n{prompt}", file=sys.stderr)
    cache_file = Path(args.prompt_cache_file) if args.prompt_cache_file else None
    prompt_cache = PromptCache()
    if cache_file is not None and cache_file.exists():
        prompt_cache, _ = PromptCache.load(cache_file)
    last = None
    thinking = False
    start_marker, end_marker = settings.thinking.markers(processor.thinking_markers)
    for last in stream_generate(
        model,
        processor,
        prompt,
        image=args.image,
        **_media_inputs(args),
        prompt_cache=prompt_cache,
        draft_model=drafter,
        settings=settings,
    ):
        if last.reasoning:
            if not thinking:
                print(start_marker, end="")
                thinking = True
            print(last.reasoning, end="", flush=True)
        if last.text:
            if thinking:
                print(f"{end_marker}\n", end="")
                thinking = False
            print(last.text, end="", flush=True)
    print()
    assert last is not None
    if cache_file is not None:
        prompt_cache.save(cache_file)
    if processor.supports_images and not (args.image or args.video or args.audio):
        print(
            f"{args.command_name}: note: no --image given, so the model answered from the prompt alone "
            "(add --image PATH to ask about a picture)",
            file=sys.stderr,
        )
    cached = f" ({last.cached_tokens} from the prompt cache)" if last.cached_tokens else ""
    drafted = ""
    if drafter is not None:
        rate = last.accepted_draft_tokens / last.draft_tokens if last.draft_tokens else 0.0
        drafted = f" | drafted: {last.draft_tokens}, accepted: {last.accepted_draft_tokens} ({rate:.0%})"
    print(
        f"prompt: {last.prompt_tokens} tokens{cached}, {last.prompt_tps:.1f} tok/s | "
        f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
        f"peak memory: {last.peak_memory:.3f} GB | finish: {last.finish_reason}{drafted}",
        file=sys.stderr,
    )


def _bench(args: argparse.Namespace) -> None:
    import mlx.core as mx

    from vlm_runtime import GenerationConfig, GenerationSettings, stream_generate

    if args.peer is not None:
        from .bench_suite import check_peer

        try:
            check_peer(args.peer)
        except RuntimeError as error:
            raise CommandError(str(error)) from None
    if args.shape is not None:
        if args.model is not None:
            raise CommandError(
                "--shape benchmarks a random checkpoint of that shape: give --model or --shape, not both"
            )
        from .bench_shapes import shape_checkpoint

        args.model = str(
            shape_checkpoint(
                args.shape, dtype=args.dtype, bits=args.q_bits, progress=lambda line: print(line, file=sys.stderr)
            )
        )
    elif args.q_bits is not None or args.dtype != "bfloat16":
        raise CommandError("--dtype and --q-bits choose the random checkpoint of --shape; they need --shape")
    if args.suite or args.json or args.peer:
        if not args.suite:
            raise CommandError("--json and --peer report the --suite measurements; add --suite")
        _bench_suite(args)
        return

    config = GenerationConfig(max_tokens=args.max_tokens, prefill_step_size=args.prefill_step_size, ignore_eos=True)
    settings = GenerationSettings(config=config, cache=_cache_settings(args))
    model, processor, prompt = _load_and_format(args)
    videos = _media_inputs(args)
    inputs = processor.prepare_inputs(
        prompt, args.image, videos.get("videos", ()), videos.get("video_sampling"), videos.get("audios", ())
    )
    rows = []
    for run in range(args.warmup + args.runs):
        vision_s = 0.0
        if args.image or args.video:
            tic = time.perf_counter()
            mx.eval(model.embed_prompt(**inputs).inputs_embeds)
            vision_s = time.perf_counter() - tic
        last = None
        for last in stream_generate(  # noqa: B007
            model, processor, prompt, image=args.image, **videos, settings=settings
        ):
            pass
        assert last is not None
        if run >= args.warmup:
            rows.append((vision_s, last.prompt_tps, last.generation_tps, last.peak_memory, last.generation_tokens))
    print(
        f"model: {args.model} | prompt tokens: {int(inputs['input_ids'].size)} | images: {len(args.image)} | videos: {len(args.video)}"
    )
    print("run  vision_s  prompt_tok/s  gen_tok/s  peak_GB  gen_tokens")
    for i, (v, p, g, m, n) in enumerate(rows):
        print(f"{i:>3}  {v:8.4f}  {p:12.1f}  {g:9.1f}  {m:7.3f}  {n:10d}")
    vision, prompt_tps, generation_tps, peak = (statistics.median(column) for column in list(zip(*rows))[:4])
    print(
        f"median: vision {vision:.4f} s | prompt {prompt_tps:.1f} tok/s | generation {generation_tps:.1f} tok/s | "
        f"peak {peak:.3f} GB"
    )


SHAPE_NAMES = ("qwen2-vl-2b", "qwen2-vl-7b", "qwen3-vl-4b", "qwen3-vl-tiny", "tiny")
"""``bench_shapes.SHAPES``' names, here so that ``vlm --help`` does not import MLX (a test keeps them equal)."""


def _bench_suite(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .bench_suite import SuiteOptions, format_suite, run_suite

    model, processor = load_model(args)
    options = SuiteOptions(
        image_sizes=tuple(args.image_sizes),
        prefill_tokens=tuple(args.prefill_tokens),
        batch_sizes=tuple(args.batch_sizes),
        decode_tokens=args.max_tokens,
        runs=args.runs,
        warmup=args.warmup,
        peer=args.peer,
    )
    result = run_suite(
        model, processor, args.model, options, progress=lambda line: print(f"bench: {line}", file=sys.stderr)
    )
    print(format_suite(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


_SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def _shard_size(text: str) -> int:
    """'5GB', '512MB', '64KB' or a byte count (1KB = 1024 bytes) -> bytes."""
    value = text.strip().upper()
    unit = next((u for u in ("KB", "MB", "GB", "B") if value.endswith(u)), "B")
    number = value[: len(value) - len(unit)] if value.endswith(unit) else value
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 512MB or 4096") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard size must be positive")
    return size


def _add_convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-path", required=True, help="source: local folder or Hugging Face repo id, any layout")
    parser.add_argument("--mlx-path", required=True, help="new folder for the MLX-community layout")
    parser.add_argument("--revision", default=None, help="of a Hugging Face repo id")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="cast floating-point weights (default: keep the checkpoint's)",
    )
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize linear and embedding layers")
    parser.add_argument(
        "--q-bits",
        type=int,
        choices=[2, 3, 4, 6, 8],
        default=None,
        help="bits per weight (affine: default 4; fixed by the fp modes)",
    )
    parser.add_argument(
        "--q-group-size",
        type=int,
        choices=[32, 64, 128],
        default=None,
        help="weights sharing a scale (affine: default 64; mxfp4/mxfp8 fix 32, nvfp4 16)",
    )
    parser.add_argument(
        "--q-mode",
        choices=["affine", "mxfp4", "mxfp8", "nvfp4"],
        default=None,
        help="quantization format (default affine)",
    )
    parser.add_argument("--skip-vision", action="store_true", help="with -q: keep the vision tower in float")
    parser.add_argument(
        "--quant-recipe",
        default=None,
        metavar="NAME",
        help="with -q: per-layer settings from a preset (routers-8bit, vision-8bit, edges-8bit, mixed-8bit)",
    )
    parser.add_argument(
        "--quant-predicate",
        default=None,
        metavar="FILE",
        help='with -q: JSON of layer-path glob -> {"bits", "group_size", "mode"} or false (keep float)',
    )
    parser.add_argument("--dequantize", action="store_true", help="turn a quantized checkpoint back into float")
    parser.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default="5GB",
        help="largest safetensors shard, e.g. 5GB, 512MB (default 5GB)",
    )
    parser.add_argument("--verbose", action="store_true", help="print tracebacks")


def _convert(args: argparse.Namespace) -> None:
    from .convert import ConvertOptions, convert
    from .quantize import QuantizeOptions

    quantize = None
    if args.quantize:
        quantize = QuantizeOptions.for_mode(args.q_mode or "affine", args.q_bits, args.q_group_size)
    else:
        given = [
            flag
            for flag, value in (
                ("--q-bits", args.q_bits),
                ("--q-group-size", args.q_group_size),
                ("--q-mode", args.q_mode),
                ("--skip-vision", args.skip_vision),
                ("--quant-recipe", args.quant_recipe),
                ("--quant-predicate", args.quant_predicate),
            )
            if value
        ]
        if given:
            raise CommandError(f"without -q there is nothing to quantize: drop {', '.join(given)} or add -q")
    options = ConvertOptions(
        dtype=args.dtype,
        quantize=quantize,
        skip_vision=args.skip_vision,
        dequantize=args.dequantize,
        recipe=args.quant_recipe,
        predicate_file=args.quant_predicate,
        max_shard_bytes=args.max_shard_size,
        progress=True,
        revision=args.revision,
    )
    report = convert(args.hf_path, args.mlx_path, options)
    for reason in sorted(set(report.kept_float.values())):
        layers = sorted(layer for layer, why in report.kept_float.items() if why == reason)
        shown = ", ".join(layers[:6]) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
        print(f"kept in float ({reason}): {shown}", file=sys.stderr)
    if quantize is not None:
        print(
            f"quantized {len(report.quantized)} layers ({quantize.mode}, {quantize.bits} bits, "
            f"group size {quantize.group_size}); {len(report.kept_float)} stay float",
            file=sys.stderr,
        )
    if report.own_settings:
        by_setting: dict[str, list[str]] = {}
        for layer, settings in report.own_settings.items():
            by_setting.setdefault(
                f"{settings.mode}, {settings.bits} bits, group size {settings.group_size}", []
            ).append(layer)
        for setting, layers in sorted(by_setting.items()):
            shown = ", ".join(sorted(layers)[:6]) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
            print(f"quantized at {setting}: {shown}", file=sys.stderr)
    if report.dequantized:
        print(f"dequantized {report.dequantized} layers", file=sys.stderr)
    print(
        f"wrote {report.destination} ({report.model_type}): {report.tensors} tensors in {report.shards} shard(s), "
        f"{report.total_bytes / 1e6:.1f} MB"
    )


def _add_eval_quant_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="float checkpoint (default: the shipped demo model)")
    parser.add_argument(
        "--modes",
        default="affine4,affine8,mxfp4,mxfp8,nvfp4",
        help="comma-separated formats: affine<bits>, mxfp4, mxfp8, nvfp4, recipe:<preset> (over affine 4 bits)",
    )
    parser.add_argument("--image", action="append", default=[], help="ask the prompt set's image prompts of these")
    parser.add_argument(
        "--prompts", default=None, help="prompt set JSON (default: examples/eval_quant_prompts.json of the repo)"
    )
    parser.add_argument("--tokens", type=int, default=32, help="teacher-forced tokens per prompt")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens generated to time decoding")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks")


def _default_prompt_set() -> Any:
    from pathlib import Path

    for folder in (Path.cwd(), *Path(__file__).resolve().parents):
        candidate = folder / "examples" / "eval_quant_prompts.json"
        if candidate.is_file():
            return candidate
    raise CommandError("no examples/eval_quant_prompts.json here or above; pass --prompts FILE")


def _eval_quant(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .quant_eval import (
        evaluate_quantization,
        format_table,
        load_prompt_set,
        parse_modes,
        progress_to_stderr,
        report_json,
    )

    if args.tokens < 1 or args.decode_tokens < 1:
        raise CommandError("--tokens and --decode-tokens must be at least 1")
    modes = parse_modes(args.modes)
    prompts = load_prompt_set(Path(args.prompts) if args.prompts else _default_prompt_set(), args.image)
    if args.model is None:
        from .demo import demo_model_path

        args.model = str(demo_model_path())
    rows = evaluate_quantization(
        args.model, modes, prompts, tokens=args.tokens, decode_tokens=args.decode_tokens, progress=progress_to_stderr
    )
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(args.model, prompts, args.tokens, rows), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="vlm", description="Run vision-language models on MLX.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt, images and videos")
    _add_generation_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--verbose", action="store_true", help="print the formatted prompt and tracebacks")
    gen.set_defaults(handler=_generate)

    bench = sub.add_parser("bench", help="measure vision-encode time, prompt and generation speed")
    _add_generation_args(bench)
    bench.add_argument("--runs", type=positive_int, default=3, help="timed runs")
    bench.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs before them")
    bench.add_argument(
        "--shape",
        choices=sorted(SHAPE_NAMES),
        default=None,
        help="benchmark a random-weight checkpoint of this real shape (written once under ~/.cache/vlm/bench)",
    )
    bench.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="of --shape")
    bench.add_argument("--q-bits", type=int, choices=[4, 8], default=None, help="--shape quantized (affine, group 64)")
    bench.add_argument(
        "--suite",
        action="store_true",
        help="vision encode at 448 and 1344 px, prefill and time to first token at 512 and 8k tokens, decode at "
        "batch 1, 8 and 32, peak memory",
    )
    bench.add_argument(
        "--batch-sizes", type=positive_int, nargs="+", default=[1, 8, 32], help="--suite: decode batch sizes"
    )
    bench.add_argument(
        "--prefill-tokens", type=positive_int, nargs="+", default=[512, 8192], help="--suite: prompt lengths"
    )
    bench.add_argument(
        "--image-sizes", type=positive_int, nargs="+", default=[448, 1344], help="--suite: square image sizes"
    )
    bench.add_argument("--json", default=None, metavar="FILE", help="--suite: also write the results as JSON")
    bench.add_argument(
        "--peer",
        choices=["mlx-vlm"],
        default=None,
        help="--suite: time batch-1 decode through mlx-vlm too, alternating",
    )
    bench.add_argument("--verbose", action="store_true")
    bench.set_defaults(handler=_bench)

    from .chat_cli import add_chat_parser

    add_chat_parser(sub)

    conv = sub.add_parser("convert", help="write a checkpoint in the MLX-community layout, cast or (de)quantized")
    _add_convert_args(conv)
    conv.set_defaults(handler=_convert)

    evq = sub.add_parser(
        "eval-quant", help="KL divergence, top-1 agreement, size and decode speed of each quantization format"
    )
    _add_eval_quant_args(evq)
    evq.set_defaults(handler=_eval_quant)

    for ep in entry_points(group="vlm.commands"):
        ep.load()(sub)
    return parser


def prepare_process() -> None:
    """What every command does first, before anything imports mlx or transformers."""
    # transformers serves only tokenizers here; its "PyTorch was not found" advice is noise for our users.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from vlm_kernels.cpu_blas import route_cpu_blas

    route_cpu_blas()  # MLX's Linux CPU build binds its BLAS at first use


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the handler it names: a user-facing failure is one line (a traceback only with
    ``--verbose``) and exit code 2; Ctrl-C is 130."""
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        return 130
    except _user_errors() as exc:
        if getattr(args, "verbose", False):
            raise
        return report(args.command_name, exc)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    prepare_process()
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
