"""Retries: only what can succeed later, at the pace the collector asks for, counted as series."""
from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import optiscope
from conftest import wait_until
from optiscope import wire


class Flaky:
    """A collector stand-in that answers the first `fail` batch posts with `status` (+ Retry-After)."""

    def __init__(self, fail: int, status: int, retry_after: str | None):
        self.posts: list[tuple[float, int, bytes]] = []
        me = self

        class H(BaseHTTPRequestHandler):
            def _reply(self, code, headers=()):
                body = json.dumps({"reason": "test", "duplicate": False, "points": 0, "alerts": []}).encode()
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self._reply(200)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                if self.path.endswith("/batches"):
                    failing = sum(1 for _, c, _ in me.posts if c != 200) < fail
                    code = status if failing else 200
                    me.posts.append((time.monotonic(), code, raw))
                    self._reply(code, [("Retry-After", retry_after)] if failing and retry_after else [])
                else:
                    self._reply(200)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_retry_after_is_honoured_and_counters_travel_as_series():
    flaky = Flaky(fail=2, status=503, retry_after="1")
    run = optiscope.init(project="retry", url=flaky.url, flush_interval=0.05, spool=False)
    run.log({"loss": 1.0}, step=0)
    wait_until(lambda: len(flaky.posts) >= 2, what="two refused posts")
    run.log({"loss": 2.0}, step=1)  # batched after the retries: it carries their count
    assert run.finish(timeout=20)
    codes = [c for _, c, _ in flaky.posts]
    assert codes == [503, 503, 200, 200]
    gaps = [b[0] - a[0] for a, b in zip(flaky.posts[:3], flaky.posts[1:3])]
    assert all(g >= 0.9 for g in gaps), gaps  # waited as long as the collector asked
    accepted = wire.decode_batch(flaky.posts[-1][2])
    counters = accepted.records[-1][2]
    assert counters["sdk/retries"] == 2.0 and counters["sdk/dropped"] == 0.0
    assert run.counters["retries"] == 2


def test_client_errors_are_not_retried():
    flaky = Flaky(fail=1, status=400, retry_after=None)
    run = optiscope.init(project="retry", url=flaky.url, flush_interval=0.05, spool=False)
    run.log({"loss": 1.0}, step=0)
    run.finish(timeout=10)
    wait_until(lambda: flaky.posts, what="a post")
    assert [c for _, c, _ in flaky.posts] == [400]  # dropped with one log line, never re-sent
    assert run.counters["rejected_batches"] == 1 and run.counters["retries"] == 0


def test_a_batch_over_the_collectors_limit_is_split(tmp_path):
    from conftest import Collector
    c = Collector(f"sqlite:///{tmp_path / 'o.db'}", cwd=tmp_path, extra_args=["--max-body-bytes", "6000"]).start()
    try:
        run = optiscope.init(project="split", url=c.url, flush_interval=60, max_batch_records=400)
        for step in range(400):  # ~17 KB of binary batch: over the limit, split until it fits
            run.log({"alpha": step * 1.1, "beta": step * 2.2, "gamma": step * 3.3}, step=step)
        assert run.finish(timeout=30), run.counters
        assert run.counters["split_batches"] >= 1 and run.counters["rejected_batches"] == 0
        for name, k in (("alpha", 1.1), ("beta", 2.2), ("gamma", 3.3)):
            data = c.api(f"/runs/{run.id}/series/{name}")
            assert data["steps"] == list(range(400)) and data["values"] == [s * k for s in range(400)]
        assert 'optiscope_ingest_rejections_total{reason="body_too_large"}' in c.metrics()
    finally:
        c.stop()
