"""Webhook delivery from the outbox: a background thread sends each due row and marks it.

Deliveries are at-least-once: a row is marked only after the endpoint answered 2xx. Each is
rendered in its endpoint's format (native event, Slack message, Alertmanager alerts), signed with
Standard Webhooks headers (the same ``webhook-id`` on every retry), and posted to an address checked
at send time (``targets``: no private, loopback, link-local or metadata address unless allowed;
no redirect followed). A failure is retried on ``schedule``; an endpoint answering 410 Gone is
disabled. Firing alerts are re-sent to Alertmanager endpoints every ``refresh`` seconds, because
Alertmanager resolves an alert nobody has repeated within its resolve_timeout.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from . import endpoints, formats, signing, targets
from .outbox import Outbox

log = logging.getLogger("optiscope.server")

#: Seconds to wait before each retry (the Standard Webhooks recommendation, shortened at the
#: start): 8 attempts over about 28 hours, then the delivery is kept, given up, with its last error.
DEFAULT_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


class WebhookDispatcher:
    def __init__(
        self,
        outbox: Outbox,
        on_result: Callable[[bool], None] | None = None,
        interval: float = 0.5,
        timeout: float = 5.0,
        schedule: tuple[float, ...] = DEFAULT_SCHEDULE,
        allow_internal: bool = False,
        refresh: float = 60.0,
        run_url: Callable[[str], str] = lambda run_id: run_id,
    ):
        self.outbox, self.on_result = outbox, on_result or (lambda ok: None)
        self.interval, self.timeout, self.schedule = interval, timeout, tuple(schedule)
        self.allow_internal, self.refresh, self.run_url = allow_internal, refresh, run_url
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._refreshed = 0.0
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
                if time.monotonic() - self._refreshed >= self.refresh:
                    self._refreshed = time.monotonic()
                    self.refresh_alertmanagers()
            except Exception:  # the database may be briefly unavailable; try again next tick
                log.exception("webhook dispatch failed")

    def deliver_due(self) -> int:
        now = time.time()
        sent = 0
        for d in self.outbox.due_deliveries(now):
            if d["attempts"] > len(self.schedule):  # a schedule shortened since: give it up, never block the queue
                self.outbox.mark_delivery(d["id"], False, "retry schedule exhausted", float("inf"))
                continue
            if d["disabled_at"] is not None:
                self.outbox.mark_delivery(d["id"], False, "endpoint disabled", float("inf"))
                continue
            try:
                body, ctype = formats.render(d["format"] or "native", json.loads(d["payload"]))
            except (ValueError, KeyError) as e:  # cannot ever be sent: give it up, never block the rows behind
                self.outbox.mark_delivery(d["id"], False, f"cannot render: {e}", float("inf"))
                log.error("webhook delivery %d cannot be rendered as %s: %s", d["id"], d["format"], e)
                continue
            status, err = self._post(d["target"], body, ctype, d["secrets"], d["msg_id"] or f"msg_{d['id']}")
            ok = status is not None and 200 <= status < 300
            if status == 410 and d["webhook_id"] is not None:
                # Gone: the receiver asks us to stop. Disabled (audited), never retried.
                endpoints.set_enabled(
                    self.outbox.db.engine, d["webhook_id"], False, "collector", reason="answered 410 Gone"
                )
                log.warning("webhook %s answered 410 Gone: disabled", d["target"])
                retry_at = float("inf")
            elif d["attempts"] < len(self.schedule):
                retry_at = now + self.schedule[d["attempts"]]
            else:
                retry_at = float("inf")  # given up; kept with its last error for inspection
                if not ok:
                    log.warning("webhook %s: giving up after %d attempts: %s", d["target"], d["attempts"] + 1, err)
            self.outbox.mark_delivery(d["id"], ok, err or (None if ok else f"HTTP {status}"), retry_at)
            self.on_result(ok)
            sent += ok
        return sent

    def refresh_alertmanagers(self) -> None:
        """Re-send every firing alert to each Alertmanager endpoint that receives it, as Prometheus
        re-sends its own: without it Alertmanager would resolve them after its resolve_timeout."""
        for hook in self.outbox.alertmanager_endpoints():
            events = self.outbox.firing_events(hook["project"], self.run_url)
            if not events:
                continue
            body = formats.alertmanager_refresh(events)
            status, err = self._post(
                hook["url"], body, "application/json", hook["secrets"], f"msg_refresh_{hook['id']}_{int(time.time())}"
            )
            if status is None or not 200 <= status < 300:
                log.warning("re-sending firing alerts to %s failed: %s", hook["url"], err or f"HTTP {status}")

    def _post(self, url: str, body: bytes, ctype: str, secrets, msg_id: str) -> tuple[int | None, str | None]:
        headers = {"Content-Type": ctype, "User-Agent": "optiscope-webhooks", **signing.headers(secrets, msg_id, body)}
        return targets.post(url, body, headers, self.timeout, allow_internal=self.allow_internal)
