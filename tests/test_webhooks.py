"""Alert delivery against the real collector: Standard Webhooks signatures verified the way a
receiver verifies them (and the signing primitive against published test vectors), the same id on
every retry, 410 Gone disabling an endpoint, secret rotation, target address checks, formats."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time

import httpx
import pytest

from optiscope import wire
from optiscope_server.alerting import signing

from conftest import Collector, Receiver, wait_until


# -- the signing primitive and the scheme, against published vectors ----------------------------
def test_hmac_primitive_matches_githubs_published_test_vector():
    # docs.github.com, "Validating webhook deliveries": secret and payload, and the expected signature
    digest = signing.hmac_sha256(b"It's a Secret to Everybody", b"Hello, World!")
    assert digest.hex() == "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_signature_matches_the_standard_webhooks_example():
    # the Standard Webhooks specification's example message
    sig = signing.signature(
        ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    two = signing.signature(
        [signing.new_secret(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert two.split(" ")[1] == sig and two.split(" ")[0] != sig  # rotation: one signature per secret


def verify(secret: str, headers: dict, body: bytes, tolerance: float = 300) -> bool:
    """What a receiver does (written from the specification, not from the collector's code)."""
    msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(ts)) > tolerance:
        return False
    key = base64.b64decode(secret.split("_", 1)[1])
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(part, "v1," + expected) for part in headers["webhook-signature"].split(" "))


# -- through the collector ----------------------------------------------------------------------
def nan_batch(run: str, seq: int, value: float = math.nan) -> bytes:
    return wire.encode_batch(wire.Batch(run, 0, seq, [(seq, time.time(), {"loss": value})]))


def fire(c: Collector, run: str, project: str = "p", seq: int = 0) -> None:
    assert httpx.put(f"{c.url}/api/v1/runs/{run}", json={"project": project, "name": run}).status_code == 200
    assert httpx.post(f"{c.url}/api/v1/runs/{run}/batches", content=nan_batch(run, seq)).status_code == 200


def add_hook(c: Collector, url: str, **extra) -> dict:
    r = httpx.post(f"{c.url}/api/v1/webhooks", json={"url": url, **extra})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def fast(db_url, tmp_path):
    """A collector whose failed deliveries are retried within a second, targets on loopback allowed."""
    c = Collector(
        db_url, cwd=tmp_path, extra_args=["--allow-internal-webhooks", "--webhook-retry-schedule", "0.3,0.3,0.3"]
    ).start()
    yield c
    c.stop()


def test_signed_delivery_verifies_and_keeps_its_id_across_retries(fast, receiver):
    hook = add_hook(fast, receiver.url, project="p")
    assert hook["secret"].startswith("whsec_") and hook["secrets"] == 1 and hook["project"] == "p"
    assert "secret" not in [
        k for k, v in httpx.get(f"{fast.url}/api/v1/webhooks").json()["webhooks"][0].items() if v is not None
    ]  # never shown again
    receiver.status = 500
    fire(fast, "r1")
    wait_until(lambda: len(receiver.attempts) >= 2, what="a retry")
    receiver.status = 200
    wait_until(lambda: receiver.events, what="the delivery")
    ids = {a["webhook-id"] for a in receiver.attempts}
    assert len(ids) == 1 and next(iter(ids)).startswith("msg_")  # the same id on every attempt
    assert verify(hook["secret"], receiver.headers[0], receiver.bodies[0])
    assert not verify(signing.new_secret(), receiver.headers[0], receiver.bodies[0])
    tampered = receiver.bodies[0].replace(b'"NaN"', b'"Infinity"')
    assert not verify(hook["secret"], receiver.headers[0], tampered)
    event = receiver.events[0]
    assert event["type"] == "alert.firing" and event["alert"]["value"] == "NaN" and event["run"]["id"] == "r1"
    # another project's alerts do not go to p's endpoint
    fire(fast, "other", project="q")
    time.sleep(1.0)
    assert [e["run"]["id"] for e in receiver.events] == ["r1"]


def test_rotation_signs_with_both_secrets_until_finished(fast, receiver):
    hook = add_hook(fast, receiver.url)
    rotated = httpx.post(f"{fast.url}/api/v1/webhooks/{hook['id']}/rotate").json()
    assert rotated["secrets"] == 2 and rotated["secret"] != hook["secret"]
    fire(fast, "r1")
    wait_until(lambda: receiver.events, what="the delivery")
    h, b = receiver.headers[0], receiver.bodies[0]
    assert len(h["webhook-signature"].split(" ")) == 2
    assert verify(hook["secret"], h, b) and verify(rotated["secret"], h, b)  # old and new receivers both verify
    done = httpx.post(f"{fast.url}/api/v1/webhooks/{hook['id']}/rotate?finish=true").json()
    assert done["secrets"] == 1 and done["secret"] is None
    fire(fast, "r2")
    wait_until(lambda: len(receiver.events) == 2, what="the second delivery")
    h, b = receiver.headers[1], receiver.bodies[1]
    assert verify(rotated["secret"], h, b) and not verify(hook["secret"], h, b)
    actions = [e["action"] for e in httpx.get(f"{fast.url}/api/v1/audit").json()["entries"]]
    assert actions[:3] == ["webhook.rotate_finish", "webhook.rotate", "webhook.create"]


def test_an_endpoint_answering_410_is_disabled_and_can_be_enabled_again(fast, receiver):
    hook = add_hook(fast, receiver.url)
    receiver.status = 410
    fire(fast, "r1")
    wait_until(
        lambda: httpx.get(f"{fast.url}/api/v1/webhooks").json()["webhooks"][0]["disabled_at"],
        what="the endpoint disabled",
    )
    time.sleep(1.5)  # longer than the whole retry schedule: nothing is retried
    assert len(receiver.attempts) == 1
    listed = httpx.get(f"{fast.url}/api/v1/webhooks").json()["webhooks"][0]
    assert listed["disabled_reason"] == "answered 410 Gone"
    audit = httpx.get(f"{fast.url}/api/v1/audit?action=webhook.disable").json()["entries"]
    assert audit[0]["actor"] == "collector" and audit[0]["target"] == str(hook["id"])
    fire(fast, "r2")  # a disabled endpoint gets no new deliveries
    time.sleep(1.0)
    assert len(receiver.attempts) == 1
    receiver.status = 200
    assert httpx.post(f"{fast.url}/api/v1/webhooks/{hook['id']}/enable").json()["disabled_at"] is None
    fire(fast, "r3")
    wait_until(lambda: receiver.events, what="delivery after enabling")
    assert [e["run"]["id"] for e in receiver.events] == ["r3"]


def test_internal_targets_are_refused_at_send_time_unless_allowed(tmp_path, receiver):
    c = Collector(
        f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path, extra_args=["--webhook-retry-schedule", "0.2"]
    ).start()
    try:
        add_hook(c, receiver.url)  # accepted (a name's address can change): checked at every send
        fire(c, "r1")
        wait_until(
            lambda: 'optiscope_webhook_deliveries_total{outcome="failed"} 2.0' in c.metrics(),
            what="both attempts refused",
        )
        assert receiver.attempts == []
    finally:
        c.stop()


def test_configured_webhooks_are_rows_signed_with_the_configured_secret(tmp_path):
    slack, native = Receiver(), Receiver()
    secret = signing.new_secret()
    c = Collector(
        f"sqlite:///{tmp_path / 'x.db'}",
        webhooks=[native.url, f"slack={slack.url}"],
        cwd=tmp_path,
        extra_args=["--webhook-secret", secret],
    ).start()
    try:
        listed = httpx.get(f"{c.url}/api/v1/webhooks").json()["webhooks"]
        assert {(w["format"], w["source"], w["project"], w["secrets"]) for w in listed} == {
            ("native", "config", None, 1),
            ("slack", "config", None, 1),
        }
        assert httpx.delete(f"{c.url}/api/v1/webhooks/{listed[0]['id']}").status_code == 409
        fire(c, "r1", project="any")
        wait_until(lambda: native.events and slack.events, what="both deliveries")
        assert verify(secret, native.headers[0], native.bodies[0])
        assert "NaN" in slack.events[0]["text"] and slack.events[0]["blocks"]
    finally:
        c.stop()
        slack.close()
        native.close()
    # started again without the Slack endpoint: it is disabled, the native one kept
    c = Collector(f"sqlite:///{tmp_path / 'x.db'}", webhooks=[native.url], cwd=tmp_path).start()
    try:
        state = {w["format"]: w["disabled_reason"] for w in httpx.get(f"{c.url}/api/v1/webhooks").json()["webhooks"]}
        assert state == {"native": None, "slack": "no longer configured"}
    finally:
        c.stop()


def test_webhook_input_is_checked(fast):
    def status(body):
        return httpx.post(f"{fast.url}/api/v1/webhooks", json=body).status_code

    assert status({"url": "ftp://example.com/x"}) == 422
    assert status({"url": "http://user:pw@example.com/x"}) == 422
    for port in ("99999", "0", "65536"):  # out of range: refused at creation, not at the first send
        assert status({"url": f"https://example.com:{port}/x"}) == 422
    assert status({"url": "https://example.com:8443/x"}) == 201
    assert status({"url": "https://example.com/x", "format": "teams"}) == 422
    assert status({"url": "https://example.com/x", "secret": "not-a-secret"}) == 422
    assert status({"url": "https://example.com/x", "secret": signing.new_secret()}) == 201
    assert httpx.delete(f"{fast.url}/api/v1/webhooks/999").status_code == 404


def test_deliveries_beyond_a_shortened_schedule_are_given_up_not_left_blocking(tmp_path, receiver):
    """Rows that had more attempts than the schedule now allows (it was shortened between two starts)
    are given up; they must not stay due and hold up the newer deliveries behind them."""
    from sqlalchemy import insert, select

    from optiscope_server.alerting import Outbox, WebhookDispatcher
    from optiscope_server.storage import Database
    from optiscope_server.storage.tables import alerts, outbox, runs

    store = Database(f"sqlite:///{tmp_path / 's.db'}")
    try:
        with store.engine.begin() as conn:
            conn.execute(
                insert(runs).values(
                    id="r", project="p", name="r", status="running", config={}, created_at=1.0, updated_at=1.0
                )
            )
            aid = conn.execute(
                insert(alerts).values(
                    run_id="r",
                    rule="x",
                    severity="page",
                    state="firing",
                    series="loss",
                    rank=0,
                    step=1,
                    value=1.0,
                    message="m",
                    created_at=1.0,
                )
            ).inserted_primary_key[0]
            event = (
                '{"type": "alert.firing", "alert": {"id": 1, "rule": "x", "severity": "page", "state": "firing", '
                '"series": "loss", "step": 1, "rank": 0, "value": 1.0, "message": "m"}, '
                '"run": {"id": "r", "project": "p", "name": "r", "url": "u"}, "time": 1.0}'
            )
            conn.execute(
                insert(outbox),
                [
                    {"alert_id": aid, "target": receiver.url, "payload": event, "attempts": 5, "next_attempt_at": 0.0}
                    for _ in range(100)
                ]
                + [{"alert_id": aid, "target": receiver.url, "payload": event, "attempts": 0, "next_attempt_at": 0.0}],
            )
        d = WebhookDispatcher(Outbox(store), schedule=(1.0, 2.0), allow_internal=True)
        for _ in range(3):
            d.deliver_due()
        assert len(receiver.events) == 1  # the fresh one got through
        with store.engine.connect() as conn:
            left = conn.execute(select(outbox.c.last_error).where(outbox.c.attempts == 6)).scalars().all()
        assert left == ["retry schedule exhausted"] * 100
    finally:
        store.close()
