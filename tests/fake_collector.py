"""A stand-in collector that records every request the SDK makes (method, path, decoded body, time),
for tests of what the SDK sends and when: registrations, batches, heartbeats. The end-to-end tests
use the real collector (conftest.Collector); this one exists to see the requests themselves. It
runs on an :class:`http_receiver.HttpReceiver`."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from optiscope import wire

from http_receiver import HttpReceiver
from http_receiver import Request as HttpRequest


@dataclass
class Request:
    t: float  # time.monotonic() when it arrived
    method: str
    path: str
    body: Any  # a dict for JSON bodies, a wire.Batch for batches


class FakeCollector:
    """``refuse_optional``: answer 422 to a registration carrying tags or environment, as a
    collector from before them does (its request model forbids unknown fields). ``put_status``:
    what every registration is answered (401: a token the collector does not know). Every POST is
    answered 200 with an ingest-shaped JSON body; other verbs 501, and they are not recorded."""

    def __init__(self, refuse_optional: bool = False, put_status: int = 200):
        self.refuse_optional, self.put_status = refuse_optional, put_status
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self.http = HttpReceiver(handler=self._answer)
        self.url = self.http.url

    def _answer(self, req: HttpRequest):
        if req.method not in ("PUT", "POST"):
            return 501, {}, b""  # as before: the SDK has no other verb for a collector
        raw = req.content
        body = wire.decode_batch(raw) if wire.is_binary(raw) else (json.loads(raw) if raw else None)
        code = self.put_status if req.method == "PUT" else 200
        if req.method == "PUT" and self.refuse_optional and ({"tags", "environment"} & set(body or {})):
            code = 422
        with self._lock:
            self._requests.append(Request(req.t, req.method, req.path, body))
        reply = {"detail": "refused"} if code >= 400 else {"duplicate": False, "points": 0, "alerts": []}
        return code, {"Content-Type": "application/json"}, reply

    @property
    def requests(self) -> list[Request]:
        """Every request so far, decoded, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def errors(self) -> list[BaseException]:
        """What could not be decoded (each such request was answered 500)."""
        return self.http.errors

    def of(self, method: str, suffix: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    def puts(self) -> list[Request]:
        return self.of("PUT")

    def heartbeats(self) -> list[Request]:
        return self.of("POST", "/heartbeat")

    def batches(self) -> list[Request]:
        return self.of("POST", "/batches")

    def close(self) -> None:
        self.http.close()
