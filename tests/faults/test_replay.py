"""Only an acknowledgement releases a spooled batch. A replay (``optiscope sync``, or a new run
sending what earlier runs left) that is refused for its credentials, answered 5xx, or refused for
any other reason keeps every batch; a batch the collector will never accept (400, 422) goes to the
quarantine folder with one log line instead of holding up the others."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest

from optiscope import wire
from optiscope.transport import spool as sp
from optiscope.transport.http import HttpClient
from optiscope.transport.session import CollectorSession

from conftest import BIN, Collector

N = 6


def _body(run_id: str, seq: int) -> bytes:
    return wire.encode_batch(wire.Batch(run_id, 0, seq, [(seq, 0.0, {"x": float(seq)})]))


def _spool(root, run_id: str = "r1", project: str = "b"):
    """What a run that ended while the collector was away leaves: N batches and its end."""
    s = sp.Spool(root, run_id, 0, {"project": project, "name": "left", "config": {}})
    for seq in range(N):
        assert s.append(seq, _body(run_id, seq))
    s.close("finished", delivered=False)
    return s.dir


def _frames(directory) -> list[bytes]:
    return [b for seg in sorted(directory.glob("*.seg")) for b in sp.read_frames(seg)]


def _answering(batch_status, put_status=200, finish_status=200):
    """A handler: the registration, each batch (by its seq) and the end of the run answered as given."""

    def handle(req):
        if req.method == "PUT":
            return put_status, {}, {}
        if req.path.endswith("/finish"):
            return finish_status, {}, {}
        seq = wire.decode_batch(req.content).seq
        return batch_status(seq), {}, {}

    return handle


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_keep_every_batch(spool_dir, http_receiver, status):
    d = _spool(spool_dir)
    r = http_receiver(handler=lambda req: (status, {}, {"reason": "unauthorized"}))
    assert sp.replay(d, HttpClient(r.url)) == ("unauthorized", 0)
    assert _frames(d) == [_body("r1", s) for s in range(N)] and (d / "end.json").exists()
    # refused at the batches rather than the registration: the same
    r2 = http_receiver(handler=_answering(lambda seq: status))
    assert sp.replay(d, HttpClient(r2.url)) == ("unauthorized", 0)
    assert len(_frames(d)) == N


@pytest.mark.parametrize(("status", "outcome"), [(500, "unreachable"), (404, "refused"), (409, "refused")])
def test_an_answer_that_is_not_an_acknowledgement_releases_nothing(spool_dir, http_receiver, status, outcome):
    d = _spool(spool_dir)
    r = http_receiver(handler=_answering(lambda seq: status if seq == 3 else 200))
    assert sp.replay(d, HttpClient(r.url)) == (outcome, 3)
    assert len(_frames(d)) == N  # the segment holds an unacknowledged batch: nothing is deleted
    r.handler = _answering(lambda seq: 200)  # the collector takes them later
    assert sp.replay(d, HttpClient(r.url)) == ("done", N)
    assert not d.exists()


def test_a_refused_end_of_run_keeps_the_spool(spool_dir, http_receiver):
    d = _spool(spool_dir)
    r = http_receiver(handler=_answering(lambda seq: 200, finish_status=403))
    assert sp.replay(d, HttpClient(r.url)) == ("unauthorized", N)
    assert (d / "run.json").exists() and (d / "end.json").exists()


def test_a_malformed_batch_is_quarantined_and_the_others_delivered(spool_dir, http_receiver, caplog):
    d = _spool(spool_dir)
    r = http_receiver(handler=_answering(lambda seq: 422 if seq == 2 else 200))
    with caplog.at_level(logging.WARNING, logger="optiscope"):
        assert sp.replay(d, HttpClient(r.url)) == ("done", N - 1)
    assert not d.exists()
    kept = list((spool_dir / sp.QUARANTINE / d.name).iterdir())
    assert [p.read_bytes() for p in kept] == [_body("r1", 2)]
    assert sp.pending_spools(spool_dir) == []  # the quarantine is not a spool to replay
    lines = [rec.getMessage() for rec in caplog.records if "malformed" in rec.getMessage()]
    assert len(lines) == 1 and str(kept[0]) in lines[0]


def test_the_next_run_leaves_a_spool_its_token_may_not_deliver(spool_dir, http_receiver, caplog):
    """A run whose token belongs to project A finds project B's leftover spool: 403, kept, one line."""
    d = _spool(spool_dir, project="b")
    r = http_receiver(handler=lambda req: (403, {}, {"reason": "project_not_allowed"}))
    session = CollectorSession(HttpClient(r.url, "a-token"), "own", 0, 10.0)
    with caplog.at_level(logging.WARNING, logger="optiscope"):
        assert session.replay_spools(spool_dir, None) == 0
        assert session.replay_spools(spool_dir, None) == 0
    assert len(_frames(d)) == N
    assert len([rec for rec in caplog.records if "left an earlier run's spool" in rec.getMessage()]) == 1


def test_sync_without_the_token_keeps_the_spool_and_says_what_to_do(tmp_path, spool_dir):
    """Against a collector that requires a token: no token and a wrong one exit 1 with advice and
    delete nothing; the right token delivers every batch."""
    d = _spool(spool_dir, run_id="left-run", project="p")
    c = Collector(f"sqlite:///{tmp_path / 'o.db'}", token="root-secret-token", cwd=tmp_path).start()
    env = {k: v for k, v in os.environ.items() if k != "OPTISCOPE_TOKEN"}

    def sync(*extra):
        args = [str(BIN / "optiscope"), "sync", "--url", c.url, "--dir", str(spool_dir), *extra]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)

    try:
        for extra in ((), ("--token", "wrong-token")):
            r = sync(*extra)
            assert r.returncode == 1, r.stdout + r.stderr
            assert "left-run-0: unauthorized, 0 batches acknowledged" in r.stdout
            assert "OPTISCOPE_TOKEN" in r.stderr and "nothing of them was deleted" in r.stderr
            assert len(_frames(d)) == N
        r = sync("--token", "root-secret-token")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"left-run-0: done, {N} batches acknowledged" in r.stdout
        got = c.api("/runs/left-run/series/x")
        assert got["steps"] == list(range(N)) and c.api("/runs/left-run")["status"] == "finished"
        assert sp.pending_spools(spool_dir) == []
    finally:
        c.stop()


def test_a_token_created_mid_run_keeps_the_rest_in_the_spool_for_sync(tmp_path, spool_dir, caplog):
    """The collector starts open; a token is created while a run sends. The batches refused with
    401 are not dropped: they stay in the spool with the run's end, one line says what to do, and
    `optiscope sync` with the new token delivers every point and finishes the run."""
    import optiscope

    from conftest import get_json, wait_until

    db = f"sqlite:///{tmp_path / 'o.db'}"
    c = Collector(db, cwd=tmp_path).start()
    try:
        run = optiscope.init(project="p", url=c.url, max_batch_records=10, flush_interval=0.05)
        for step in range(100):
            run.log({"x": float(step)}, step=step)
        wait_until(lambda: run.counters["sent_points"] >= 100, what="the first 100 points delivered")
        made = subprocess.run(
            [str(BIN / "optiscope"), "token", "create", "--project", "p", "--scope", "admin", "--db", db],
            capture_output=True,
            text=True,
            timeout=60,
        )
        token = made.stdout.strip()
        assert made.returncode == 0 and token.startswith("osk_"), made.stderr
        wait_until(lambda: _refused(c.url), what="the collector closed to requests without a token")
        with caplog.at_level(logging.WARNING, logger="optiscope"):
            for step in range(100, 200):
                run.log({"x": float(step)}, step=step)
            assert run.finish(timeout=10) is False  # not delivered: kept
        lines = [r.getMessage() for r in caplog.records if "refused this run's token" in r.getMessage()]
        assert len(lines) == 1 and "OPTISCOPE_TOKEN" in lines[0] and "optiscope sync" in lines[0]
        assert "dropping it" not in caplog.text
        [left] = sp.pending_spools(spool_dir)
        spooled = {s for b in _frames(left) for s, _, values in wire.decode_batch(b).records if "x" in values}
        assert set(range(100, 200)) <= spooled

        env = {**os.environ, "OPTISCOPE_SPOOL_DIR": str(spool_dir), "OPTISCOPE_TOKEN": token}
        r = subprocess.run(
            [str(BIN / "optiscope"), "sync", "--url", c.url], env=env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stdout + r.stderr
        got = get_json(f"{c.url}/api/v1/runs/{run.id}/series/x", token)
        assert got["steps"] == list(range(200)) and got["values"] == [float(s) for s in range(200)]
        assert get_json(f"{c.url}/api/v1/runs/{run.id}", token)["status"] == "finished"
    finally:
        c.stop()


def _refused(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/api/v1/runs", timeout=5)
    except urllib.error.HTTPError as e:
        return e.code == 401
    return False


def test_a_spool_is_readable_by_its_owner_only(tmp_path, http_receiver):
    """A spool holds a run's config, environment and values: folders 0700, files 0600, whatever the
    umask; the quarantine too."""
    old = os.umask(0o022)
    try:
        root = tmp_path / "new-root" / "spool"
        d = _spool(root)
        r = http_receiver(handler=_answering(lambda seq: 422 if seq == 0 else 500))
        assert sp.replay(d, HttpClient(r.url))[0] == "unreachable"
    finally:
        os.umask(old)
    made = [root.parent, root, d, root / sp.QUARANTINE, root / sp.QUARANTINE / d.name]
    assert all((p.stat().st_mode & 0o777) == 0o700 for p in made), [oct(p.stat().st_mode) for p in made]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"run.json", "end.json", "lock"} and any(p.suffix == ".seg" for p in files)
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in files), {p.name: oct(p.stat().st_mode) for p in files}
