"""``vlm serve`` (registered through the ``vlm.commands`` entry point) and the standalone ``vlm-serve``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "build_parser", "main", "register"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model to serve (local folder or Hugging Face repo id)")
    parser.add_argument(
        "--allow-model",
        action="append",
        default=[],
        metavar="M",
        help="another model (folder or repo id) a request may name; loaded when asked for, one model at a time "
        "(repeatable)",
    )
    parser.add_argument(
        "--models-dir",
        default=None,
        metavar="DIR",
        help="requests may name the model folders under DIR (NAME or ORG/NAME); loaded when asked for",
    )
    parser.add_argument("--adapter-path", default=None)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--allowed-hosts",
        action="append",
        default=[],
        metavar="NAMES",
        help="host names clients may reach this server by, comma-separated (IP addresses and localhost always "
        "work; .example.com matches subdomains; * turns the check off)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed to call the API, such as https://chat.example.com (repeatable; none by default)",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("VLM_API_KEY"), help="require this key (default: $VLM_API_KEY)"
    )
    parser.add_argument("--max-concurrency", type=int, default=32, help="requests decoded together")
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="cap on a request's max_tokens")
    parser.add_argument(
        "--context-length", type=int, default=None, help="prompt+generation limit (default: the model's)"
    )
    from vlm_models.cli import add_kv_cache_args  # shared with vlm generate

    add_kv_cache_args(parser)
    parser.add_argument("--vision-cache-size", type=int, default=32, help="images whose vision features are kept")
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="compute every prompt in full (by default, prompts reuse the blocks of earlier ones that start the same)",
    )
    parser.add_argument(
        "--prefix-cache-blocks", type=int, default=4096, metavar="N", help="prefix-cache blocks kept in memory"
    )
    parser.add_argument(
        "--prefix-cache-memory-gb",
        type=float,
        default=2.0,
        metavar="G",
        help="memory the prefix cache's blocks may take; the least recently used go first (default 2)",
    )
    parser.add_argument(
        "--prefix-cache-block-size", type=int, default=16, metavar="T", help="tokens per prefix-cache block"
    )
    parser.add_argument(
        "--prefix-cache-disk",
        default=None,
        metavar="DIR",
        help="also keep prefix-cache blocks under DIR (a restarted server reuses them)",
    )
    parser.add_argument(
        "--prefix-cache-disk-max-gb",
        type=float,
        default=16.0,
        metavar="G",
        help="size cap of --prefix-cache-disk; the least recently used blocks go first (default 16)",
    )
    parser.add_argument(
        "--enable-thinking", action="store_true", help="open a thinking block unless a request says not to"
    )
    parser.add_argument("--thinking-budget", type=int, default=None)
    parser.add_argument("--top-logprobs-k", type=int, default=20, help="most alternatives a request may ask for")
    parser.add_argument("--allow-local-media", default=None, metavar="DIR", help="allow local image paths under DIR")
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch image/video URLs from loopback, private and link-local addresses too (refused by default)",
    )
    parser.add_argument(
        "--allow-url-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="a non-public network image/video URLs may still point into (repeatable), such as 10.1.0.0/16",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=36_000_000,
        metavar="N",
        help="pixels one image may decode to, checked before decoding; larger JPEGs are decoded at a reduced "
        "scale, other formats refused (default 36000000)",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=100_000_000,
        metavar="N",
        help="pixels all the images of one request may decode to (default 100000000)",
    )
    parser.add_argument(
        "--max-audio-seconds",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds one input_audio clip may hold, checked from its header before decoding (default 600)",
    )
    parser.add_argument(
        "--max-request-audio-seconds",
        type=float,
        default=1800.0,
        metavar="S",
        help="seconds all the audio clips of one request may hold (default 1800)",
    )
    parser.add_argument(
        "--response-store-mb",
        type=int,
        default=256,
        metavar="MB",
        help="memory kept for the Responses API's previous_response_id, images once each (default 256)",
    )
    parser.add_argument(
        "--max-connections", type=int, default=512, help="open connections; one more is answered 503 (default 512)"
    )
    parser.add_argument(
        "--body-timeout", type=float, default=30.0, metavar="S", help="seconds a request body may take (default 30)"
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a request's headers may take (default 10)",
    )
    parser.add_argument(
        "--max-header-bytes", type=int, default=64 * 1024, metavar="N", help="request line and headers (default 64 KiB)"
    )
    parser.add_argument(
        "--no-chat-page",
        dest="chat_page",
        action="store_false",
        help="do not serve the chat page at / (the API alone)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"]
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    from vlm_models.cli import add_activation_quantization_arg, add_draft_args

    add_activation_quantization_arg(parser)
    add_draft_args(parser)


def settings_from(args: argparse.Namespace) -> Any:
    from vlm_models.cli import kv_cache_options
    from vlm_runtime import CacheSettings

    from .settings import ServeSettings

    for flag, value in (("--allow-local-media", args.allow_local_media), ("--models-dir", args.models_dir)):
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"{flag} {value}: not a folder")
    settings = ServeSettings(
        model=args.model,
        allowed_models=tuple(args.allow_model),
        models_dir=Path(args.models_dir) if args.models_dir else None,
        adapter_path=args.adapter_path,
        host=args.host,
        allowed_hosts=tuple(name for names in args.allowed_hosts for name in names.split(",")),
        cors_origins=tuple(args.cors_origin),
        port=args.port,
        api_key=args.api_key,
        max_concurrency=args.max_concurrency,
        max_tokens_limit=args.max_tokens_limit,
        context_length=args.context_length,
        vision_cache_size=args.vision_cache_size,
        cache=CacheSettings(**kv_cache_options(args)),
        prefix_cache=prefix_cache_settings(args),
        enable_thinking=args.enable_thinking,
        thinking_budget=args.thinking_budget,
        top_logprobs_k=args.top_logprobs_k,
        allow_local_media=Path(args.allow_local_media) if args.allow_local_media else None,
        allow_private_urls=args.allow_private_urls,
        allowed_url_networks=tuple(args.allow_url_network),
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        max_audio_seconds=args.max_audio_seconds,
        max_request_audio_seconds=args.max_request_audio_seconds,
        response_store_bytes=args.response_store_mb * 2**20,
        max_connections=args.max_connections,
        body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout,
        max_header_bytes=args.max_header_bytes,
        chat_page=args.chat_page,
        log_level=args.log_level,
        trust_remote_code=args.trust_remote_code,
        quantize_activations=args.quantize_activations,
        draft_model=args.draft_model,
        draft_kind=args.draft_kind,
        num_draft_tokens=args.num_draft_tokens,
    )
    if not (settings.model or settings.allowed_models or settings.models_dir):
        raise ValueError("nothing to serve: give --model M, --allow-model M or --models-dir DIR")
    return settings


def prefix_cache_settings(args: argparse.Namespace) -> Any:
    from vlm_runtime.prefix_cache import PrefixCacheSettings

    if args.no_prefix_cache:
        return None
    if args.prefix_cache_disk_max_gb <= 0:
        raise ValueError(f"--prefix-cache-disk-max-gb must be positive, got {args.prefix_cache_disk_max_gb}")
    if args.prefix_cache_memory_gb <= 0:
        raise ValueError(f"--prefix-cache-memory-gb must be positive, got {args.prefix_cache_memory_gb}")
    return PrefixCacheSettings(
        block_size=args.prefix_cache_block_size,
        max_blocks=args.prefix_cache_blocks,
        max_bytes=int(args.prefix_cache_memory_gb * 2**30),
        disk_dir=Path(args.prefix_cache_disk).expanduser() if args.prefix_cache_disk else None,
        disk_max_bytes=int(args.prefix_cache_disk_max_gb * 2**30),
    )


def serve(args: argparse.Namespace) -> None:
    import asyncio

    import uvicorn

    from .app import create_app
    from .errors import APIError
    from .host import ModelHost
    from .listening import uvicorn_config

    settings = settings_from(args)
    engine = ModelHost(settings)
    if settings.model is not None:
        print(f"loading {settings.model} ...", file=sys.stderr)
        try:
            asyncio.run(engine.preload())
        except APIError as e:
            raise ValueError(e.message) from None
        loaded = engine.loaded
        if settings.draft_model is not None and loaded is not None and loaded.engine.drafting:
            print(
                f"speculative decoding: {loaded.draft_kind} drafter {settings.draft_model}, up to "
                f"{settings.num_draft_tokens} tokens per round",
                file=sys.stderr,
            )
    app = create_app(engine, settings)
    uvicorn.Server(uvicorn_config(app, settings)).run()


def register(subparsers: Any) -> None:
    """The ``vlm.commands`` entry point: adds ``vlm serve``."""
    parser = subparsers.add_parser("serve", help="serve a model over OpenAI- and Anthropic-compatible HTTP APIs")
    add_arguments(parser)
    parser.set_defaults(handler=serve)


def main(argv: Sequence[str] | None = None) -> int:
    from vlm_models.cli import prepare_process, run_command

    prepare_process()
    return run_command(build_parser(), argv)


def build_parser() -> argparse.ArgumentParser:
    """The standalone ``vlm-serve`` script's parser (``vlm serve`` has the same options)."""
    from vlm_models.command_parser import CommandParser

    parser = CommandParser(
        prog="vlm-serve", description="Serve a model over OpenAI- and Anthropic-compatible HTTP APIs."
    )
    add_arguments(parser)
    parser.set_defaults(handler=serve)
    return parser


if __name__ == "__main__":
    sys.exit(main())
