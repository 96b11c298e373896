"""Schema migrations (Alembic) on SQLite and the real PostgreSQL: the migrated schema is exactly the
models', a database made by an earlier collector is upgraded with its history intact, replicas
starting together migrate once, and ``optiscope db`` applies and reports them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, insert, inspect, text

from optiscope import wire
from optiscope_server.storage import migrate
from optiscope_server.storage.database import make_engine
from optiscope_server.storage.tables import metadata

from conftest import Collector

OPTISCOPE = str(Path(sys.executable).parent / "optiscope")
VERSIONS = Path(migrate.__file__).parent / "migrations" / "versions"


def baseline_schema():
    """The frozen tables of the first revision: what an earlier collector's ``create_all`` made."""
    spec = importlib.util.spec_from_file_location("baseline", VERSIONS / "0001_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._schema()


def test_migrated_schema_is_exactly_the_models(db_url):
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diff == [], diff
        assert migrate.current(engine) == migrate.head()
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    try:
        migrate_to(engine, "0001", down=True)
        assert not inspect(engine).has_table("tokens") and migrate.current(engine) == "0001"
        assert migrate.upgrade(engine) == ("0001", migrate.head())
        assert inspect(engine).has_table("tokens")
    finally:
        engine.dispose()


def migrate_to(engine, revision, down=False):
    from alembic import command

    cfg = migrate.config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def test_a_database_of_an_earlier_collector_is_upgraded_with_its_history(db_url, tmp_path):
    """No alembic_version, the baseline tables with data in them: the collector starts, migrates,
    serves the old run, and the new features work on it."""
    old = baseline_schema()
    engine = create_engine(db_url)
    old.create_all(engine)
    t = old.tables
    with engine.begin() as conn:
        conn.execute(
            insert(t["runs"]).values(
                id="old",
                project="legacy",
                name="n",
                status="running",
                config={"lr": 0.1},
                created_at=1.0,
                updated_at=1.0,
            )
        )
        conn.execute(insert(t["run_ranks"]).values(run_id="old", rank=0, status="running", started_at=1.0))
        conn.execute(
            insert(t["alerts"]).values(
                run_id="old",
                rule="non_finite",
                severity="page",
                state="firing",
                series="loss",
                rank=0,
                step=5,
                value=None,
                message="loss is NaN",
                created_at=2.0,
            )
        )
    engine.dispose()

    status = subprocess.run([OPTISCOPE, "db", "current", "--db", db_url], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.startswith("empty (newest: "), status.stdout
    c = Collector(db_url, cwd=tmp_path).start()  # migrates at start
    try:
        run = c.api("/runs/old")
        assert run["config"] == {"lr": 0.1} and run["status"] == "running" and run["alerts"]["firing"] == 1
        assert run["ranks"][0]["last_seen"] is not None  # a full heartbeat timeout from the upgrade on
        assert [p["name"] for p in c.api("/projects")["projects"]] == ["legacy"]
        alert = c.api("/alerts")["alerts"][0]
        assert alert["value"] == "NaN"
        r = httpx.post(f"{c.url}/api/v1/alerts/{alert['id']}/acknowledge", json={})
        assert r.status_code == 200 and r.json()["acknowledged_at"] is not None
        body = wire.encode_batch(wire.Batch("old", 0, 0, [(6, 1.0, {"loss": 1.5})]))
        assert httpx.post(f"{c.url}/api/v1/runs/old/batches", content=body).status_code == 200
    finally:
        c.stop()
    status = subprocess.run([OPTISCOPE, "db", "current", "--db", db_url], capture_output=True, text=True, timeout=60)
    assert status.stdout.strip() == f"{migrate.head()} (newest: {migrate.head()}, up to date)"


def test_db_upgrade_command(tmp_path):
    db = f"sqlite:///{tmp_path / 'u.db'}"
    first = subprocess.run([OPTISCOPE, "db", "upgrade", "--db", db], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and first.stdout.strip() == f"empty -> {migrate.head()}", first.stderr
    again = subprocess.run([OPTISCOPE, "db", "upgrade", "--db", db], capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == f"already at {migrate.head()}"


def test_replicas_starting_together_migrate_once(pg_url):
    """Several collectors on one PostgreSQL start at the same moment: the advisory lock makes them
    migrate one after the other; none fails on a table another has just made."""
    engines = [create_engine(pg_url) for _ in range(4)]
    results, errors = [], []
    go = threading.Barrier(len(engines))

    def start(engine):
        try:
            go.wait()
            results.append(migrate.upgrade(engine))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    for e in engines:
        e.dispose()
    assert not errors, errors
    head = migrate.head()
    assert sorted(results, key=str) == sorted([(None, head)] + [(head, head)] * 3, key=str)
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    engine.dispose()


def test_a_database_that_cannot_be_opened_is_one_line_not_a_traceback(tmp_path):
    """A typo in --db (a missing directory, a database that does not exist) is a message and exit 2,
    for every command that opens the database, with the password left out."""
    missing = f"sqlite:///{tmp_path / 'no-such-dir' / 'o.db'}"
    pg = "postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/optiscope_no_such_database"
    for args in (["serve", "--port", "1"], ["db", "current"], ["db", "upgrade"], ["token", "list"]):
        for db in (missing, pg):
            r = subprocess.run([OPTISCOPE, *args, "--db", db], capture_output=True, text=True, timeout=60)
            assert r.returncode == 2, (args, db, r.stderr)
            assert "cannot open the database" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert "hunter2" not in r.stderr
    assert not (tmp_path / "no-such-dir").exists()
