"""A minimal keep-alive HTTP client over the standard library (the SDK carries no HTTP dependency)."""
from __future__ import annotations

import gzip
import http.client
import json
import urllib.parse

from .. import wire

#: JSON bodies larger than this are gzip-compressed (the collector accepts ``Content-Encoding: gzip``).
#: Binary (version 2) batches are sent as they are: most of their bytes are float64 mantissas, which
#: gzip barely shrinks, so compressing would cost the trainer more CPU than it saves bandwidth.
GZIP_MIN_BYTES = 1024
#: Statuses worth retrying: the collector is restarting, overloaded or behind a failing proxy.
RETRYABLE = frozenset({429, 502, 503, 504})


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

    def request(self, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict, bytes]:
        """Send one request; returns (status, lower-cased headers, body). Raises OSError when the
        collector cannot be reached (the caller decides whether to retry)."""
        headers = {"User-Agent": "optiscope-sdk"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            binary = wire.is_binary(data)
            headers["Content-Type"] = wire.CONTENT_TYPE if binary else "application/json"
            if not binary and len(data) >= GZIP_MIN_BYTES:
                data = gzip.compress(data, compresslevel=1)
                headers["Content-Encoding"] = "gzip"
        conn = self._connection()
        try:
            conn.request(method, self._prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()  # a broken keep-alive connection is reopened on the next call
            raise ConnectionError(f"{method} {path}: {e}") from e
        if resp.getheader("connection", "").lower() == "close":
            self.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
