"""Retries: only what can succeed later, at the pace the collector asks for, counted as series."""

from __future__ import annotations

import pytest

import optiscope
from optiscope import wire

from conftest import wait_until
from http_receiver import Request


class Flaky:
    """A collector stand-in that answers the first `fail` batch posts with `status` (+ Retry-After),
    and everything else 200. ``posts``: (arrival time, answer, body with gzip undone) of each batch."""

    def __init__(self, http_receiver, fail: int, status: int, retry_after: str | None):
        self.fail, self.status, self.retry_after = fail, status, retry_after
        self.posts: list[tuple[float, int, bytes]] = []
        self.url = http_receiver(handler=self._answer).url

    def _answer(self, req: Request):
        reply = {"reason": "test", "duplicate": False, "points": 0, "alerts": []}
        if req.method == "POST" and req.path.endswith("/batches"):
            failing = sum(1 for _, c, _ in self.posts if c != 200) < self.fail
            code = self.status if failing else 200
            self.posts.append((req.t, code, req.content))
            return code, {"Retry-After": self.retry_after} if failing and self.retry_after else {}, reply
        return 200, {}, reply


@pytest.fixture
def make_flaky(http_receiver):
    return lambda **kw: Flaky(http_receiver, **kw)


def test_retry_after_is_honoured_and_counters_travel_as_series(make_flaky):
    flaky = make_flaky(fail=2, status=503, retry_after="1")
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


def test_client_errors_are_not_retried(make_flaky):
    flaky = make_flaky(fail=1, status=400, retry_after=None)
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
