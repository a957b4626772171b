"""What an abusive request costs `vlm serve`: wall time of the answer and the server's peak memory.

For each case a fresh server starts as a subprocess on the tiny fixture model (its context is 32768 tokens),
answers one short warm-up request, and is sent the case once: a 16 M-character prompt (and, with --big, a 60 MB one, just under the 64 MB body cap); a 21 KB PNG of
13000x13000 pixels (a "pixel bomb"), and three of them in one request. For each: the HTTP status, the seconds
until the answer, and how far the server's peak resident memory rose above what it held before the request
(Linux: VmHWM after the answer minus VmRSS before the request).

    uv run --frozen python benchmarks/bench_hardening.py                       # this tree
    uv run --frozen python benchmarks/bench_hardening.py --src /tmp/before     # another checkout's code (e.g.
                                                                               # `git archive main`), same venv
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def pixel_bomb(side: int = 13000) -> str:
    """A 1-bit blank PNG: a few KB on the wire, side*side pixels once decoded (x3 bytes once in RGB)."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cases(model: str, big: bool) -> list[tuple[str, bytes]]:
    def chat(content: object) -> bytes:
        body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}
        return json.dumps(body).encode()

    bomb = pixel_bomb()
    image = {"type": "image_url", "image_url": {"url": bomb}}
    out = [
        ("prompt of 16 M characters", chat("word " * (16_000_000 // 5))),
        (f"one {len(bomb) * 3 // 4 // 1024} KB PNG of 13000x13000", chat([image, {"type": "text", "text": "?"}])),
        ("three of them in one request", chat([image, image, image, {"type": "text", "text": "?"}])),
    ]
    if big:
        out.insert(1, ("prompt of 60 MB", chat("word " * (60_000_000 // 5))))
    return out


def wait_ready(url: str, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with code {process.returncode}")
        try:
            health = httpx.get(f"{url}/health", timeout=2).json()
            if health.get("loaded"):
                return health["model"]
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit("the server did not become ready")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    env = {**os.environ, "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    if args.src:
        sources = sorted(str(p) for p in Path(args.src).glob("packages/*/src"))
        env["PYTHONPATH"] = os.pathsep.join([*sources, env.get("PYTHONPATH", "")])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "vlm_serve.cli", "--model", args.model, "--port", str(port)]
    process = subprocess.Popen([*command, "--log-level", "warning"], env=env, stderr=subprocess.DEVNULL)
    model = wait_ready(url, process)
    post(url, json.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}), 60)
    return process, url, model


def post(url: str, body: str | bytes, timeout: float) -> str:
    try:
        response = httpx.post(
            f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=timeout
        )
        return str(response.status_code)
    except httpx.TimeoutException:
        return "timeout"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "qwen2_vl" / "hf4"))
    parser.add_argument("--src", default=None, help="run the server from this checkout's packages/*/src")
    parser.add_argument("--big", action="store_true", help="also send a 60 MB prompt")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for one answer")
    args = parser.parse_args()
    print(f"server code: {args.src or ROOT}")
    print(f"{'case':<34} {'status':>7} {'seconds':>8} {'peak MB above idle':>19}")
    for index in range(len(cases("m", args.big))):
        process, url, model = start_server(args)
        try:
            name, body = cases(model, args.big)[index]
            before = memory_kib(process.pid, "VmRSS")
            started = time.perf_counter()
            status = post(url, body, args.timeout)
            seconds = time.perf_counter() - started
            peak = memory_kib(process.pid, "VmHWM")
            print(f"{name:<34} {status:>7} {seconds:8.2f} {(peak - before) / 1024:19.0f}", flush=True)
        finally:
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    main()
