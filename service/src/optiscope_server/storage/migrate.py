"""Schema migrations (Alembic): the collector applies pending ones at start, ``optiscope db
upgrade`` applies them explicitly, ``optiscope db current`` tells where a database stands."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

log = logging.getLogger("optiscope.server")

#: Any fixed number: the PostgreSQL advisory lock that makes replicas starting together migrate
#: one after the other (the second finds nothing left to do).
_LOCK_KEY = 0x6F707469


def config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return cfg


def head() -> str:
    newest = ScriptDirectory.from_config(config()).get_current_head()
    assert newest is not None, "the migrations folder has no revisions"
    return newest


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Apply the migrations up to ``revision`` in one transaction; returns (before, after)."""
    cfg = config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    if before != after:
        log.info("database schema migrated from %s to %s", before or "nothing", after)
    return before, after
