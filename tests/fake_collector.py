"""A stand-in collector that records every request the SDK makes (method, path, decoded body, time),
for tests of what the SDK sends and when: registrations, batches, heartbeats. The end-to-end tests
use the real collector (conftest.Collector); this one exists to see the requests themselves."""
from __future__ import annotations

import gzip
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from optiscope import wire


@dataclass
class Request:
    t: float          # time.monotonic() when it arrived
    method: str
    path: str
    body: Any         # a dict for JSON bodies, a wire.Batch for batches


class FakeCollector:
    """``refuse_optional``: answer 422 to a registration carrying tags or environment, as a
    collector from before them does (its request model forbids unknown fields). ``put_status``:
    what every registration is answered (401: a token the collector does not know)."""

    def __init__(self, refuse_optional: bool = False, put_status: int = 200):
        self.requests: list[Request] = []
        self.refuse_optional, self.put_status = refuse_optional, put_status
        self._lock = threading.Lock()
        me = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                body = wire.decode_batch(raw) if wire.is_binary(raw) else (json.loads(raw) if raw else None)
                code = me.put_status if self.command == "PUT" else 200
                if (self.command == "PUT" and me.refuse_optional
                        and ({"tags", "environment"} & set(body or {}))):
                    code = 422
                with me._lock:
                    me.requests.append(Request(time.monotonic(), self.command, self.path, body))
                reply = json.dumps({"detail": "refused"} if code >= 400 else
                                   {"duplicate": False, "points": 0, "alerts": []}).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_PUT = do_POST = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def of(self, method: str, suffix: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    def puts(self) -> list[Request]:
        return self.of("PUT")

    def heartbeats(self) -> list[Request]:
        return self.of("POST", "/heartbeat")

    def batches(self) -> list[Request]:
        return self.of("POST", "/batches")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
