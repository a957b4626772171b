"""``vlm serve`` (registered through the ``vlm.commands`` entry point) and the standalone ``vlm-serve``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "main", "register"]

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model to preload (local folder or Hugging Face repo id); "
        "without it the first request's model is loaded, one at a time",
    )
    parser.add_argument("--adapter-path", default=None)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8080)
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
        "--enable-thinking", action="store_true", help="open a thinking block unless a request says not to"
    )
    parser.add_argument("--thinking-budget", type=int, default=None)
    parser.add_argument("--top-logprobs-k", type=int, default=20, help="most alternatives a request may ask for")
    parser.add_argument("--allow-local-media", default=None, metavar="DIR", help="allow local image paths under DIR")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"]
    )
    parser.add_argument("--trust-remote-code", action="store_true")


def settings_from(args: argparse.Namespace) -> Any:
    from vlm_models.cli import kv_cache_options
    from vlm_runtime import CacheSettings

    from .settings import ServeSettings

    if args.allow_local_media is not None and not Path(args.allow_local_media).is_dir():
        raise ValueError(f"--allow-local-media {args.allow_local_media}: not a folder")
    return ServeSettings(
        model=args.model,
        adapter_path=args.adapter_path,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_concurrency=args.max_concurrency,
        max_tokens_limit=args.max_tokens_limit,
        context_length=args.context_length,
        vision_cache_size=args.vision_cache_size,
        cache=CacheSettings(**kv_cache_options(args)),
        enable_thinking=args.enable_thinking,
        thinking_budget=args.thinking_budget,
        top_logprobs_k=args.top_logprobs_k,
        allow_local_media=Path(args.allow_local_media) if args.allow_local_media else None,
        log_level=args.log_level,
        trust_remote_code=args.trust_remote_code,
    )


def serve(args: argparse.Namespace) -> None:
    import asyncio

    import uvicorn

    from .app import create_app
    from .errors import APIError
    from .host import ServingEngine

    settings = settings_from(args)
    engine = ServingEngine(settings)
    if settings.model is not None:
        print(f"loading {settings.model} ...", file=sys.stderr)
        try:
            asyncio.run(engine.get(settings.model))
        except APIError as e:
            raise ValueError(e.message) from None
    app = create_app(engine, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


def register(subparsers: Any) -> None:
    """The ``vlm.commands`` entry point: adds ``vlm serve``."""
    parser = subparsers.add_parser("serve", help="serve a model over OpenAI- and Anthropic-compatible HTTP APIs")
    add_arguments(parser)
    parser.set_defaults(handler=serve)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from vlm_kernels.cpu_blas import route_cpu_blas

    route_cpu_blas()  # before anything imports mlx (see vlm_kernels.cpu_blas)
    parser = argparse.ArgumentParser(prog="vlm-serve", description=register.__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        print(f"vlm-serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
