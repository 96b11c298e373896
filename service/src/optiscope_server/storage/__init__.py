"""Run history: one ``Database`` and the small stores composed around it.

``RunStore`` (runs), ``ProjectStore`` (projects), ``SeriesStore`` (series catalogs, chunk writes and reads, batch
idempotency keys), ``RankStore`` (rank liveness, finishing, crash reaping), ``LatestValues`` (what a
Prometheus scrape exports), the audit log, the chunk codec, the schema and its migrations.
"""

from .database import Database
from .errors import NotFound, Rejected
from .latest import LatestValues
from .projects import ProjectStore
from .ranks import RankStore, Reaper
from .runs import RunStore
from .series import SeriesStore

__all__ = [
    "Database",
    "LatestValues",
    "NotFound",
    "ProjectStore",
    "RankStore",
    "Reaper",
    "Rejected",
    "RunStore",
    "SeriesStore",
]
