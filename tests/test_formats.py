"""Delivery formats (native, Slack, Alertmanager) rendered from the native alert event, and the
Alertmanager rendering posted to a real Alertmanager: it routes the alert to a webhook, resolves
it, and a silence on the run suppresses it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time

import httpx
import pytest

from optiscope_server.alerting.formats import FORMATS, alertmanager_refresh, render

from conftest import free_port, missing, wait_until

LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
NASTY_NAME = "mlp <&> λ 🚀 <!channel>"


def event(
    state="firing",
    value=math.inf,
    name=NASTY_NAME,
    alert_id=1,
    run_id="01a2b3",
    t=1795700902.83,
    message=None,
    **alert_extra,
):
    """A native event as the collector writes it (``value`` may also be a raw non-finite float,
    which the renderers must spell rather than crash on)."""
    return {
        "type": f"alert.{state}",
        "alert": {
            "id": alert_id,
            "rule": "non_finite",
            "severity": "page",
            "state": state,
            "series": "loss",
            "step": 225,
            "rank": 0,
            "value": value,
            "message": message or f"loss is {value} at step 225 on rank 0 <b>&</b>",
            **alert_extra,
        },
        "run": {"id": run_id, "project": "démo", "name": name, "url": f"http://127.0.0.1:8737/api/v1/runs/{run_id}"},
        "time": t,
    }


def strict(body: bytes):
    """Parse as strict JSON: NaN, Infinity and -Infinity tokens are errors, not values."""

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(body, parse_constant=refuse)


def am_alert(fmt_event) -> dict:
    body, _ = render("alertmanager", fmt_event)
    alerts = strict(body)
    assert isinstance(alerts, list) and len(alerts) == 1
    return alerts[0]


# -- every format -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("state", ["firing", "resolved"])
@pytest.mark.parametrize("value", [math.nan, -math.inf, math.inf, "NaN", "-Infinity", 0.125])
def test_every_format_is_strict_json(fmt, state, value):
    body, content_type = render(fmt, event(state, value))
    assert content_type == "application/json"
    parsed = strict(body)
    assert body.isascii()  # unicode travels escaped; no encoder can choke on it
    text = json.dumps(parsed, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        assert {math.inf: "Infinity", -math.inf: "-Infinity"}.get(value, "NaN") in text


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown delivery format"):
        render("teams", event())


def test_native_is_the_event_itself_with_non_finite_values_spelled():
    ev = event(value=math.nan)
    parsed = strict(render("native", ev)[0])
    assert parsed["alert"]["value"] == "NaN"
    parsed["alert"]["value"] = ev["alert"]["value"] = None
    assert parsed == ev  # nothing else changed, unicode name included
    assert strict(render("native", event(value="-Infinity"))[0])["alert"]["value"] == "-Infinity"


# -- Slack ------------------------------------------------------------------------------------
def slack(ev) -> dict:
    return strict(render("slack", ev)[0])


def all_mrkdwn(msg: dict) -> list[str]:
    section = msg["blocks"][1]
    return [
        msg["text"],
        section["text"]["text"],
        *(f["text"] for f in section["fields"]),
        *(e["text"] for e in msg["blocks"][2]["elements"]),
    ]


def test_slack_message_firing_and_resolved():
    firing = slack(event("firing", math.nan))
    header = firing["blocks"][0]
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    assert header["text"]["text"].startswith(":rotating_light: Firing [page]: non_finite")
    fields = {f["text"].split("\n", 1)[0]: f["text"].split("\n", 1)[1] for f in firing["blocks"][1]["fields"]}
    assert fields == {
        "*Project*": "démo",
        "*Run*": "<http://127.0.0.1:8737/api/v1/runs/01a2b3|mlp &lt;&amp;&gt; λ 🚀 &lt;!channel&gt;>",
        "*Rule*": "non_finite",
        "*Series*": "loss",
        "*Step*": "225",
        "*Rank*": "0",
        "*Value*": "NaN",
    }
    assert firing["text"].startswith("Firing [page] non_finite: loss is nan")

    resolved = slack(event("resolved", -math.inf))
    assert resolved["blocks"][0]["text"]["text"].startswith(":white_check_mark: Resolved")
    assert resolved["text"].startswith("Resolved")
    assert "*Value*\n-Infinity" in [f["text"] for f in resolved["blocks"][1]["fields"]]


def test_slack_escapes_user_text():
    msg = slack(event(message="x <!channel> & <https://evil|click> y"))
    assert msg["blocks"][1]["text"]["text"] == "x &lt;!channel&gt; &amp; &lt;https://evil|click&gt; y"
    for text in all_mrkdwn(msg):
        # The only raw < > left are Slack's own link and date tokens; every & starts an entity.
        stripped = re.sub(r"<(http://127\.0\.0\.1:8737/[^|<>]*\|[^<>]*|!date\^[^<>]*)>", "", text)
        assert "<" not in stripped and ">" not in stripped, text
        assert not re.search(r"&(?!amp;|lt;|gt;)", text), text
    assert "<!channel>" not in json.dumps(msg)


def test_slack_stays_inside_block_kit_limits():
    huge = slack(event(message="&" * 10_000, name="🚀" * 5_000))
    header, section = huge["blocks"][0], huge["blocks"][1]
    units = lambda s: len(s.encode("utf-16-le")) // 2  # noqa: E731 - the larger way Slack may count
    assert units(header["text"]["text"]) <= 150
    assert units(section["text"]["text"]) <= 3000
    assert re.fullmatch(r"(&amp;)+…", section["text"]["text"])  # cut between entities, never inside one
    assert len(section["fields"]) <= 10 and all(units(f["text"]) <= 2000 for f in section["fields"])
    assert len(huge["blocks"]) <= 50


# -- Alertmanager -----------------------------------------------------------------------------
def test_alertmanager_alert_labels_annotations_and_times():
    created, resolved_at = 1795700800.5, 1795700950.25
    firing = am_alert(event("firing", "Infinity", created_at=created))
    resolved = am_alert(
        event("resolved", -math.inf, created_at=created, resolved_at=resolved_at, message="loss is finite again")
    )

    assert firing["labels"] == {
        "alertname": "optiscope_non_finite",
        "alert_id": "1",
        "severity": "page",
        "project": "démo",
        "run_id": "01a2b3",
        "run_name": NASTY_NAME,
        "series": "loss",
        "rank": "0",
    }
    assert resolved["labels"] == firing["labels"]  # the same alert to Alertmanager, so it resolves
    for alert in (firing, resolved):
        assert all(LABEL_NAME.fullmatch(k) and isinstance(v, str) and v for k, v in alert["labels"].items())
        assert all(isinstance(v, str) for v in alert["annotations"].values())
        assert alert["generatorURL"] == "http://127.0.0.1:8737/api/v1/runs/01a2b3"
        assert RFC3339_UTC.fullmatch(alert["startsAt"]), alert["startsAt"]
        assert alert["startsAt"] == "2026-11-26T13:46:40.500Z"  # created_at, not the event time

    assert "endsAt" not in firing  # Alertmanager's resolve_timeout keeps it alive between re-sends
    assert firing["annotations"]["value"] == "Infinity" and firing["annotations"]["step"] == "225"
    assert firing["annotations"]["summary"].startswith("loss is Infinity")
    assert "value Infinity" in firing["annotations"]["description"]
    assert RFC3339_UTC.fullmatch(resolved["endsAt"]) and resolved["endsAt"] == "2026-11-26T13:49:10.250Z"
    assert resolved["annotations"]["value"] == "-Infinity"


def test_alertmanager_times_without_created_or_resolved_at():
    t = 1795700902.83
    firing = am_alert(event("firing", math.nan, t=t))
    assert firing["startsAt"] == "2026-11-26T13:48:22.830Z" and "endsAt" not in firing
    resolved = am_alert(event("resolved", 1.0, t=t))
    assert resolved["startsAt"] == resolved["endsAt"] == "2026-11-26T13:48:22.830Z"
    # A start after the end (two clocks) would be a 400 from Alertmanager, retried forever.
    skewed = am_alert(event("resolved", 1.0, t=t, created_at=t + 5, resolved_at=t))
    assert skewed["startsAt"] <= skewed["endsAt"]


def test_alertmanager_refresh_sends_many_alerts_in_one_body():
    events = [event("firing", v, alert_id=i, run_id=f"run{i}") for i, v in enumerate([math.nan, -math.inf, 2.5])]
    alerts = strict(alertmanager_refresh(events))
    assert [a["labels"]["alert_id"] for a in alerts] == ["0", "1", "2"]
    assert [a["annotations"]["value"] for a in alerts] == ["NaN", "-Infinity", "2.5"]
    assert all("endsAt" not in a for a in alerts)
    assert alerts[0] == am_alert(events[0])  # a refresh is the same alert, re-sent
    assert strict(alertmanager_refresh([])) == []


# -- a real Alertmanager ------------------------------------------------------------------------
class Alertmanager:
    """``alertmanager`` in a subprocess: its route sends everything to one webhook, at once."""

    def __init__(self, binary: str, hook_url: str, tmp_path):
        config = tmp_path / "alertmanager.yml"
        config.write_text(
            json.dumps(
                {  # JSON is YAML
                    "route": {
                        "receiver": "hook",
                        "group_by": ["alertname", "run_id"],
                        "group_wait": "0s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [{"name": "hook", "webhook_configs": [{"url": hook_url, "send_resolved": True}]}],
                }
            )
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "alertmanager.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"alertmanager exited with {self.proc.returncode}: {self.log_path.read_text()}")
        try:
            return httpx.get(self.url + "/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def alerts(self) -> list[dict]:
        r = httpx.get(self.url + "/api/v2/alerts", timeout=5)
        r.raise_for_status()
        return r.json()

    def post(self, body: bytes) -> httpx.Response:
        return httpx.post(
            self.url + "/api/v2/alerts", content=body, headers={"Content-Type": "application/json"}, timeout=5
        )

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def alertmanager(receiver, tmp_path):
    # Upstream and most distributions call it alertmanager; Debian's package (prometheus-alertmanager,
    # which also brings amtool) installs it as prometheus-alertmanager.
    binary = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
    if not binary:
        missing("alertmanager is not installed (Debian: prometheus-alertmanager)")
    am = Alertmanager(binary, receiver.url, tmp_path)
    try:
        wait_until(am.ready, 30, what="alertmanager /-/ready")
        yield am
    finally:
        am.stop()


def notified(receiver, alert_id: int, status: str) -> list[dict]:
    """The alerts Alertmanager's webhook delivered for our ``alert_id`` with ``status``."""
    return [
        a
        for payload in list(receiver.events)
        for a in payload["alerts"]
        if a["labels"].get("alert_id") == str(alert_id) and a["status"] == status
    ]


def test_real_alertmanager_fires_and_resolves(alertmanager, receiver):
    now = time.time()
    firing = event("firing", math.nan, alert_id=7, t=now, created_at=now - 30)
    ours = am_alert(firing)

    r = alertmanager.post(render("alertmanager", firing)[0])
    assert r.status_code == 200, r.text
    active = wait_until(
        lambda: [a for a in alertmanager.alerts() if a["labels"] == ours["labels"]],
        what="the alert in GET /api/v2/alerts",
    )
    assert active[0]["status"]["state"] == "active"
    assert active[0]["annotations"]["value"] == "NaN" and active[0]["labels"]["run_name"] == NASTY_NAME
    assert active[0]["generatorURL"] == ours["generatorURL"]

    sent = wait_until(lambda: notified(receiver, 7, "firing"), what="the firing notification")
    assert sent[0]["labels"] == ours["labels"] and sent[0]["annotations"] == ours["annotations"]
    assert sent[0]["startsAt"].startswith(ours["startsAt"][:19])  # when it fired, not when it arrived
    assert receiver.events[0]["status"] == "firing"

    resolved = event(
        "resolved",
        0.5,
        alert_id=7,
        t=time.time(),
        created_at=now - 30,
        resolved_at=time.time(),
        message="loss is finite again (0.5) at step 300 on rank 0",
    )
    r = alertmanager.post(render("alertmanager", resolved)[0])
    assert r.status_code == 200, r.text
    done = wait_until(lambda: notified(receiver, 7, "resolved"), what="the resolved notification")
    assert done[0]["labels"] == ours["labels"]
    assert any(p["status"] == "resolved" for p in receiver.events)
    assert not [a for a in alertmanager.alerts() if a["labels"] == ours["labels"]]  # no longer active


def test_real_alertmanager_silence_on_a_run_suppresses_its_alerts(alertmanager, receiver):
    now = time.time()
    silence = {
        "matchers": [{"name": "run_id", "value": "run-muted", "isRegex": False, "isEqual": True}],
        "startsAt": _utc(now - 60),
        "endsAt": _utc(now + 3600),
        "createdBy": "test_formats",
        "comment": "known-bad run",
    }
    r = httpx.post(alertmanager.url + "/api/v2/silences", json=silence, timeout=5)
    assert r.status_code == 200, r.text
    silence_id = r.json()["silenceID"]

    muted = event("firing", -math.inf, alert_id=21, run_id="run-muted", t=now)
    control = event("firing", math.nan, alert_id=22, run_id="run-loud", t=now)
    r = alertmanager.post(alertmanager_refresh([muted, control]))
    assert r.status_code == 200, r.text

    def muted_state():
        found = [a for a in alertmanager.alerts() if a["labels"].get("alert_id") == "21"]
        return found and found[0]["status"]["state"] == "suppressed" and found[0]["status"]

    status = wait_until(muted_state, what="the silenced alert to be suppressed")
    assert status["silencedBy"] == [silence_id]
    wait_until(lambda: notified(receiver, 22, "firing"), what="the unsilenced control alert")
    time.sleep(2.5)  # more than group_interval: the muted group has had its turn too
    assert not notified(receiver, 21, "firing")
    assert all(a["labels"].get("run_id") != "run-muted" for p in receiver.events for a in p["alerts"])


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def test_collector_posts_its_alerts_to_a_real_alertmanager(alertmanager, receiver, tmp_path):
    """End to end: a run's NaN loss fires an alert in the collector, which posts it to Alertmanager
    (configured as ``--webhook alertmanager=...``); Alertmanager routes it to its receiver; the
    finite loss that follows resolves it there too. Then the periodic re-send keeps a firing alert
    active in Alertmanager rather than letting it expire."""
    from optiscope import wire
    from optiscope_server.alerting import Outbox, WebhookDispatcher
    from optiscope_server.storage import Database

    from conftest import Collector

    db = f"sqlite:///{tmp_path / 'c.db'}"
    c = Collector(db, webhooks=[f"alertmanager={alertmanager.url}/api/v2/alerts"], cwd=tmp_path).start()
    try:
        assert httpx.put(f"{c.url}/api/v1/runs/amrun", json={"project": "p", "name": "am <run>"}).status_code == 200

        def send(seq, value):
            body = wire.encode_batch(wire.Batch("amrun", 0, seq, [(seq, 1.0, {"loss": value})]))
            assert httpx.post(f"{c.url}/api/v1/runs/amrun/batches", content=body).status_code == 200

        send(0, math.nan)
        alert_id = c.api("/alerts")["alerts"][0]["id"]
        wait_until(lambda: notified(receiver, alert_id, "firing"), 20, what="Alertmanager notified of the firing alert")
        active = [a for a in alertmanager.alerts() if a["labels"].get("alert_id") == str(alert_id)]
        assert active[0]["labels"]["run_id"] == "amrun" and active[0]["labels"]["alertname"] == "optiscope_non_finite"
        assert active[0]["annotations"]["value"] == "NaN" and active[0]["generatorURL"].endswith("/runs/amrun")

        send(1, 0.5)
        wait_until(lambda: notified(receiver, alert_id, "resolved"), 20, what="Alertmanager notified of the resolution")
        send(2, math.inf)  # a new incident
    finally:
        c.stop()

    # the re-send: one more firing alert is in the store; refreshing posts it again and Alertmanager
    # pushes its end further out
    second = [a for a in alertmanager.alerts() if a["labels"]["run_id"] == "amrun" and a["status"]["state"] == "active"]
    assert len(second) == 1
    store = Database(db)
    try:
        time.sleep(1.1)
        WebhookDispatcher(
            Outbox(store), allow_internal=True, run_url=lambda r: f"http://x/api/v1/runs/{r}"
        ).refresh_alertmanagers()
        again = [a for a in alertmanager.alerts() if a["labels"]["alert_id"] == second[0]["labels"]["alert_id"]]
        assert again[0]["endsAt"] > second[0]["endsAt"]
    finally:
        store.close()
