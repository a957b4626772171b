"""Connections cannot be held or bloated: slow bodies get a 408, slow headers a closed connection, oversized
headers a 400, and connections past the cap a 503, on a live server over raw sockets."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from .conftest import make_server

SLOW_CLIENTS = 40


@pytest.fixture(scope="module")
def strict(loaded_model):
    yield from make_server(loaded_model, body_timeout_s=1.0, header_timeout_s=1.0, max_header_bytes=8192)


@pytest.fixture(scope="module")
def few(loaded_model):
    yield from make_server(loaded_model, max_connections=4, header_timeout_s=60.0)


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (30 s at most)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_bodies_time_out(strict) -> None:
    clients = []
    for _ in range(SLOW_CLIENTS):
        sock = connect(strict)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"messages": '
        )
        clients.append(sock)
    started = time.monotonic()
    answers = [read_all(sock) for sock in clients]
    for sock in clients:
        sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") and b"did not arrive within 1.0 s" in a for a in answers), answers[0]
    assert time.monotonic() - started < 30  # a generous bound; the body timeout is 1 s
    assert httpx.get(f"{strict.url}/health").status_code == 200


def test_slow_headers_are_cut_off(strict) -> None:
    sock = connect(strict)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
    started = time.monotonic()
    assert read_all(sock) == b""  # closed, without an answer
    assert time.monotonic() - started < 30
    sock.close()


def test_a_trickle_of_header_bytes_does_not_reset_the_clock(strict) -> None:
    sock = connect(strict)
    started = time.monotonic()
    try:
        for _ in range(60):
            sock.sendall(b"X-Slow: 1\r\n" if time.monotonic() > started + 0.01 else b"GET /health HTTP/1.1\r\n")
            time.sleep(0.1)
        closed = False
    except OSError:
        closed = True
    if not closed:
        sock.settimeout(5)
        closed = read_all(sock) == b""
    assert closed and time.monotonic() - started < 30
    sock.close()


def test_oversized_headers_are_refused(strict) -> None:
    sock = connect(strict)
    huge = b"X-Big: " + b"a" * 100_000 + b"\r\n"
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + huge + b"\r\n")
    except OSError:
        pass  # closed while we were still sending: refused all the same
    answer = read_all(sock)
    sock.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert httpx.get(f"{strict.url}/health", headers={"X-Fine": "a" * 4000}).status_code == 200


def test_connections_past_the_cap_are_turned_away(few) -> None:
    held = [connect(few) for _ in range(4)]
    try:
        time.sleep(0.2)
        extra = connect(few)
        answer = read_all(extra)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer, answer
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 20
    while True:  # the server notices the closed connections, then serves again
        try:
            if httpx.get(f"{few.url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)
