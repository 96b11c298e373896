"""Projects: created by the first run registered in them (or the first token made for them),
listed with their runs' counts and last activity. Deleting one is ``RunStore.delete_runs``."""

from __future__ import annotations

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection

from .database import Database
from .tables import projects, runs


def ensure_project(conn: Connection, project: str, now: float) -> None:
    """A project exists from the first run registered in it (or the first token made for it)."""
    ins = Database.insert_for(conn)
    conn.execute(ins(projects).values(name=project, created_at=now).on_conflict_do_nothing())


class ProjectStore:
    def __init__(self, db: Database):
        self.db = db

    def list_projects(self, only: str | None = None) -> list[dict]:
        """Projects with their number of runs, of running runs, and the last activity of any run."""
        per = (
            select(
                runs.c.project,
                func.count().label("runs"),
                func.sum(case((runs.c.status == "running", 1), else_=0)).label("running"),
                func.max(runs.c.updated_at).label("last_activity"),
            )
            .group_by(runs.c.project)
            .subquery()
        )
        q = (
            select(projects.c.name, projects.c.created_at, per.c.runs, per.c.running, per.c.last_activity)
            .select_from(projects.outerjoin(per, per.c.project == projects.c.name))
            .order_by(projects.c.name)
        )
        if only is not None:
            q = q.where(projects.c.name == only)
        with self.db.read() as conn:
            return [{**dict(r), "runs": r.runs or 0, "running": r.running or 0} for r in conn.execute(q).mappings()]
