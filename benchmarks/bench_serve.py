"""Aggregate generation throughput of `vlm serve` under 1, 4, 16 and 32 concurrent streaming clients.

Starts the server as a subprocess (or measures one already running with --url), then for each concurrency level
runs that many clients at once, each streaming --requests-per-client chat completions of exactly --max-tokens
tokens (``ignore_eos``), and reports completion tokens / wall time. A warm-up round runs first.

    uv run python benchmarks/bench_serve.py --model tests/fixtures/qwen2_vl/hf4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_client(client: httpx.AsyncClient, url: str, model: str, index: int, args: argparse.Namespace) -> int:
    tokens = 0
    for request in range(args.requests_per_client):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Client {index}, request {request}: tell me something."}],
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        time.perf_counter()
        tail = b""
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            # Raw bytes, not parsed lines: the client shares the machine's cores with the server, so it does as
            # little as it can; only the first chunk's arrival and the final usage chunk are read.
            async for data in response.aiter_raw():
                tail = (tail + data)[-4096:]
        usage = tail[tail.rindex(b'"usage": {') :]
        tokens += int(usage.split(b'"completion_tokens": ')[1].split(b",")[0])
    return tokens


async def round_of(url: str, model: str, clients: int, args: argparse.Namespace) -> tuple[int, float]:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, model, i, args) for i in range(clients)))
        wall = time.perf_counter() - started
    return sum(results), wall


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            sys.exit(f"the server exited with code {process.returncode}")
        try:
            health = httpx.get(f"{url}/health", timeout=2).json()
            if health.get("loaded"):
                return health["model"]
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tests/fixtures/qwen2_vl/hf4")
    parser.add_argument("--url", default=None, help="measure this running server instead of starting one")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=2)
    args = parser.parse_args()

    process = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "vlm_serve.cli",
            "--model",
            args.model,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--max-concurrency",
            str(max(args.concurrency)),
        ]
        process = subprocess.Popen(command, env={**os.environ, "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"})
    try:
        model = wait_ready(url, process)
        asyncio.run(round_of(url, model, 2, argparse.Namespace(**{**vars(args), "requests_per_client": 1})))  # warm-up
        print(f"model: {model} | max_tokens {args.max_tokens} | {args.requests_per_client} requests per client")
        print("clients  tokens  wall_s  aggregate_tok/s  per_client_tok/s  vs_1_client")
        baseline = None
        for clients in args.concurrency:
            tokens, wall = asyncio.run(round_of(url, model, clients, args))
            rate = tokens / wall
            baseline = baseline or rate
            print(
                f"{clients:>7}  {tokens:>6}  {wall:6.2f}  {rate:15.1f}  {rate / clients:16.1f}  {rate / baseline:10.1f}x"
            )
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
