"""Real Prometheus scrapes the real collector: every dashboard panel's query returns data, the
alert rules fire on a run whose loss went non-finite, and the SDK's counters are exported per rank
and fire their rule."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

import optiscope
from optiscope import wire

from conftest import ROOT, free_port, get_json, need_tool, wait_until


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


@pytest.fixture
def prometheus(sqlite_collector, tmp_path):
    exe = need_tool("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "alerts" / "optiscope.rules.yml")],
        "scrape_configs": [
            {"job_name": "optiscope", "static_configs": [{"targets": [sqlite_collector.url.removeprefix("http://")]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        try:
            return httpx.get(url + "/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 30, what="prometheus ready")
    yield url
    proc.terminate()
    proc.wait(15)
    log.close()


def query(prom: str, expr: str) -> list:
    doc = get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def test_dashboard_queries_and_alert_rules(sqlite_collector, prometheus, receiver):
    run = optiscope.init(project="dash", name="nan-run", url=sqlite_collector.url)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters())
    run.watch(opt, model, every=1)
    for _ in range(20):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log({"loss": loss})
    run.log({"loss": float("nan")}, step=20)
    assert run.finish(timeout=20)
    # one rejected request, so the rejection panel has a series to show
    assert httpx.post(f"{sqlite_collector.url}/api/v1/runs/{run.id}/batches", content=b"{").status_code == 400
    wait_until(lambda: receiver.events, what="webhook delivery")

    dashboard = json.loads((ROOT / "dashboards" / "optiscope.json").read_text())
    exprs = [(p["title"], t["expr"]) for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert len(exprs) >= 10

    def resolve(expr):
        return expr.replace("$project", "dash").replace("$run_id", re.escape(run.id))

    # rate() needs two scrapes after the counters moved; wait until every panel has data
    def missing_panels():
        return [title for title, e in exprs if not query(prometheus, resolve(e))]

    try:
        wait_until(lambda: not missing_panels(), 60, interval=0.5, what="data for every dashboard panel")
    except AssertionError:
        pytest.fail(f"dashboard panels without data: {missing_panels()}")
    loss = query(prometheus, f'optiscope_run_loss{{run_id="{run.id}"}}')
    assert loss[0]["value"][1] == "NaN"  # non-finite survives exposition and scraping
    assert loss[0]["metric"]["run_name"] == "nan-run"

    def firing():
        alerts = get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["state"] == "firing" and a["labels"].get("run_id") == run.id]

    names = {a["labels"]["alertname"] for a in wait_until(firing, 30, interval=0.5, what="prometheus alerts")}
    wait_until(
        lambda: {"OptiscopeNonFiniteValue", "OptiscopeAlertFiring"} <= {a["labels"]["alertname"] for a in firing()},
        30,
        interval=0.5,
        what="both alerts firing",
    )
    assert names <= {"OptiscopeNonFiniteValue", "OptiscopeAlertFiring"}


def send_sdk_batch(url: str, run_id: str, rank: int, seq: int, step: int, **counters) -> None:
    """A batch as the SDK makes it: the records, then its exporter's counters at the last step."""
    sdk = {f"sdk/{k}": float(counters.get(k, 0)) for k in wire.SDK_COUNTERS}
    body = wire.encode_batch(wire.Batch(run_id, rank, seq, [(step, 1.0, {"loss": 0.5}), (step, 1.0, sdk)]))
    r = httpx.post(f"{url}/api/v1/runs/{run_id}/batches", content=body)
    assert r.status_code == 200, r.text


def sdk_gauges(exposition: str, run_id: str) -> dict[str, dict[str, float]]:
    """{counter: {rank: value}} of the run's optiscope_run_sdk_* gauges."""
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(exposition):
        if fam.name.startswith("optiscope_run_sdk_"):
            assert fam.type == "gauge"
            for sample in fam.samples:
                if sample.labels["run_id"] == run_id:
                    assert set(sample.labels) == {"project", "run_id", "run_name", "rank"}
                    assert (sample.labels["project"], sample.labels["run_name"]) == ("ops", "spooly")
                    out.setdefault(fam.name.removeprefix("optiscope_run_sdk_"), {})[sample.labels["rank"]] = (
                        sample.value
                    )
    return out


def test_sdk_counters_are_exported_per_rank(collector):
    """Each rank's newest report of every sdk/<counter>, on both stores; another rank reporting
    later, at a higher step, does not hide it."""
    for rank in (0, 1):
        r = httpx.put(f"{collector.url}/api/v1/runs/sdkrun", json={"project": "ops", "name": "spooly", "rank": rank})
        assert r.status_code == 200, r.text
    send_sdk_batch(collector.url, "sdkrun", 0, 0, 10, retries=2, spooled_batches=1)
    send_sdk_batch(collector.url, "sdkrun", 1, 0, 10, spooled_batches=1)
    send_sdk_batch(collector.url, "sdkrun", 1, 1, 20, sent_points=4, spooled_batches=2, rejected_batches=1)
    send_sdk_batch(
        collector.url, "sdkrun", 0, 1, 20, sent_points=2, retries=5, dropped=3, spooled_batches=2, spool_full=1
    )
    send_sdk_batch(
        collector.url, "sdkrun", 0, 2, 30, sent_points=4, retries=5, dropped=3, spooled_batches=3, spool_full=1
    )
    text = collector.metrics()
    assert sdk_gauges(text, "sdkrun") == {
        "sent_points": {"0": 4.0, "1": 4.0},
        "dropped": {"0": 3.0, "1": 0.0},
        "retries": {"0": 5.0, "1": 0.0},
        "spooled_batches": {"0": 3.0, "1": 2.0},
        "spool_full": {"0": 1.0, "1": 0.0},
        "rejected_batches": {"0": 0.0, "1": 1.0},
    }
    # the per-run gauges are what they were: sdk/* are neither catalog gauges nor the run's step
    assert 'optiscope_run_step{project="ops",run_id="sdkrun",run_name="spooly"} 30.0' in text
    assert 'optiscope_run_loss{project="ops",run_id="sdkrun",run_name="spooly"} 0.5' in text
    assert "optiscope_run_sdk/" not in text


def test_sdk_dropping_records_alert(sqlite_collector, prometheus):
    """A rank's dropped counter rises between two scrapes: Prometheus sees the gauge and fires
    OptiscopeSdkDroppingRecords for the run (one alert, without the rank)."""
    url = sqlite_collector.url
    assert httpx.put(f"{url}/api/v1/runs/lossy", json={"project": "ops", "name": "spooly"}).status_code == 200
    send_sdk_batch(url, "lossy", 0, 0, 1, spooled_batches=1)
    wait_until(
        lambda: query(prometheus, 'optiscope_run_sdk_dropped{run_id="lossy", rank="0"} == 0'),
        30,
        interval=0.5,
        what="the first sample scraped",
    )
    send_sdk_batch(url, "lossy", 0, 1, 2, sent_points=2, spooled_batches=2, dropped=250)
    wait_until(
        lambda: query(prometheus, 'optiscope_run_sdk_dropped{run_id="lossy", rank="0"} == 250'),
        30,
        interval=0.5,
        what="the new value scraped",
    )

    def firing():
        alerts = get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["state"] == "firing" and a["labels"].get("run_id") == "lossy"]

    alerts = wait_until(firing, 30, interval=0.5, what="OptiscopeSdkDroppingRecords firing")
    assert [a["labels"] for a in alerts] == [
        {
            "alertname": "OptiscopeSdkDroppingRecords",
            "severity": "warning",
            "project": "ops",
            "run_id": "lossy",
            "run_name": "spooly",
        }
    ]
    assert alerts[0]["annotations"]["description"].startswith("The SDK of run lossy (spooly, project ops) dropped ")
