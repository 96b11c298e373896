"""Heartbeats: a quiet rank says it is alive, a busy one does not need to, and a collector that
went away costs neither the spool nor the counters anything."""

from __future__ import annotations

import time

import optiscope

from conftest import wait_until
from fake_collector import FakeCollector


class CountedTransport:
    """A transport (``optiscope.transport.Transport``) that passes each request on and notes when."""

    def __init__(self, inner):
        self.inner, self.attempts = inner, []
        self.base_url = inner.base_url

    def request(self, method, path, body=None):
        self.attempts.append((time.monotonic(), path))
        return self.inner.request(method, path, body)

    def close(self):
        self.inner.close()


def test_a_quiet_run_sends_heartbeats():
    fake = FakeCollector()
    try:
        # flush_interval far above the heartbeat's: the thread must wake for the heartbeat itself
        run = optiscope.init(project="hb", url=fake.url, rank=3, heartbeat_interval=0.2, flush_interval=30)
        wait_until(lambda: len(fake.heartbeats()) >= 4, 10, what="four heartbeats")
        beats = fake.heartbeats()
        assert all(b.path == f"/api/v1/runs/{run.id}/heartbeat" and b.body == {"rank": 3} for b in beats)
        gaps = [b.t - a.t for a, b in zip(beats, beats[1:])]
        assert min(gaps) >= 0.15 and max(gaps) < 2  # one per interval: neither a busy loop nor asleep
        assert fake.puts()[0].t < beats[0].t  # only a registered run beats
        assert run.counters["heartbeats"] >= 4
        assert run.finish(timeout=10)
        n = len(fake.heartbeats())
        time.sleep(0.5)
        assert len(fake.heartbeats()) == n  # a finished run is silent
    finally:
        fake.close()


def test_no_heartbeats_while_batches_flow():
    fake = FakeCollector()
    try:
        run = optiscope.init(project="hb", url=fake.url, heartbeat_interval=0.3, flush_interval=0.05)
        wait_until(fake.puts, what="the registration")
        t_start = time.monotonic()
        for step in range(30):  # 1.5 s of batches, five heartbeat intervals
            run.log({"loss": float(step)}, step=step)
            time.sleep(0.05)
        t_end = time.monotonic()
        wait_until(lambda: [h for h in fake.heartbeats() if h.t > t_end], 10, what="heartbeats once the batches stop")
        assert len([b for b in fake.batches() if t_start <= b.t <= t_end]) >= 10
        # A heartbeat only ever follows a full interval of silence; so none while batches flow
        # (unless this test's own thread stalled an interval: then that heartbeat is right).
        requests = sorted(fake.requests, key=lambda r: r.t)
        for prev, r in zip(requests, requests[1:]):
            if r.path.endswith("/heartbeat"):
                assert r.t - prev.t >= 0.3 - 0.01, (prev.path, r.t - prev.t)
        assert run.finish(timeout=10)
    finally:
        fake.close()


def test_heartbeats_to_a_vanished_collector_cost_nothing(spool_dir):
    fake = FakeCollector()
    run = optiscope.init(project="hb", url=fake.url, heartbeat_interval=0.1, flush_interval=0.05)
    wait_until(lambda: fake.heartbeats(), 10, what="a first heartbeat")
    fake.close()  # the collector goes away while the run is quiet
    exporter = run._exporter
    counted = CountedTransport(exporter.session.transport)  # the real client, its requests counted
    exporter.session.transport = counted
    time.sleep(1.0)
    beats = [t for t, p in counted.attempts if p.endswith("/heartbeat")]
    assert 4 <= len(beats) <= 14  # one attempt an interval, not a retry loop
    c = run.counters
    assert c["dropped"] == 0 and c["retries"] == 0 and c["spooled_batches"] == 0 and c["rejected_batches"] == 0
    assert exporter.pending_batches == 0 and not list((spool_dir / f"{run.id}-0").glob("*.seg"))
    # A batch after the failed heartbeats goes on its own schedule (to the spool, then retried).
    run.log({"loss": 1.0}, step=0)
    wait_until(lambda: run.counters["spooled_batches"] == 1, what="the batch in the spool")
    assert run.counters["dropped"] == 0
    run.finish(timeout=0.2)


def test_an_unregistered_run_sends_no_heartbeats():
    fake = FakeCollector(put_status=401)  # the collector refuses the run's token: nothing it sends counts
    try:
        run = optiscope.init(project="hb", url=fake.url, heartbeat_interval=0.1, flush_interval=0.2)
        run.log({"x": 1.0}, step=0)
        wait_until(fake.puts, what="the registration, refused")
        time.sleep(0.5)
        assert fake.heartbeats() == [] and run.counters["heartbeats"] == 0
        # the same token cannot succeed later: it is not tried again, and the batch waits in the spool
        assert len(fake.puts()) == 1 and fake.batches() == []
        assert run.finish(timeout=1) is False
    finally:
        fake.close()


def test_heartbeat_interval_none_sends_none():
    fake = FakeCollector()
    try:
        run = optiscope.init(project="hb", url=fake.url, heartbeat_interval=None, flush_interval=0.05)
        wait_until(fake.puts, what="the registration")
        time.sleep(0.5)
        assert run.finish(timeout=10)
        assert fake.heartbeats() == []
    finally:
        fake.close()


def test_the_collector_acknowledges_heartbeats(sqlite_collector):
    """End to end: the real collector takes the heartbeats, the tags and each rank's environment."""
    run = optiscope.init(
        project="hb", url=sqlite_collector.url, tags=["hb-e2e"], heartbeat_interval=0.2, environment={"cluster": "a"}
    )
    other = optiscope.init(
        project="hb",
        url=sqlite_collector.url,
        run_id=run.id,
        rank=1,
        heartbeat_interval=0.2,
        environment={"cluster": "b"},
    )
    wait_until(
        lambda: run.counters["heartbeats"] >= 2 and other.counters["heartbeats"] >= 2,
        20,
        what="heartbeats acknowledged by the collector",
    )
    assert run.counters["rejected_batches"] == 0
    detail = sqlite_collector.api(f"/runs/{run.id}")
    assert "hb-e2e" in detail["tags"]
    assert detail["environment"]["cluster"] == "a" and "cluster" in detail["environment_differs"]
    assert run.finish(timeout=10) and other.finish(timeout=10)


def test_heartbeat_and_finish_never_create_a_rank(sqlite_collector):
    """Ranks register (PUT the run); a heartbeat or an end for a rank that never did is a 404 and
    leaves the run's ranks as they were."""
    import httpx

    url = sqlite_collector.url + "/api/v1/runs/hb-ranks"
    assert httpx.put(url, json={"project": "hb", "name": "n", "rank": 0}).status_code == 200
    for path, body in (("/heartbeat", {"rank": 7}), ("/finish", {"rank": 2**31 - 1, "status": "crashed"})):
        r = httpx.post(url + path, json=body)
        assert r.status_code == 404 and r.json()["reason"] == "not_found", r.text
    run = sqlite_collector.api("/runs/hb-ranks")
    assert [r["rank"] for r in run["ranks"]] == [0] and run["status"] == "running"
    assert httpx.post(url + "/heartbeat", json={"rank": 0}).status_code == 200
    assert httpx.post(url + "/finish", json={"rank": 0}).json()["status"] == "finished"
