"""Real Prometheus scrapes the real collector: every dashboard panel's query returns data, and the
alert rules fire on a run whose loss went non-finite."""
from __future__ import annotations

import json
import re
import subprocess
import urllib.parse

import httpx
import pytest
import torch
import yaml

import optiscope
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
        "scrape_configs": [{"job_name": "optiscope", "static_configs": [
            {"targets": [sqlite_collector.url.removeprefix("http://")]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
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
    for step in range(20):
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
    wait_until(lambda: {"OptiscopeNonFiniteValue", "OptiscopeAlertFiring"} <= {
        a["labels"]["alertname"] for a in firing()}, 30, interval=0.5, what="both alerts firing")
    assert names <= {"OptiscopeNonFiniteValue", "OptiscopeAlertFiring"}
