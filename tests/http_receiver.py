"""One local HTTP server for the tests that need something on the other end of a socket: a webhook
endpoint, a stand-in collector, a flaky or resetting proxy, a TLS endpoint.

    r = HttpReceiver()                          # answers every request 200 with an empty body
    r = HttpReceiver(status=503, reply_headers={"Retry-After": "1"})
    r = HttpReceiver(handler=lambda req: (202, {}, {"ok": True}))
    post(r.url + "/hook", ...)
    [req] = r.requests                          # method, path, headers, body, arrival time
    r.close()

It listens on 127.0.0.1 on a free port, serves each connection on its own thread and records every
request it reads, in arrival order, before answering it. The answer is ``handler(request)`` when a
handler is given, else the fixed ``status`` / ``reply_headers`` / ``reply_body``; all four are
attributes and may be changed while it runs. A handler returns ``(status, headers, body)`` or
:data:`RESET` to drop the connection with a TCP reset instead of answering. A handler that raises is
answered 500 and its exception kept in ``errors`` (the ``http_receiver`` fixture fails the test on
teardown when there is one): a bug in a test's stand-in shows as that bug, not as a timeout elsewhere.

Bodies may be ``bytes``, ``str`` (UTF-8) or a JSON-able ``dict``/``list`` (sent as JSON, with
``Content-Type: application/json`` unless the headers name one). ``Content-Length`` is always computed
by the receiver; one given in the headers is ignored.

``keep_alive=False`` (the default) answers in HTTP/1.0: one request per connection, closed after the
answer. ``keep_alive=True`` answers in HTTP/1.1 and keeps connections open, as a real server does.
:meth:`HttpReceiver.close` stops listening and also closes the connections still open, so a client
that kept one finds the server gone, as it would a stopped process.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["RESET", "HttpReceiver", "Request"]


@dataclass(frozen=True)
class Request:
    """One request as it arrived."""

    t: float  # time.monotonic() when its body had been read
    method: str
    path: str  # with the query string, as sent
    headers: dict[str, str] = field(repr=False)  # names lower-cased; a repeated header's values joined by ", "
    body: bytes = field(repr=False)  # exactly the bytes on the wire (Content-Encoding not undone)

    @property
    def content(self) -> bytes:
        """The body with ``Content-Encoding: gzip`` undone."""
        if self.headers.get("content-encoding", "").lower() == "gzip":
            return gzip.decompress(self.body)
        return self.body

    def json(self) -> Any:
        return json.loads(self.content)


class _Reset:
    def __repr__(self) -> str:
        return "RESET"


#: What a handler returns to drop the connection (an RST: SO_LINGER 0) instead of answering.
RESET: Any = _Reset()

Body = bytes | str | dict | list
Reply = tuple[int, Mapping[str, str] | None, Body]
Handler = Callable[[Request], "Reply | _Reset"]


class HttpReceiver:
    def __init__(
        self,
        status: int = 200,
        reply_headers: Mapping[str, str] | None = None,
        reply_body: Body = b"",
        handler: Handler | None = None,
        *,
        keep_alive: bool = False,
        tls: ssl.SSLContext | None = None,
    ):
        self.status, self.reply_headers, self.reply_body, self.handler = status, reply_headers, reply_body, handler
        self.errors: list[BaseException] = []  # what handlers raised
        self._requests: list[Request] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class(keep_alive))
        # Connections that fail below HTTP (a refused TLS handshake, a client that resets) are part of
        # what some tests do on purpose: they are not reported.
        self._server.handle_error = lambda request, client_address: None
        if tls is not None:  # the handshake happens on each connection's own thread, on its first read
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True, do_handshake_on_connect=False)
        self.host, self.port = "127.0.0.1", self._server.server_address[1]
        #: The base URL, without a trailing slash: append the path a test wants.
        self.url = f"{'https' if tls else 'http'}://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"http-receiver-{self.port}",
        )
        self._thread.start()

    @property
    def requests(self) -> list[Request]:
        """Every request so far, in arrival order (a copy: it does not grow under the caller)."""
        with self._lock:
            return list(self._requests)

    def close(self) -> None:
        """Stop listening and close the connections still open. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        with self._lock:
            still_open, self._open = list(self._open), set()
        for conn in still_open:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> HttpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the server side ---------------------------------------------------------------------------
    def _answer(self, request: Request) -> Reply | _Reset:
        handler = self.handler
        if handler is not None:
            return handler(request)
        return self.status, self.reply_headers, self.reply_body

    def _handler_class(self, keep_alive: bool) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                with receiver._lock:
                    receiver._open.add(self.connection)

            def finish(self) -> None:
                with receiver._lock:
                    receiver._open.discard(self.connection)
                super().finish()

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers: dict[str, str] = {}
                for name, value in self.headers.items():
                    name = name.lower()
                    headers[name] = f"{headers[name]}, {value}" if name in headers else value
                request = Request(time.monotonic(), self.command, self.path, headers, body)
                with receiver._lock:
                    receiver._requests.append(request)
                try:
                    reply = receiver._answer(request)
                except Exception as e:  # noqa: BLE001 - kept for the test, answered as a server would
                    receiver.errors.append(e)
                    reply = (500, {"content-type": "text/plain"}, f"test handler raised {e!r}")
                if reply is RESET:
                    self._reset()
                    return
                status, reply_headers, reply_body = reply
                self._send(status, dict(reply_headers or {}), reply_body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

            def _send(self, status: int, reply_headers: dict[str, str], body: Body) -> None:
                names = {k.lower() for k in reply_headers}
                if isinstance(body, dict | list):
                    body = json.dumps(body).encode()
                    if "content-type" not in names:
                        reply_headers["Content-Type"] = "application/json"
                elif isinstance(body, str):
                    body = body.encode()
                self.send_response(status)
                for k, v in reply_headers.items():
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
