"""The collector's HTTP contract, against the real collector under uvicorn.

Bad input gets a clear 4xx with a machine-readable reason and loses nothing else.
"""

from __future__ import annotations

import gzip
import json
import math

import httpx

from optiscope import wire

from conftest import Collector


def register(c, run_id="run1", project="p", token=None, **extra):
    r = httpx.put(
        f"{c.url}/api/v1/runs/{run_id}",
        json={"project": project, "name": "n", **extra},
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    return r


def batch(run_id="run1", seq=0, records=None, rank=0) -> bytes:
    return wire.encode_batch(wire.Batch(run_id, rank, seq, records or [(0, 1.0, {"loss": 2.0})]))


def post(c, body, run_id="run1", headers=None):
    return httpx.post(
        f"{c.url}/api/v1/runs/{run_id}/batches",
        content=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def test_duplicate_and_out_of_order_batches(collector):
    assert register(collector).status_code == 200
    assert register(collector).status_code == 200  # registering again is idempotent
    recs = [(s, 1.0, {"loss": float(s), "nan": math.nan, "inf": math.inf, "ninf": -math.inf}) for s in range(10, 20)]
    first = post(collector, batch(seq=1, records=recs))
    assert first.status_code == 200 and first.json()["duplicate"] is False and first.json()["points"] == 40
    again = post(collector, batch(seq=1, records=recs))
    assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["points"] == 0
    late = post(collector, batch(seq=0, records=[(s, 1.0, {"loss": float(s)}) for s in range(10)]))
    assert late.status_code == 200 and late.json()["duplicate"] is False
    data = collector.api("/runs/run1/series/loss")
    assert data["steps"] == list(range(20)) and data["values"] == [float(s) for s in range(20)]
    assert collector.api("/runs/run1/series/nan")["values"] == ["NaN"] * 10
    assert collector.api("/runs/run1/series/inf")["values"] == ["Infinity"] * 10
    assert collector.api("/runs/run1/series/ninf")["values"] == ["-Infinity"] * 10
    # the latest value is the highest step, whatever order the batches came in
    assert collector.api("/runs/run1")["last"]["loss"] == {"step": 19, "value": 19.0}
    ranged = collector.api("/runs/run1/series/loss?start=5&end=7")
    assert ranged["steps"] == [5, 6, 7]
    assert collector.api("/runs/run1/series/loss?limit=3")["truncated"] is True


def test_rejections_are_clear_and_lose_nothing(sqlite_collector):
    c = sqlite_collector
    assert register(c).status_code == 200
    assert post(c, batch(seq=0)).status_code == 200

    def reason(r, status):
        assert r.status_code == status, r.text
        return r.json()["reason"]

    assert reason(post(c, b"{not json"), 400) == "malformed_json"
    assert (
        reason(post(c, json.dumps({"v": 1, "run": "run1", "rank": 0, "seq": 5, "records": [], "x": 1})), 422)
        == "unknown_field"
    )
    assert reason(post(c, batch(seq=6, records=[(1, 1.0, {"bad name": 1.0})])), 422) == "bad_name"
    assert reason(post(c, batch(run_id="other", seq=7)), 422) == "run_mismatch"
    assert reason(post(c, batch(run_id="ghost"), run_id="ghost"), 404) == "not_found"
    assert reason(post(c, b"x" * (8 * 1024 * 1024 + 1)), 413) == "body_too_large"
    bomb = gzip.compress(b"[" + b" " * (9 * 1024 * 1024) + b"]")  # small on the wire, too large unpacked
    assert len(bomb) < 100_000
    assert reason(post(c, bomb, headers={"Content-Encoding": "gzip"}), 413) == "body_too_large"
    assert reason(post(c, b"garbage", headers={"Content-Encoding": "gzip"}), 400) == "bad_encoding"
    whole = gzip.compress(batch(seq=8, records=[(1, 1.0, {"loss": 9.0})]))
    for bad in (whole[:-6], whole + b"trailing", whole + gzip.compress(b"{}")):  # cut short; more after its end
        assert reason(post(c, bad, headers={"Content-Encoding": "gzip"}), 400) == "bad_encoding"
    assert reason(post(c, batch(seq=8), headers={"Content-Encoding": "br"}), 415) == "unsupported_encoding"
    r = httpx.put(f"{c.url}/api/v1/runs/run2", json={"project": "p", "name": "n", "surprise": 1})
    assert r.status_code == 422 and "surprise" in r.text
    assert register(c, run_id="run1", project="other").status_code == 409
    assert httpx.get(f"{c.url}/api/v1/runs/nope").status_code == 404
    assert httpx.get(f"{c.url}/api/v1/runs/run1/series/nope").status_code == 404
    assert httpx.get(f"{c.url}/api/v1/runs?limit=0").status_code == 422
    # gzip-compressed batches are accepted; everything stored before the bad requests is intact
    ok = post(c, gzip.compress(batch(seq=9, records=[(1, 1.0, {"loss": 3.0})])), headers={"Content-Encoding": "gzip"})
    assert ok.status_code == 200
    assert c.api("/runs/run1/series/loss")["values"] == [2.0, 3.0]
    metrics = c.metrics()
    for r in ("malformed_json", "unknown_field", "body_too_large", "run_mismatch"):
        assert f'optiscope_ingest_rejections_total{{reason="{r}"}}' in metrics


def test_series_names_with_slashes_and_too_many_series(tmp_path):
    c = Collector(f"sqlite:///{tmp_path / 'o.db'}", cwd=tmp_path).start()
    try:
        assert register(c).status_code == 200
        assert post(c, batch(records=[(0, 1.0, {"layers.0/attn:q": 1.0})])).status_code == 200
        assert c.api("/runs/run1/series/layers.0/attn:q")["values"] == [1.0]
        too_many = [(1, 1.0, {f"s{i}": 1.0 for i in range(wire.MAX_VALUES_PER_RECORD)})] * 3
        r = post(c, batch(seq=1, records=too_many))
        assert r.status_code == 200  # 4096 series fit under the default limit of 10,000
        r = post(
            c,
            batch(
                seq=2,
                records=[(2, 1.0, {f"t{i}": 1.0 for i in range(4096)}), (3, 1.0, {f"u{i}": 1.0 for i in range(4096)})],
            ),
        )
        assert r.status_code == 422 and r.json()["reason"] == "too_many_series"
        assert len(c.api("/runs/run1/series")["series"]) == 4097  # the refused batch stored nothing
    finally:
        c.stop()


def test_token_is_required_when_configured(tmp_path):
    c = Collector(f"sqlite:///{tmp_path / 'o.db'}", token="s3cret", cwd=tmp_path).start()
    try:
        assert register(c).status_code == 401
        assert register(c, token="wrong").status_code == 401
        assert register(c, token="s3cret").status_code == 200
        assert httpx.get(f"{c.url}/api/v1/runs").status_code == 401
        assert httpx.get(f"{c.url}/api/v1/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{c.url}/healthz").status_code == 200
    finally:
        c.stop()


def test_openapi_documents_the_api(sqlite_collector):
    doc = httpx.get(f"{sqlite_collector.url}/openapi.json").json()
    for path in (
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/series",
        "/api/v1/runs/{run_id}/series/{name}",
        "/api/v1/runs/{run_id}/alerts",
        "/api/v1/alerts",
    ):
        assert "get" in doc["paths"][path], path
    assert httpx.get(f"{sqlite_collector.url}/docs").status_code == 200


def test_large_gzip_run_documents_register(sqlite_collector):
    """The SDK gzips any body over 1 KiB: a run with a large config must still register."""
    import optiscope

    run = optiscope.init(project="big", url=sqlite_collector.url, config={"blob": "x" * 5000, "n": 1})
    run.log({"loss": 1.0}, step=0)
    assert run.finish(timeout=20)
    detail = sqlite_collector.api(f"/runs/{run.id}")
    assert detail["config"] == {"blob": "x" * 5000, "n": 1} and detail["status"] == "finished"
    doc = httpx.get(f"{sqlite_collector.url}/openapi.json").json()
    body = doc["paths"]["/api/v1/runs/{run_id}"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert "project" in body["properties"]


def test_a_run_of_several_ranks_ends_when_all_of_them_end(collector):
    """Each rank registers and finishes on its own: the run is running until every registered rank
    finished, crashed as soon as one crashed, and running again when a rank comes back."""

    def finish(run_id, rank, status="finished"):
        r = httpx.post(f"{collector.url}/api/v1/runs/{run_id}/finish", json={"status": status, "rank": rank})
        assert r.status_code == 200, r.text
        return r.json()["status"]

    for rank in (0, 1, 2):
        assert register(collector, "ddp", rank=rank).status_code == 200
    assert finish("ddp", 0) == "running" and finish("ddp", 2) == "running"
    assert collector.api("/runs/ddp")["finished_at"] is None
    assert finish("ddp", 1) == "finished" and collector.api("/runs/ddp")["finished_at"] is not None
    assert register(collector, "ddp", rank=1).json()["status"] == "running"  # a resumed rank
    assert finish("ddp", 1, "crashed") == "crashed"
    assert finish("ddp", 1) == "finished"  # the replay that follows a crash report
    assert register(collector, "solo").status_code == 200
    assert finish("solo", 0, "crashed") == "crashed"  # one rank: its status is the run's
    r = httpx.post(f"{collector.url}/api/v1/runs/nope/finish", json={"status": "finished", "rank": 0})
    assert r.status_code == 404
