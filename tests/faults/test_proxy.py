"""A fault proxy in front of the real collector: 70% of requests answered 503, some connections
reset (before and after the collector committed), some answers slow. Every point arrives once."""

from __future__ import annotations

import http.client
import random
import re
import threading
import time

import optiscope

from http_receiver import RESET, HttpReceiver, Request


class FaultProxy:
    """In front of the collector on ``target_port``; ``outcomes`` counts what each request got. It
    keeps connections alive (HTTP/1.1) like the collector does, so resets hit reused connections too."""

    def __init__(self, target_port: int, seed: int = 0):
        self.target_port = target_port
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.outcomes: dict[str, int] = {}
        self.http = HttpReceiver(handler=self._handle, keep_alive=True)
        self.url = self.http.url

    def _handle(self, req: Request):
        with self.lock:
            roll = self.rng.random()
        # 70% 503; of the rest, resets on either side of the commit, slow answers, and
        # untouched ones. Only "slow" and "pass" reach the SDK as a success (1 in 5).
        kind = (
            "503"
            if roll < 0.70
            else "reset-before"
            if roll < 0.76
            else "reset-after"
            if roll < 0.82
            else "slow"
            if roll < 0.88
            else "pass"
        )
        with self.lock:
            self.outcomes[kind] = self.outcomes.get(kind, 0) + 1
        if kind == "503":
            return 503, {}, b""
        if kind == "reset-before":
            return RESET
        if kind == "slow":
            time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=30)
        headers = {k: v for k, v in req.headers.items() if k not in ("host", "connection")}
        conn.request(req.method, req.path, body=req.body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        if kind == "reset-after":  # the collector committed; the answer is lost on the way back
            return RESET
        return (
            resp.status,
            {
                k: v
                for k, v in resp.getheaders()
                if k.lower() not in ("connection", "transfer-encoding", "content-length")
            },
            payload,
        )

    def close(self):
        self.http.close()


def counter(metrics: str, name: str) -> float:
    """One sample of the collector's /metrics (0 when it has none yet)."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_every_point_arrives_once_through_a_failing_proxy(sqlite_collector):
    proxy = FaultProxy(sqlite_collector.port)
    try:
        # A short backoff cap keeps the many retries (about four failures per success) quick;
        # the retry logic is the same as with the default cap.
        run = optiscope.init(
            project="proxy", url=proxy.url, flush_interval=0.01, max_batch_records=20, backoff_max=0.05
        )
        steps = 600
        for step in range(steps):
            run.log({"x": float(step)}, step=step)
            if step % 20 == 0:
                time.sleep(0.01)
        assert run.finish(timeout=120), run.counters
        for kind in ("503", "reset-before", "reset-after", "slow", "pass"):
            assert proxy.outcomes.get(kind, 0) > 0, proxy.outcomes  # every fault really happened
        assert proxy.outcomes["503"] / sum(proxy.outcomes.values()) > 0.6, proxy.outcomes
        data = sqlite_collector.api(f"/runs/{run.id}/series/x")
        assert data["steps"] == list(range(steps)) and data["values"] == [float(s) for s in range(steps)]
        c = run.counters
        assert c["dropped"] == 0 and c["rejected_batches"] == 0 and c["retries"] > 0
        assert sqlite_collector.api(f"/runs/{run.id}")["status"] == "finished"
        # Exactly once: each batch the SDK saw acknowledged was stored once; the ones whose answer
        # the proxy cut after the commit came back as duplicates and stored nothing.
        metrics = sqlite_collector.metrics()
        assert counter(metrics, 'optiscope_ingest_batches_total{outcome="stored"}') == c["sent_batches"], c
        assert counter(metrics, "optiscope_ingest_points_total") == c["sent_points"], c
        assert counter(metrics, 'optiscope_ingest_batches_total{outcome="duplicate"}') > 0, metrics
    finally:
        proxy.close()
    assert proxy.http.errors == []  # every request was forwarded or faulted as planned
