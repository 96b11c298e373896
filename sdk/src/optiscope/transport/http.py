"""How the SDK talks HTTP: a transport protocol, one exception, and a minimal keep-alive client over
the standard library (the SDK carries no HTTP dependency).

As in httpx, what sits above a transport sees one shape of answer (status, headers, body) and one
exception, ``TransportError``, for "the collector could not be reached or the exchange broke off":
the only failure worth retrying that is not an HTTP status. It is a ``ConnectionError``, so code
written against the older client keeps catching it. A test or a proxy wraps or replaces the
transport without touching what decides when to send.
"""

from __future__ import annotations

import gzip
import http.client
import json
import urllib.parse
from typing import Any, Protocol

from .. import wire

#: JSON bodies larger than this are gzip-compressed (the collector accepts ``Content-Encoding: gzip``).
#: Binary (version 2) batches are sent as they are: most of their bytes are float64 mantissas, which
#: gzip barely shrinks, so compressing would cost the trainer more CPU than it saves bandwidth.
GZIP_MIN_BYTES = 1024
#: Statuses worth retrying: the collector is restarting, overloaded or behind a failing proxy.
RETRYABLE = frozenset({429, 502, 503, 504})
#: The sender's credentials are refused: sending again with the same token cannot succeed, and
#: nothing sent is released (the batches wait in the spool for a sender with the right token).
UNAUTHORIZED = frozenset({401, 403})

#: A request's body: encoded wire bytes, or a JSON document.
Body = bytes | dict[str, Any] | None
#: An answer: (status, lower-cased headers, body).
Response = tuple[int, dict[str, str], bytes]


class TransportError(ConnectionError):
    """The collector could not be reached, or the connection broke before its answer arrived."""


class Transport(Protocol):
    """What the exporter and the spool's replay need from HTTP."""

    @property
    def base_url(self) -> str: ...

    def request(self, method: str, path: str, body: Body = None) -> Response:
        """Send one request and return the answer, whatever its status; raise ``TransportError``
        when there is none."""
        ...

    def close(self) -> None: ...


class HttpClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"optiscope: URL must be http(s)://host[:port], got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._https = u.scheme == "https"
        self._host, self._port = u.hostname, u.port
        self._prefix = u.path.rstrip("/")
        self._token = token
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: Body = None) -> Response:
        """Send one request; returns (status, lower-cased headers, body). Raises TransportError when
        the collector cannot be reached (the caller decides whether to retry)."""
        headers = {"User-Agent": "optiscope-sdk"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None if body is None else _encode(body, headers)
        conn = self._connection()
        try:
            conn.request(method, self._prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()  # a broken keep-alive connection is reopened on the next call
            raise TransportError(f"{method} {path}: {e}") from e
        if resp.getheader("connection", "").lower() == "close":
            self.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload


def _encode(body: bytes | dict[str, Any], headers: dict[str, str]) -> bytes:
    """The bytes to send, with their Content-Type (and Content-Encoding) set in ``headers``."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    binary = wire.is_binary(data)
    headers["Content-Type"] = wire.CONTENT_TYPE if binary else "application/json"
    if not binary and len(data) >= GZIP_MIN_BYTES:
        data = gzip.compress(data, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return data
