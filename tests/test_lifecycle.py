"""Run lifecycle and metadata against the real collector: a rank whose heartbeat stops is marked
crashed (and running again if it comes back), tags and per-rank environments, projects, alert
filters and acknowledgement."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
import time

import httpx

from optiscope import wire

from conftest import Collector, wait_until


def put(c, run_id, project="p", **extra):
    r = httpx.put(f"{c.url}/api/v1/runs/{run_id}", json={"project": project, "name": run_id, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def send(c, run_id, seq, records, rank=0):
    r = httpx.post(
        f"{c.url}/api/v1/runs/{run_id}/batches", content=wire.encode_batch(wire.Batch(run_id, rank, seq, records))
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_silent_ranks_are_marked_crashed_and_revived_when_heard_from(db_url, tmp_path):
    c = Collector(db_url, cwd=tmp_path, extra_args=["--heartbeat-timeout", "1.5"]).start()
    try:
        put(c, "quiet", rank=0)
        put(c, "quiet", rank=1)
        put(c, "alive")
        t_end = time.monotonic() + 4
        while time.monotonic() < t_end:  # "alive" keeps talking, "quiet" rank 1 too; rank 0 says nothing
            assert httpx.post(f"{c.url}/api/v1/runs/alive/heartbeat", json={"rank": 0}).status_code == 200
            assert httpx.post(f"{c.url}/api/v1/runs/quiet/heartbeat", json={"rank": 1}).status_code == 200
            time.sleep(0.3)
        run = c.api("/runs/quiet")
        assert run["status"] == "crashed"
        ranks = {r["rank"]: r for r in run["ranks"]}
        assert ranks[0]["status"] == "crashed" and ranks[0]["crash_reason"] == "heartbeat"
        assert ranks[1]["status"] == "running" and ranks[1]["crash_reason"] is None
        assert c.api("/runs/alive")["status"] == "running"
        assert 'optiscope_runs_crashed_total{reason="heartbeat"} 1.0' in c.metrics()
        # the silent rank comes back (a network partition, not a death): running again
        send(c, "quiet", 0, [(10, time.time(), {"loss": 1.0})])
        run = c.api("/runs/quiet")
        assert run["status"] == "running" and run["ranks"][0]["crash_reason"] is None
        # a crash the SDK reports is not undone by a late heartbeat
        assert httpx.post(f"{c.url}/api/v1/runs/alive/finish", json={"status": "crashed"}).status_code == 200
        assert httpx.post(f"{c.url}/api/v1/runs/alive/heartbeat", json={"rank": 0}).status_code == 200
        assert c.api("/runs/alive")["status"] == "crashed"
        assert c.api("/runs/alive")["ranks"][0]["crash_reason"] == "reported"
        assert httpx.post(f"{c.url}/api/v1/runs/nope/heartbeat", json={"rank": 0}).status_code == 404
    finally:
        c.stop()


TRAINER = textwrap.dedent("""
    import sys, time
    import torch
    import optiscope
    run = optiscope.init(project="hb", name="killed", url=sys.argv[1], run_id=sys.argv[2], heartbeat_interval=0.3)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run.watch(opt, model, every=1)
    for step in range(5):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward(); opt.step(); opt.zero_grad()
        run.log({"loss": loss})
    print("trained", flush=True)
    time.sleep(600)  # a long evaluation: nothing to log, heartbeats only
""")


def test_a_killed_trainer_is_marked_crashed_and_a_long_quiet_one_is_not(tmp_path):
    """Real SDK, real collector: a trainer that logs nothing for a while stays running (its
    heartbeats say it is alive); once it is SIGKILLed (no atexit, no finish) it is marked crashed."""
    c = Collector(f"sqlite:///{tmp_path / 'h.db'}", cwd=tmp_path, extra_args=["--heartbeat-timeout", "2"]).start()
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    proc = subprocess.Popen([sys.executable, str(script), c.url, "hbrun"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "trained"
        time.sleep(5)  # two and a half timeouts without a batch
        run = c.api("/runs/hbrun")
        assert run["status"] == "running", run
        env = run["environment"]
        assert env["torch"] == __import__("torch").__version__ and env["python"].startswith("3.")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: c.api("/runs/hbrun")["status"] == "crashed", 15, what="the killed run marked crashed")
        assert c.api("/runs/hbrun")["ranks"][0]["crash_reason"] == "heartbeat"
    finally:
        if proc.poll() is None:
            proc.kill()
        c.stop()


def test_tags_environments_and_projects(collector):
    c = collector
    put(
        c,
        "r1",
        project="vision",
        tags=["baseline", "lr-sweep"],
        config={"lr": 0.1},
        environment={"python": "3.11.7", "packages": {"torch": "2.13.0", "numpy": "2.4.6"}, "host": "a"},
    )
    put(
        c,
        "r1",
        project="vision",
        rank=1,
        tags=["resumed"],
        environment={"python": "3.11.7", "packages": {"torch": "2.12.0", "numpy": "2.4.6"}, "host": "b"},
    )
    put(c, "r2", project="vision", tags=["lr-sweep"])
    put(c, "r3", project="nlp", tags=["baseline"])
    run = c.api("/runs/r1")
    assert run["tags"] == ["baseline", "lr-sweep", "resumed"]  # they accumulate across ranks
    assert run["environment"]["packages"]["torch"] == "2.13.0"  # the lowest rank's
    assert run["environment_differs"] == ["packages.torch"]  # host is expected to differ
    assert [r["environment"]["host"] for r in run["ranks"]] == ["a", "b"]
    # registering again without an environment keeps the one reported
    put(c, "r1", project="vision", rank=1)
    assert c.api("/runs/r1")["ranks"][1]["environment"]["host"] == "b"

    def ids(q):
        return sorted(r["id"] for r in c.api(f"/runs?{q}")["runs"])

    assert ids("tag=lr-sweep") == ["r1", "r2"]
    assert ids("tag=lr-sweep&tag=baseline") == ["r1"]
    assert ids("tag=baseline") == ["r1", "r3"]
    assert ids("tag=baseline&project=nlp") == ["r3"]
    assert ids("tag=nothing") == []
    assert {r["id"]: r["tags"] for r in c.api("/runs?project=vision")["runs"]} == {
        "r1": ["baseline", "lr-sweep", "resumed"],
        "r2": ["lr-sweep"],
    }

    bad = httpx.put(f"{c.url}/api/v1/runs/r4", json={"project": "p", "name": "n", "tags": ["has space"]})
    assert bad.status_code == 422 and "tags" in bad.text
    big = httpx.put(
        f"{c.url}/api/v1/runs/r4",
        json={"project": "p", "name": "n", "environment": {"x": "y" * (wire.MAX_ENVIRONMENT_BYTES + 1)}},
    )
    assert big.status_code == 422 and "environment" in big.text
    many = httpx.put(
        f"{c.url}/api/v1/runs/r4",
        json={"project": "p", "name": "n", "tags": [f"t{i}" for i in range(wire.MAX_TAGS + 1)]},
    )
    assert many.status_code == 422

    nul = httpx.put(f"{c.url}/api/v1/runs/r4", json={"project": "p", "name": "n", "config": {"x": "a\u0000b"}})
    assert nul.status_code == 422  # PostgreSQL's JSON operators would fail on it in every later filter
    plain = httpx.put(
        f"{c.url}/api/v1/runs/r4", content=b'{"project": "p", "name": "n"}', headers={"Content-Type": "text/plain"}
    )
    assert plain.status_code == 415 and plain.json()["reason"] == "unsupported_media_type"
    # a config key is one key on both stores: "a.b" is not a path, "1a" not an array index
    put(c, "dots", project="keys", config={"a.b": 6, "a": {"b": 7}, "1a": 1})
    assert ids("project=keys&config=a.b=6") == ["dots"] and ids("project=keys&config=a.b=7") == []
    assert ids("project=keys&config=1a=1") == ["dots"]
    import base64
    import json as _json

    odd = base64.urlsafe_b64encode(_json.dumps(["name", "desc", "\ud800", "r1"]).encode()).decode()
    assert httpx.get(f"{c.url}/api/v1/runs?sort=name&cursor={odd}").status_code == 422

    httpx.post(f"{c.url}/api/v1/runs/r2/finish", json={"status": "finished"})
    projects = {p["name"]: p for p in c.api("/projects")["projects"]}
    assert set(projects) == {"vision", "nlp", "keys"}
    assert (projects["vision"]["runs"], projects["vision"]["running"]) == (2, 1)
    assert projects["vision"]["last_activity"] >= projects["vision"]["created_at"]


def test_alert_filters_pages_and_acknowledgement(collector):
    c = collector
    for run, project in (("x1", "p1"), ("x2", "p2")):
        put(c, run, project=project)
        # three incidents on x1 (NaN, finite, Inf, finite, NaN), one on x2
        values = [math.nan, 1.0, math.inf, 1.0, math.nan] if run == "x1" else [math.nan]
        for seq, v in enumerate(values):
            send(c, run, seq, [(seq, 1.0, {"loss": v})])
    every = c.api("/alerts")["alerts"]
    assert len(every) == 4 and [a["id"] for a in every] == sorted((a["id"] for a in every), reverse=True)
    assert {a["run_id"] for a in c.api("/alerts?project=p1")["alerts"]} == {"x1"}
    assert len(c.api("/alerts?state=firing")["alerts"]) == 2
    assert len(c.api("/alerts?rule=non_finite&severity=page")["alerts"]) == 4
    assert c.api("/alerts?rule=other")["alerts"] == []
    page = c.api("/alerts?limit=3")
    rest = c.api(f"/alerts?limit=3&cursor={page['next_cursor']}")
    assert [a["id"] for a in page["alerts"] + rest["alerts"]] == [a["id"] for a in every] and rest[
        "next_cursor"
    ] is None

    target = c.api("/alerts?project=p1&state=firing")["alerts"][0]
    r = httpx.post(f"{c.url}/api/v1/alerts/{target['id']}/acknowledge", json={"note": "on it"})
    assert r.status_code == 200 and r.json()["acknowledged_by"] == "anonymous" and r.json()["state"] == "firing"
    assert [a["id"] for a in c.api("/runs/x1/alerts?acknowledged=true")["alerts"]] == [target["id"]]
    assert len(c.api("/alerts?acknowledged=false")["alerts"]) == 3
    assert c.api("/runs/x1")["alerts"] == {"firing": 1, "resolved": 2, "firing_unacknowledged": 0}
    # an acknowledged alert still resolves; the acknowledgement stays on it
    send(c, "x1", 10, [(10, 1.0, {"loss": 0.5})])
    done = c.api("/runs/x1/alerts?acknowledged=true")["alerts"][0]
    assert done["state"] == "resolved" and done["ack_note"] == "on it"
    assert httpx.post(f"{c.url}/api/v1/alerts/999999/acknowledge", json={}).status_code == 404
    assert httpx.post(f"{c.url}/api/v1/alerts/{target['id']}/acknowledge", json={"x": 1}).status_code == 422
    audit = c.api("/audit")["entries"]
    assert [(e["action"], e["target"], e["project"]) for e in audit] == [("alert.acknowledge", str(target["id"]), "p1")]
