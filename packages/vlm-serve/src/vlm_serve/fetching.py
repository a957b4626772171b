"""Remote media fetched without letting a client reach what only the server can: each host is resolved once, every
address it resolves to must be public (loopback, private, link-local, shared, reserved and multicast ranges are
refused, in any spelling: ``2130706433``, ``0x7f.1``, ``[::ffff:127.0.0.1]``, 6to4, Teredo or NAT64 forms), the
connection goes to the address that was checked (so a second DNS answer cannot swap it), and each redirect is
checked the same way. Error texts say what went wrong in general terms, never a remote size or a connection
error's details, so the server cannot be used to map a network."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import httpx

__all__ = ["AddressPolicy", "FetchError", "fetch"]

MAX_REDIRECTS = 5
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(Exception):
    """A remote resource could not be fetched; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses remote media may come from: public ones, and ``networks`` besides; every address with
    ``allow_private``."""

    allow_private: bool = False
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def permits(self, address: IPAddress) -> bool:
        if self.allow_private or any(address in network for network in self.networks):
            return True
        return all(_public(candidate) for candidate in _embedded(address))


def _embedded(address: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64)."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        for inner in (address.ipv4_mapped, address.sixtofour, *(address.teredo or ())):
            if inner is not None:
                found.append(inner)
        if address in _NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _public(address: IPAddress) -> bool:
    site_local = isinstance(address, ipaddress.IPv6Address) and address.is_site_local
    return address.is_global and not (address.is_multicast or address.is_reserved or site_local)


async def fetch(url: str, *, policy: AddressPolicy, max_bytes: int, timeout_s: float, kind: str) -> bytes:
    """The body of ``url`` (http or https, at most ``max_bytes``, all within ``timeout_s``), or ``FetchError``."""
    shown = url[:200]
    try:
        async with asyncio.timeout(timeout_s):
            return await _follow(httpx.URL(url), policy, max_bytes, kind, shown)
    except TimeoutError:
        raise FetchError(f"fetching {kind} {shown} took longer than {timeout_s} s") from None
    except httpx.InvalidURL:
        raise FetchError(f"cannot fetch {kind} {shown}: not a valid URL") from None
    except (httpx.HTTPError, OSError):  # refused, reset, unreachable, TLS: told apart by nobody
        raise FetchError(f"cannot fetch {kind} {shown}: the connection failed") from None


async def _follow(url: httpx.URL, policy: AddressPolicy, max_bytes: int, kind: str, shown: str) -> bytes:
    headers = {"Accept": f"{kind}/*", "User-Agent": "vlm-serve"}
    # No proxies from the environment: the connection must go to the address that was checked.
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None) as client:
        for _ in range(MAX_REDIRECTS + 1):
            if url.scheme not in ("http", "https") or not url.host:
                raise FetchError(f"cannot fetch {kind} {shown}: only http(s) URLs (and redirects to them) are allowed")
            address = await _checked_address(url, policy, kind, shown)
            pinned = url.copy_with(host=str(address))
            extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
            request = client.build_request(
                "GET", pinned, headers={**headers, "Host": _host_header(url)}, extensions=extensions
            )
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect and "location" in response.headers:
                    url = url.join(response.headers["location"])
                    continue
                if response.status_code >= 400:
                    raise FetchError(f"cannot fetch {kind} {shown}: HTTP {response.status_code}")
                return await _read_capped(response, max_bytes, kind, shown)
            finally:
                await response.aclose()
    raise FetchError(f"cannot fetch {kind} {shown}: more than {MAX_REDIRECTS} redirects")


async def _checked_address(url: httpx.URL, policy: AddressPolicy, kind: str, shown: str) -> IPAddress:
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise FetchError(f"cannot fetch {kind} {shown}: the host name does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or not all(policy.permits(a) for a in addresses):
        raise FetchError(
            f"cannot fetch {kind} {shown}: its address is not public (a server started with --allow-private-urls "
            "fetches from private networks)",
            status=403,
        )
    return addresses[0]


def _host_header(url: httpx.URL) -> str:
    host = url.raw_host.decode("ascii")
    host = f"[{host}]" if ":" in host else host
    return host if url.port is None else f"{host}:{url.port}"


async def _read_capped(response: httpx.Response, max_bytes: int, kind: str, shown: str) -> bytes:
    too_large = FetchError(f"{kind} at {shown} is larger than {max_bytes} bytes", status=413)
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
