"""The audit log: who did what to which object, when. Entries are written in the transaction of
the action they record, and survive the deletion of the runs and projects they mention."""

from __future__ import annotations

import time

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine

from .tables import audit


def write_audit(
    conn: Connection,
    actor: str,
    action: str,
    project: str | None,
    target: object | None,
    detail: dict | None = None,
    remote: str | None = None,
) -> None:
    """One audit entry, in the caller's transaction: the action and its record commit together."""
    conn.execute(
        insert(audit).values(
            at=time.time(),
            actor=actor[:200],
            action=action,
            project=project,
            target=None if target is None else str(target)[:200],
            detail=detail,
            remote=remote,
        )
    )


def list_audit(
    engine: Engine, project: str | None, action: str | None, limit: int, before: int | None = None
) -> list[dict]:
    """Entries, newest first; ``before`` (an entry id) pages back from there."""
    q = select(audit).order_by(audit.c.id.desc()).limit(limit)
    if project is not None:
        q = q.where(audit.c.project == project)
    if action is not None:
        q = q.where(audit.c.action == action)
    if before is not None:
        q = q.where(audit.c.id < before)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]
