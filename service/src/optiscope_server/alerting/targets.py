"""Where webhooks may be sent: a target is checked when a delivery is sent, not when it is configured.

A webhook URL makes the collector connect wherever it points, so an unchecked URL lets whoever can
configure one reach services that only the collector can reach (server-side request forgery). The
policy:

* only ``http`` and ``https``; a URL with user information (``user:pass@``) is refused rather than
  stripped, because silently dropping credentials would send a request the sender did not intend;
* the host is resolved at send time and refused if *any* of its addresses is not a public unicast
  address: loopback, private (RFC 1918, fc00::/7), link-local, carrier-grade NAT (100.64/10),
  unspecified, multicast, reserved, or any of these inside an IPv4-mapped, NAT64 or 6to4 address;
* cloud metadata endpoints (by name and by address) are refused always, even when internal
  targets are allowed, since no webhook receiver lives there and they hand out credentials;
* the connection goes to the address that was checked, not to a second lookup of the name, so a
  DNS answer that changes between check and connect (DNS rebinding) cannot move the request inward;
  TLS still verifies the certificate against the hostname in the URL;
* redirects are never followed: a 3xx is returned as the status, which the caller counts as failure.

Checking at send time matters because a name that resolved to a public address when the webhook
was configured can resolve to an internal one later. ``allow_internal`` is the explicit setting for
deployments whose receivers are on a private network. Proxy environment variables are not used.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
MAX_RESPONSE_BYTES = 64 * 1024


class TargetRefused(ValueError):
    """The URL may not be sent to; ``reason`` is one of bad_scheme, userinfo, no_host, bad_port,
    unresolvable, metadata, internal_address."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Target:
    scheme: str  # "http" or "https"
    host: str  # as in the URL (lower case, IDNA-encoded, no brackets)
    port: int
    path: str  # path and query, what goes on the request line
    addresses: list[str]  # the checked addresses to connect to, in resolver order


def is_internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.version == 6:
        # These carry an IPv4 address the packets really go to: judge that one. (Judging the
        # outer address would refuse every target on an IPv6-only network with DNS64.)
        embedded = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            return is_internal(embedded)
        if ip.sixtofour is not None and is_internal(ip.sixtofour):
            return True
    # is_global alone misses multicast (224/4 counts as global), hence the explicit checks.
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _is_metadata(ip) -> bool:
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip in METADATA_ADDRESSES


def resolve(url: str, allow_internal: bool = False) -> Target:
    """Parse and check ``url`` now; raise TargetRefused or return the addresses it may be sent to."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:  # a port out of range or not a number, a malformed IPv6 literal
        raise TargetRefused("bad_port", f"{url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise TargetRefused("bad_scheme", f"{url!r}: only http and https targets are allowed, not {scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("userinfo", f"{url!r}: credentials in the URL are not allowed; use headers")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise TargetRefused("no_host", f"{url!r}: no host")
    try:
        host = host.encode("idna").decode("ascii")  # http.client puts the host on the wire as ASCII
    except UnicodeError as e:
        raise TargetRefused("unresolvable", f"host {host!r}: not a valid name ({e})") from None
    if host in METADATA_HOSTS:  # by name first: it may not resolve here, yet resolve elsewhere
        raise TargetRefused("metadata", f"host {host!r} is a cloud metadata service")
    port = port or (443 if scheme == "https" else 80)

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise TargetRefused("unresolvable", f"host {host!r} does not resolve: {e}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))  # unique, resolver order kept
    if not addresses:
        raise TargetRefused("unresolvable", f"host {host!r} has no addresses")
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if _is_metadata(ip):
            raise TargetRefused("metadata", f"host {host!r} resolves to {a}, a cloud metadata address")
        # Any internal address refuses the host: the connection could go to either.
        if not allow_internal and is_internal(ip):
            raise TargetRefused(
                "internal_address",
                f"host {host!r} resolves to {a}, an internal address (allow internal targets explicitly to send there)",
            )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port, path, addresses)


def _connect_checked(target: Target, timeout: float) -> socket.socket:
    """Connect to the first checked address that answers; never to a fresh lookup of the name."""
    last: OSError | None = None
    for address in target.addresses:
        try:
            return socket.create_connection((address, target.port), timeout)
        except OSError as e:
            last = e
    raise last if last else OSError(f"no address to connect to for {target.host!r}")


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float):
        # host/port here only make the Host header; connect() goes to the checked address
        super().__init__(target.host, target.port, timeout=timeout)
        self.target = target

    def connect(self) -> None:
        self.sock = _connect_checked(self.target, self._seconds())

    def _seconds(self) -> float:
        return self.timeout if self.timeout is not None else socket.getdefaulttimeout() or 10.0


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout: float):
        self._ctx = ssl.create_default_context()  # verifies the chain and the hostname
        super().__init__(target.host, target.port, timeout=timeout, context=self._ctx)
        self.target = target

    def connect(self) -> None:
        sock = _connect_checked(self.target, self.timeout if self.timeout is not None else 10.0)
        try:
            self.sock = self._ctx.wrap_socket(sock, server_hostname=self.target.host)
        except BaseException:
            sock.close()
            raise


def _drain(resp: http.client.HTTPResponse, deadline: float) -> None:
    """Read a little of the body so a short reply ends cleanly; bounded in size and time, because
    the receiver is not trusted to stop talking. A broken body does not change the status."""
    got = 0
    try:
        while got < MAX_RESPONSE_BYTES and time.monotonic() < deadline:
            chunk = resp.read1(MAX_RESPONSE_BYTES - got)
            if not chunk:
                break
            got += len(chunk)
    except (OSError, http.client.HTTPException):
        pass


def post(
    url: str, body: bytes, headers: dict[str, str], timeout: float, allow_internal: bool = False
) -> tuple[int | None, str | None]:
    """POST ``body`` to ``url`` after checking it; ``(status, None)`` for any HTTP answer (3xx
    included: redirects are not followed), ``(None, "reason: ...")`` when nothing was answered.
    ``timeout`` bounds each connect and read, as in http.client, and the body drain overall."""
    deadline = time.monotonic() + timeout
    try:
        target = resolve(url, allow_internal)
    except TargetRefused as e:
        return None, f"{e.reason}: {e}"
    conn = (_PinnedHTTPS if target.scheme == "https" else _PinnedHTTP)(target, timeout)
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        resp = conn.getresponse()
        _drain(resp, deadline)
        return resp.status, None
    except TimeoutError as e:  # socket.timeout is TimeoutError
        return None, f"timeout: no answer from {target.host} within {timeout}s ({e})"
    except ssl.SSLError as e:  # includes certificate verification failures
        return None, f"tls: {target.host}: {e}"
    except OSError as e:
        return None, f"connection: {target.host}: {e}"
    except http.client.HTTPException as e:
        return None, f"bad_response: {target.host}: {e!r}"
    except ValueError as e:  # http.client refuses control characters in the path or headers
        return None, f"bad_request: {e}"
    finally:
        conn.close()
