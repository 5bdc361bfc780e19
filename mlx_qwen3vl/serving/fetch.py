"""Downloads of the images and videos requests name by http(s) URL, made as a server exposed to anyone's
requests must make them: a request must not turn the server into a client of the machines only it can
reach (its own ports, the local network, a cloud's metadata address), nor hold it up for long.

Every hop (the URL and each redirect) is checked before it is followed: http or https only, no
credentials in the URL, and every address its name resolves to public unless the server allows private
URLs. The connection is made to the address that was checked, so a second DNS answer (DNS rebinding)
cannot send it elsewhere; https still verifies the certificate against the name. The whole download is
under one deadline, enforced on every read (each read may take only the time left), and one size limit.
Messages show at most the first 200 characters of a URL.
Proxies from the environment are not used: a proxy would connect to addresses this module never sees.

Downloads run on their own few threads (`DOWNLOADS`), never on the pool that requests carrying their
media inline also need, so that slow downloads only ever wait for each other.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urljoin, urlsplit

from ..errors import Qwen3VLError

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 16
DOWNLOADS = 8  # downloads at once; more wait for a thread


def remote(source: object) -> bool:
    """Whether a media source is fetched from the network (else it is inline or local)."""
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def download_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(DOWNLOADS, thread_name_prefix="mlx-qwen3vl-download")


def download(url: str, policy, what: str) -> bytes:
    """The bytes behind an http(s) URL under `policy` (a `media.MediaPolicy`). One Qwen3VLError line
    otherwise."""
    deadline = time.monotonic() + policy.total_timeout
    try:
        for _ in range(MAX_REDIRECTS + 1):
            response, connection = _open(url, policy, deadline, what)
            try:
                location = response.getheader("Location")
                if response.status in REDIRECTS and location:
                    url = urljoin(url, location)
                    continue
                if not 200 <= response.status < 300:
                    raise Qwen3VLError(f"{what}: {url:.200} answered HTTP {response.status}")
                return _body(response, url, policy, what)
            finally:
                connection.close()
        raise Qwen3VLError(f"{what}: {url:.200} redirects more than {MAX_REDIRECTS} times")
    except TimeoutError:
        if time.monotonic() >= deadline:
            raise Qwen3VLError(
                f"{what}: {url:.200} took more than the deadline of {policy.total_timeout:g} s to download"
            ) from None
        raise Qwen3VLError(f"{what}: {url:.200} did not answer within {policy.connect_timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise Qwen3VLError(f"{what}: {url:.200} could not be downloaded ({type(e).__name__}: {e})") from None


def _open(url: str, policy, deadline: float, what: str):
    """One hop: the URL checked, its name resolved and every address checked, a connection to one of
    them, the request sent and the response's headers read."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed [ of an IPv6 address
        raise Qwen3VLError(f"{what}: {url:.200}: not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise Qwen3VLError(f"{what}: {url:.200}: only http and https URLs are fetched")
    if parts.username is not None or parts.password is not None:
        raise Qwen3VLError(f"{what}: URLs with credentials (user:password@) are refused")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Qwen3VLError(f"{what}: {url:.200}: not a valid port") from None
    if not host:
        raise Qwen3VLError(f"{what}: {url:.200}: no host")
    addresses = _addresses(host, port, policy.allow_private_urls, url, what)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    timeout = min(policy.connect_timeout, deadline - time.monotonic())
    if timeout <= 0:
        raise TimeoutError
    if parts.scheme == "https":
        connection = _PinnedHTTPS(host, port, addresses, deadline, timeout, policy.connect_timeout)
    else:
        connection = _PinnedHTTP(host, port, addresses, deadline, timeout, policy.connect_timeout)
    try:
        connection.request("GET", target, headers={"User-Agent": "mlx-qwen3vl", "Accept": "*/*"})
        return connection.getresponse(), connection
    except BaseException:
        connection.close()
        raise


def _addresses(host: str, port: int, allow_private: bool, url: str, what: str) -> list[str]:
    """Every address the name resolves to, each checked: one refused address refuses the URL, since
    which one a connection would use is not the server's choice alone. (Name resolution runs without
    the deadline: the system resolver has its own time limits.)"""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise Qwen3VLError(f"{what}: {url:.200}: the host name does not resolve") from None
    addresses = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not allow_private and not _public(address):
            raise Qwen3VLError(
                f"{what}: {url:.200} names a private, local or reserved address ({address}); "
                "the server fetches public addresses only (unless started with --allow-private-urls)"
            )
        addresses.append(sockaddr[0])
    return list(dict.fromkeys(addresses))


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An address on the public internet: not this machine, the local network, link-local (where cloud
    metadata services answer), multicast, reserved or unspecified, nor an IPv6 spelling of an IPv4
    address (mapped, 6to4, Teredo), whose IPv4 part could be any of those."""
    if isinstance(address, ipaddress.IPv6Address) and (
        address.ipv4_mapped or address.sixtofour or address.teredo
    ):
        return False
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _body(response: http.client.HTTPResponse, url: str, policy, what: str) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        raise Qwen3VLError(f"{what}: {url:.200} is over the limit of {policy.max_bytes:,} bytes")
    data = bytearray()
    while chunk := response.read1(CHUNK):
        data += chunk
        if len(data) > policy.max_bytes:
            raise Qwen3VLError(f"{what}: {url:.200} is over the limit of {policy.max_bytes:,} bytes")
    return bytes(data)


class _Deadline:
    """A socket whose every read may take only the time left before the deadline (and at most the
    time allowed between two reads): a server that sends a byte now and then cannot stretch a download
    past the deadline."""

    deadline: float
    pause: float

    def recv_into(self, *args, **kwargs):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.settimeout(min(left, self.pause))
        return super().recv_into(*args, **kwargs)


class _DeadlineSocket(_Deadline, socket.socket):
    pass


class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    pass


def _connect(addresses: list[str], port: int, deadline: float, timeout: float, pause: float):
    """A connection to the first of the checked addresses that answers."""
    error: OSError = OSError("no address")
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        sock.deadline, sock.pause = deadline, pause
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            return sock
        except OSError as e:
            sock.close()
            error = e
            if isinstance(e, TimeoutError):
                raise
    raise error


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to an address checked beforehand, the Host header still the URL's name."""

    def __init__(self, host, port, addresses, deadline, timeout, pause):
        super().__init__(host, port, timeout=timeout)
        self.addresses, self.deadline, self.pause = addresses, deadline, pause

    def connect(self):
        self.sock = _connect(self.addresses, self.port, self.deadline, self.timeout, self.pause)


class _PinnedHTTPS(_PinnedHTTP):
    """HTTPS likewise: the connection to the checked address, the certificate verified for the name."""

    default_port = 443

    def connect(self):
        super().connect()
        context = ssl.create_default_context()
        context.sslsocket_class = _DeadlineSSLSocket
        self.sock = context.wrap_socket(self.sock, server_hostname=self.host)
        self.sock.deadline, self.sock.pause = self.deadline, self.pause
