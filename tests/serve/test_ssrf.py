"""Image URLs cannot make the server reach what only it can: loopback, private, link-local and other special
addresses are refused in every spelling, before any connection, and again after each redirect; errors stay
generic. Everything runs on loopback: two media hosts, on 127.0.0.1 and 127.0.0.2."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_serve.fetching import AddressPolicy, FetchError, fetch

from .conftest import IMAGES, make_server

PNG = (IMAGES / "rgb_56x56.png").read_bytes()


class Host(http.server.BaseHTTPRequestHandler):
    """/ok.png, /page (HTML); /to?url: a 302 to url. Each request's path and Host header are logged."""

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))
        if self.path.startswith("/to?"):
            self.send_response(302)
            self.send_header("Location", self.path[4:])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        bodies = {"/ok.png": (PNG, "image/png"), "/page": (b"<html>hello</html>", "text/html")}
        body, kind = bodies.get(self.path, (b"", "text/plain"))
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve(address: str) -> Iterator[http.server.ThreadingHTTPServer]:
    host = http.server.ThreadingHTTPServer((address, 0), Host)
    host.seen = []
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    try:
        yield host
    finally:
        host.shutdown()
        thread.join(10)


@pytest.fixture(scope="module")
def first() -> Iterator[http.server.ThreadingHTTPServer]:
    yield from serve("127.0.0.1")


@pytest.fixture(scope="module")
def second() -> Iterator[http.server.ThreadingHTTPServer]:
    yield from serve("127.0.0.2")


@pytest.fixture(scope="module")
def guarded(loaded_model):
    """The default policy: public addresses only."""
    yield from make_server(loaded_model, media_timeout_s=5.0)


@pytest.fixture(scope="module")
def one_network(loaded_model):
    """127.0.0.1 (only) allowed, as an operator would allow an internal image store."""
    yield from make_server(loaded_model, media_timeout_s=5.0, allowed_url_networks=("127.0.0.1/32",))


def ask(server, url: str) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    body = {"model": server.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    return httpx.post(f"{server.base}/chat/completions", json=body, timeout=30)


def refused(response: httpx.Response) -> bool:
    return response.status_code == 403 and "not public" in response.json()["error"]["message"]


def port(host) -> int:
    return host.server_address[1]


@pytest.mark.parametrize(
    "address, allowed",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("fec0::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", False),  # mapped forms are not how public hosts are named
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
        ("64:ff9b::a01:203", False),  # NAT64 around 10.1.2.3
        ("ff02::1", False),
    ],
)
def test_address_policy(address, allowed) -> None:
    assert AddressPolicy().permits(ipaddress.ip_address(address)) is allowed
    assert AddressPolicy(allow_private=True).permits(ipaddress.ip_address(address))


@given(st.integers(0, 2**32 - 1))
def test_no_ipv6_wrapping_lets_a_refused_ipv4_address_through(value) -> None:
    policy = AddressPolicy()
    v4 = ipaddress.IPv4Address(value)
    wrapped = [
        ipaddress.IPv6Address(f"::ffff:{v4}"),
        ipaddress.IPv6Address((0x2002 << 112) | (value << 80)),
        ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | value),
    ]
    if not policy.permits(v4):
        assert not any(policy.permits(w) for w in wrapped)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0", "[::1]", "[::ffff:127.0.0.1]", "localhost"],
)
def test_every_spelling_of_loopback_is_refused_before_connecting(first, host) -> None:
    before = len(first.seen)
    url = f"http://{host}:{port(first)}/ok.png"
    with pytest.raises(FetchError, match=r"not public|not a valid URL"):  # httpx itself rejects some spellings
        asyncio.run(fetch(url, policy=AddressPolicy(), max_bytes=10**6, timeout_s=5.0, kind="image"))
    assert len(first.seen) == before


def test_a_loopback_image_url_is_refused_by_the_server(guarded, first) -> None:
    before = len(first.seen)
    assert refused(ask(guarded, f"http://127.0.0.1:{port(first)}/ok.png"))
    assert refused(ask(guarded, f"http://2130706433:{port(first)}/ok.png"))
    assert len(first.seen) == before  # nothing was sent there


def test_a_redirect_into_a_refused_network_is_refused(one_network, first, second) -> None:
    allowed = f"http://127.0.0.1:{port(first)}/ok.png"
    assert ask(one_network, allowed).status_code == 200
    forbidden = f"http://127.0.0.2:{port(second)}/ok.png"  # a live host: only the check stops the fetch
    assert refused(ask(one_network, forbidden))
    before = len(second.seen)
    for target in (forbidden, f"http://2130706434:{port(second)}/ok.png", f"http://[::1]:{port(first)}/ok.png"):
        assert refused(ask(one_network, f"http://127.0.0.1:{port(first)}/to?{target}")), target
    assert len(second.seen) == before
    # A redirect that stays in the allowed network is followed.
    assert ask(one_network, f"http://127.0.0.1:{port(first)}/to?{allowed}").status_code == 200
    chained = f"http://127.0.0.1:{port(first)}/to?http://127.0.0.1:{port(first)}/to?file:///etc/passwd"
    assert "only http(s)" in ask(one_network, chained).json()["error"]["message"]


def test_the_checked_address_is_the_one_connected_to(first, monkeypatch) -> None:
    """A name is resolved once, by the check; the connection goes to that address (no second lookup a DNS
    rebinding could answer differently), and the remote host is told the name it was asked for."""
    lookups = []

    async def resolve(self, host, port, **kwargs):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", resolve)
    policy = AddressPolicy(networks=(ipaddress.ip_network("127.0.0.1/32"),))
    url = f"http://images.example:{port(first)}/ok.png"  # a name no resolver here knows
    data = asyncio.run(fetch(url, policy=policy, max_bytes=10**6, timeout_s=5.0, kind="image"))
    assert data == PNG and lookups == ["images.example"]
    assert first.seen[-1] == ("/ok.png", f"images.example:{port(first)}")


def test_errors_do_not_describe_the_network(one_network, first) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # nothing listens there once closed
    closed = ask(one_network, f"http://127.0.0.1:{free}/x.png")
    message = closed.json()["error"]["message"]
    assert closed.status_code == 400 and message.endswith("the connection failed"), message
    assert "Errno" not in message and "ConnectError" not in message and "refused" not in message
    assert "HTTP 404" in ask(one_network, f"http://127.0.0.1:{port(first)}/missing.png").json()["error"]["message"]
    page = ask(one_network, f"http://127.0.0.1:{port(first)}/page")
    assert page.status_code == 400, page.text
    assert page.json()["error"]["message"].endswith("is not an image")  # not its size nor its format
