"""Divergence detection end to end: real training runs from the detection benchmark's kit, the SDK
attached as a user attaches it, the real collector (SQLite and PostgreSQL) running the detectors on
what arrives, and a signed webhook verified by the receiver.

A run whose scheduler multiplies the LR by 1.01 each step against a declared constant LR (it
collapses for good near step 425) pages once, early, with its evidence; a healthy run of the same
model pages never and warns never. The benchmark's smoke run (tests/test_bench_smoke.py) and
bench/detection.py score the same detectors on every scenario.
"""

from __future__ import annotations

import sys

import pytest
import torch
from test_webhooks import verify

import optiscope
from optiscope_server.alerting import signing

from conftest import ROOT, Collector, wait_until

sys.path.insert(0, str(ROOT / "bench" / "detection_kit"))
import kit  # noqa: E402
import scenarios  # noqa: E402

# The kit turns on flush-to-zero for its own processes when imported; this one goes on to run other
# tests (hypothesis checks that subnormal floats exist), so put IEEE behaviour back.
torch.set_flush_denormal(False)


def _train(collector, name: str, seed: int = 0):
    spec = scenarios.SUITE[name].build(seed)
    run = optiscope.init(project="detect", name=name, url=collector.url, config=spec.declared)
    run.watch(spec.optimizer, spec.model)
    loss, _ = kit.run(spec, lambda step, value, model, opt: run.log({"loss": value}, step=step))
    assert run.finish(timeout=60), run.counters
    return run, kit.label(loss, spec.steps)


@pytest.fixture
def signed(db_url, receiver, tmp_path):
    secret = signing.new_secret()
    c = Collector(db_url, webhooks=[receiver.url], cwd=tmp_path, extra_args=["--webhook-secret", secret]).start()
    yield c, secret
    c.stop()


def test_a_diverging_run_pages_once_early_and_a_healthy_run_never(signed, receiver):
    collector, secret = signed
    run, truth = _train(collector, "mlp_lr_ramp")
    fail = truth["fail_step"]
    assert fail is not None  # the ground truth: this run does fail
    alerts = collector.api(f"/runs/{run.id}/alerts")["alerts"]
    pages = [a for a in alerts if a["severity"] == "page"]
    assert pages, alerts
    first = min(pages, key=lambda a: a["id"])
    assert fail - 150 <= first["step"] < fail, (first, fail)  # before the failure, within the scoring window
    ev = first["evidence"]
    assert ev["window"][0] <= first["step"] == ev["window"][1] and "ratio" in ev and ev["ratio"] >= 2
    assert first["rule"] == "lr_above_schedule" and "declared schedule" in first["message"]
    assert any(a["rule"] == "lr_off_schedule" and a["severity"] == "warning" for a in alerts)
    # later rules that see the same incident are stored with their evidence but inhibited
    assert all(a["evidence"].get("inhibited_by") == first["id"] for a in pages if a["id"] != first["id"])

    wait_until(lambda: any(e["alert"]["severity"] == "page" for e in receiver.events), what="page delivered")
    sent = [
        (e, h, b)
        for e, h, b in zip(receiver.events, receiver.headers, receiver.bodies)
        if e["run"]["id"] == run.id and e["alert"]["severity"] == "page" and e["type"] == "alert.firing"
    ]
    assert len(sent) == 1, [e["alert"]["rule"] for e, _, _ in sent]  # one page for the incident
    event, headers, body = sent[0]
    assert verify(secret, headers, body) and not verify(signing.new_secret(), headers, body)
    assert event["alert"]["id"] == first["id"] and event["alert"]["evidence"] == ev
    assert event["run"]["url"].endswith(f"/api/v1/runs/{run.id}")

    healthy, truth = _train(collector, "mlp_healthy")
    assert truth["fail_step"] is None
    assert collector.api(f"/runs/{healthy.id}/alerts")["alerts"] == []
    assert not any(e["run"]["id"] == healthy.id for e in receiver.events)
