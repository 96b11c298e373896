"""Webhook delivery from the outbox: a background thread sends each due row and marks it.

Deliveries are at-least-once: a row is marked only after the receiver answered 2xx; failures are
retried with exponential backoff up to ``max_attempts``. Redirects are not followed.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request

from .store import Store

log = logging.getLogger("optiscope.server")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class WebhookDispatcher:
    def __init__(self, store: Store, on_result=None, interval: float = 0.5, timeout: float = 5.0,
                 max_attempts: int = 8, backoff_base: float = 1.0):
        self.store, self.on_result = store, on_result or (lambda ok: None)
        self.interval, self.timeout = interval, timeout
        self.max_attempts, self.backoff_base = max_attempts, backoff_base
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._thread = threading.Thread(target=self._loop, name="optiscope-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.deliver_due()
            except Exception:  # the database may be briefly unavailable; try again next tick
                log.exception("webhook dispatch failed")

    def deliver_due(self) -> int:
        now = time.time()
        sent = 0
        for d in self.store.due_deliveries(now):
            if d["attempts"] >= self.max_attempts:
                continue
            ok, err = self._post(d["target"], d["payload"].encode())
            retry_at = now + self.backoff_base * 2 ** d["attempts"]
            if not ok and d["attempts"] + 1 >= self.max_attempts:
                retry_at = float("inf")  # given up; kept with its last error for inspection
                log.warning("webhook %s: giving up after %d attempts: %s", d["target"], d["attempts"] + 1, err)
            self.store.mark_delivery(d["id"], ok, err, retry_at)
            self.on_result(ok)
            sent += ok
        return sent

    def _post(self, url: str, body: bytes) -> tuple[bool, str | None]:
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "optiscope-webhooks"})
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return 200 <= resp.status < 300, None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            return False, f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            return False, str(e)
