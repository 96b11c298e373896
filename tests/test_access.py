"""Access control against the real collector: tokens made with ``optiscope token``, scoped to one
project, stored hashed; every endpoint tried with no token, a wrong token, another project's token,
a revoked token and a token of too small a scope; the audit log of administrative actions."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from optiscope import wire

from conftest import Collector, free_port, wait_until

OPTISCOPE = str(Path(sys.executable).parent / "optiscope")


def cli(*args: str, db: str) -> subprocess.CompletedProcess:
    return subprocess.run([OPTISCOPE, *args, "--db", db], capture_output=True, text=True, timeout=120)


def make_token(db: str, project: str, *scopes: str) -> str:
    r = cli("token", "create", "--project", project, *[a for s in scopes for a in ("--scope", s)], db=db)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("osk_") and len(token) == 64, token
    return token


def token_id(token: str) -> str:
    return token.split("_")[1]


def auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def batch(run_id: str, seq: int, value: float = 1.0) -> bytes:
    return wire.encode_batch(wire.Batch(run_id, 0, seq, [(seq, 1.0, {"loss": value})]))


@pytest.fixture
def secured(db_url, tmp_path):
    """A collector whose database holds tokens: alpha's (one per scope, an admin, a revoked admin) and
    beta's admin; alpha has run a1 with a firing alert, run a2 (for deletion) and beta run b1."""
    t = {
        "ingest": make_token(db_url, "alpha", "ingest"),
        "read": make_token(db_url, "alpha", "read"),
        "admin": make_token(db_url, "alpha", "admin"),
        "revoked": make_token(db_url, "alpha", "admin"),
        "beta": make_token(db_url, "beta", "admin"),
    }
    r = cli("token", "revoke", token_id(t["revoked"]), db=db_url)
    assert r.returncode == 0 and "revoked" in r.stdout, r.stderr
    c = Collector(db_url, cwd=tmp_path).start()
    h = auth(t["ingest"])
    for run in ("a1", "a2"):
        assert (
            httpx.put(f"{c.url}/api/v1/runs/{run}", json={"project": "alpha", "name": run}, headers=h).status_code
            == 200
        )
    # rank 1 of a1 registers too: the matrix finishes it (a rank that never registered is a 404)
    rank1 = {"project": "alpha", "name": "a1", "rank": 1}
    assert httpx.put(f"{c.url}/api/v1/runs/a1", json=rank1, headers=h).status_code == 200
    assert httpx.post(f"{c.url}/api/v1/runs/a1/batches", content=batch("a1", 0, math.nan), headers=h).status_code == 200
    assert (
        httpx.put(f"{c.url}/api/v1/runs/b1", json={"project": "beta", "name": "b"}, headers=auth(t["beta"])).status_code
        == 200
    )
    alert = httpx.get(f"{c.url}/api/v1/alerts", headers=auth(t["read"])).json()["alerts"][0]
    hook = httpx.post(f"{c.url}/api/v1/webhooks", json={"url": "https://example.com/hook"}, headers=auth(t["admin"]))
    assert hook.status_code == 201 and hook.json()["project"] == "alpha", hook.text
    c.hook_id = hook.json()["id"]
    yield c, t, alert["id"]
    c.stop()


# (method, path, json body or batch seq, the scope it needs)
def endpoints(alert_id: int, hook_id: int) -> list[tuple]:
    return [
        ("PUT", "/runs/a1", {"project": "alpha", "name": "a1"}, "ingest"),
        ("POST", "/runs/a1/batches", "batch", "ingest"),
        ("POST", "/runs/a1/heartbeat", {"rank": 0}, "ingest"),
        ("POST", "/runs/a1/finish", {"status": "finished", "rank": 1}, "ingest"),
        ("GET", "/projects", None, "read"),
        ("GET", "/runs?project=alpha", None, "read"),
        ("GET", "/runs/a1", None, "read"),
        ("GET", "/runs/a1/series", None, "read"),
        ("GET", "/runs/a1/series/loss", None, "read"),
        ("GET", "/runs/a1/series/loss?format=csv", None, "read"),
        ("GET", "/series?name=loss&run=a1", None, "read"),
        ("GET", "/runs/a1/alerts", None, "read"),
        ("GET", "/alerts?project=alpha", None, "read"),
        ("POST", f"/alerts/{alert_id}/acknowledge", {"note": "mine"}, "admin"),
        ("GET", "/audit?project=alpha", None, "admin"),
        ("GET", "/webhooks", None, "admin"),
        ("POST", "/webhooks", {"url": "https://example.com/h", "project": "alpha"}, "admin"),
        ("POST", f"/webhooks/{hook_id}/rotate", None, "admin"),
        ("POST", f"/webhooks/{hook_id}/enable", None, "admin"),
        ("DELETE", f"/webhooks/{hook_id}", None, "admin"),
        ("DELETE", "/runs/a2?force=true", None, "admin"),
        ("DELETE", "/projects/alpha?force=true", None, "admin"),
    ]


SMALLER = {"ingest": "read", "read": "ingest", "admin": "read"}


def test_every_endpoint_refuses_what_it_must_and_allows_its_scope(secured):
    c, t, alert_id = secured
    seq = iter(range(1, 10_000))

    def call(method, path, body, token):
        kw = {"headers": auth(token)}
        if body == "batch":
            kw["content"] = batch("a1", next(seq))
        elif body is not None:
            kw["json"] = body
        return httpx.request(method, f"{c.url}/api/v1{path}", timeout=30, **kw)

    wrong = [
        None,
        "osk_0123456789abcdef_" + "A" * 43,
        t["admin"][:-1] + ("B" if t["admin"][-1] != "B" else "C"),
        "not-a-token",
        t["revoked"],
    ]
    failures = []
    for method, path, body, scope in endpoints(alert_id, c.hook_id):

        def expect(token, status, reason, what, method=method, path=path, body=body):
            r = call(method, path, body, token)
            got = (
                r.status_code,
                r.json().get("reason")
                if r.headers.get("content-type", "").startswith("application/json") and r.status_code >= 400
                else None,
            )
            if got != (status, reason):
                failures.append(f"{method} {path} with {what}: {got}, expected {(status, reason)}: {r.text[:200]}")
            return r

        for i, token in enumerate(wrong):
            expect(token, 401, "unauthorized", f"bad token #{i}")
        expect(t[SMALLER[scope]], 403, "insufficient_scope", f"a {SMALLER[scope]} token")
        if scope == "admin":
            expect(t["ingest"], 403, "insufficient_scope", "an ingest token")
        # another project's admin: the object is not theirs
        if path == "/projects":
            r = call(method, path, body, t["beta"])
            if [p["name"] for p in r.json()["projects"]] != ["beta"]:
                failures.append(f"GET /projects with beta's token shows {r.text[:200]}")
        elif (method, path) == ("GET", "/webhooks"):
            r = call(method, path, body, t["beta"])
            if r.json()["webhooks"] != []:
                failures.append(f"GET /webhooks with beta's token shows {r.text[:200]}")
        elif (method, path) == ("POST", "/webhooks"):
            expect(t["beta"], 403, "project_not_allowed", "beta's token")
        elif method == "PUT":
            expect(t["beta"], 403, "project_not_allowed", "beta's token")
            r = httpx.put(f"{c.url}/api/v1/runs/a1", json={"project": "beta", "name": "x"}, headers=auth(t["beta"]))
            if r.status_code != 404:  # alpha's run, re-registered by beta under beta: not found, not a 409 leak
                failures.append(f"PUT alpha's run as beta: {r.status_code} {r.text[:200]}")
        else:
            expect(t["beta"], 404, "not_found", "beta's token")
        # the scope it needs, then admin (which holds every scope of its project)
        for who in dict.fromkeys((scope, "admin")):
            r = call(method, path, body, t[who])
            if not 200 <= r.status_code < 300:
                failures.append(f"{method} {path} with a {who} token: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)

    # beta saw nothing of alpha and alpha's deletion left beta alone
    assert [r["id"] for r in httpx.get(f"{c.url}/api/v1/runs", headers=auth(t["beta"])).json()["runs"]] == ["b1"]
    # /healthz and /metrics stay open (probes and Prometheus)
    assert httpx.get(f"{c.url}/healthz").status_code == 200 and httpx.get(f"{c.url}/metrics").status_code == 200


def test_audit_log_records_tokens_acknowledgements_and_deletions(secured, db_url):
    c, t, alert_id = secured
    admin = auth(t["admin"])
    r = httpx.post(f"{c.url}/api/v1/alerts/{alert_id}/acknowledge", json={"note": "looking"}, headers=admin)
    assert r.status_code == 200
    acked = r.json()
    assert acked["acknowledged_by"] == f"token:{token_id(t['admin'])} (admin)" and acked["ack_note"] == "looking"
    # idempotent: a second acknowledgement changes nothing and is not audited again
    again = httpx.post(f"{c.url}/api/v1/alerts/{alert_id}/acknowledge", json={"note": "other"}, headers=admin).json()
    assert again["acknowledged_at"] == acked["acknowledged_at"] and again["ack_note"] == "looking"
    assert httpx.get(f"{c.url}/api/v1/alerts?acknowledged=true", headers=admin).json()["alerts"][0]["id"] == alert_id
    assert httpx.get(f"{c.url}/api/v1/alerts?acknowledged=false", headers=admin).json()["alerts"] == []
    assert httpx.get(f"{c.url}/api/v1/runs/a1", headers=admin).json()["alerts"]["firing_unacknowledged"] == 0
    assert httpx.delete(f"{c.url}/api/v1/runs/a2?force=true", headers=admin).status_code == 200

    entries = httpx.get(f"{c.url}/api/v1/audit", headers=admin).json()["entries"]
    actions = [(e["action"], e["target"]) for e in entries]
    assert actions[:2] == [("run.delete", "a2"), ("alert.acknowledge", str(alert_id))]
    creates = [e for e in entries if e["action"] == "token.create"]
    assert len(creates) == 4 and all(e["actor"].startswith("cli:") for e in creates)  # alpha's four
    assert [e["target"] for e in entries if e["action"] == "token.revoke"] == [token_id(t["revoked"])]
    assert entries[0]["actor"] == f"token:{token_id(t['admin'])} (admin)" and entries[0]["remote"] == "127.0.0.1"
    assert all(e["project"] == "alpha" for e in entries)  # beta's token creation is not alpha's to see
    # pages
    first = httpx.get(f"{c.url}/api/v1/audit?limit=2", headers=admin).json()
    rest = httpx.get(f"{c.url}/api/v1/audit?limit=100&cursor={first['next_cursor']}", headers=admin).json()
    assert [e["id"] for e in first["entries"] + rest["entries"]] == [e["id"] for e in entries]
    # the project's deletion is audited too, and the log survives it
    assert httpx.delete(f"{c.url}/api/v1/projects/alpha?force=true", headers=admin).status_code == 200
    after = httpx.get(f"{c.url}/api/v1/audit", headers=admin).json()["entries"]
    assert after[0]["action"] == "project.delete" and after[0]["detail"]["runs"] == 1 and len(after) == len(entries) + 1


def test_tokens_are_stored_hashed_and_listed_without_secrets(tmp_path):
    db = f"sqlite:///{tmp_path / 't.db'}"
    token = make_token(db, "p", "read", "ingest")
    listed = cli("token", "list", "--json", db=db)
    assert listed.returncode == 0 and token not in listed.stdout and "secret" not in listed.stdout
    assert '"scopes": "ingest,read"' in listed.stdout
    raw = (
        (tmp_path / "t.db").read_bytes() + (tmp_path / "t.db-wal").read_bytes()
        if (tmp_path / "t.db-wal").exists()
        else (tmp_path / "t.db").read_bytes()
    )
    secret = token.split("_", 2)[2]
    assert secret.encode() not in raw and token_id(token).encode() in raw
    assert cli("token", "create", "--project", "bad project", "--scope", "read", db=db).returncode == 2
    assert cli("token", "revoke", "0000000000000000", db=db).returncode == 1


def test_open_on_loopback_until_a_token_exists_and_never_again_after(tmp_path):
    db = f"sqlite:///{tmp_path / 'o.db'}"
    c = Collector(db, cwd=tmp_path).start()
    try:
        assert httpx.get(f"{c.url}/api/v1/runs").status_code == 200  # the embedded default: open on loopback
        for host in ("localhost:1", "[::1]:8737", "127.0.0.1"):
            assert httpx.get(f"{c.url}/api/v1/runs", headers={"Host": host}).status_code == 200, host
        # a page re-pointed at 127.0.0.1 (DNS rebinding) arrives with its own name: refused
        rebound = httpx.get(f"{c.url}/api/v1/runs", headers={"Host": "attacker.example:8737"})
        assert rebound.status_code == 403 and rebound.json()["reason"] == "host_not_allowed"
        token = make_token(db, "p", "read")  # made while the collector runs: it applies within a second
        wait_until(lambda: httpx.get(f"{c.url}/api/v1/runs").status_code == 401, 3, what="the collector closing")
        assert httpx.get(f"{c.url}/api/v1/runs", headers=auth(token)).status_code == 200
        assert cli("token", "revoke", token_id(token), db=db).returncode == 0
        assert httpx.get(f"{c.url}/api/v1/runs", headers=auth(token)).status_code == 401  # revocation is immediate
        assert httpx.get(f"{c.url}/api/v1/runs").status_code == 401  # revoking the last token opens nothing
    finally:
        c.stop()


def test_public_address_needs_authentication_and_then_always_requires_it(tmp_path):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    refused = subprocess.run(
        [OPTISCOPE, "serve", "--host", "0.0.0.0", "--db", db], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "refusing to listen" in refused.stderr
    token = make_token(db, "p", "read")
    port = free_port()
    proc = subprocess.Popen(
        [OPTISCOPE, "serve", "--host", "0.0.0.0", "--port", str(port), "--db", db, "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def up():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, what="collector on 0.0.0.0")
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/runs").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/runs", headers=auth(token)).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_token_create_refuses_a_default_database_no_collector_uses(tmp_path):
    """Without --db or OPTISCOPE_DB, `token create` in a folder with no optiscope.db would make a
    database nobody reads: it refuses, makes no file, and says which database it looked for; with
    the database there, the token is made and the database named."""
    env = {k: v for k, v in os.environ.items() if k != "OPTISCOPE_DB"}
    args = [OPTISCOPE, "token", "create", "--project", "p", "--scope", "read"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 2 and str(tmp_path / "optiscope.db") in r.stderr, r.stderr
    assert not (tmp_path / "optiscope.db").exists()
    assert subprocess.run([OPTISCOPE, "db", "upgrade"], cwd=tmp_path, env=env, timeout=120).returncode == 0
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.startswith("osk_") and "sqlite:///optiscope.db" in r.stderr, r.stderr
