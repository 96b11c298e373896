"""The collector's parts, built once and wired together: what the API's dependencies hand out.

``Collector.start`` opens the database (applying migrations), syncs the configured webhook
endpoints and starts the two background threads (webhook delivery, crash reaping); ``close`` stops
them in the reverse order.
"""

from __future__ import annotations

from .alerting import AlertStore, DetectorRunner, Outbox, WebhookDispatcher, endpoints
from .alerting.detection import DetectorFactory
from .auth import Verifier
from .ingest import Ingestor
from .metrics import Metrics
from .settings import Settings
from .storage import Database, LatestValues, ProjectStore, RankStore, Reaper, RunStore, SeriesStore


class Collector:
    def __init__(self, settings: Settings, detectors: DetectorFactory | None = None):
        self.settings = settings
        self.db = Database(settings.db_url)
        self.runs = RunStore(self.db)
        self.projects = ProjectStore(self.db)
        self.series = SeriesStore(self.db, settings.max_series_per_run)
        # a batch rewrites last_seen at most this often, well inside the heartbeat timeout
        self.ranks = RankStore(self.db, seen_interval=min(5.0, settings.heartbeat_timeout / 4))
        self.alerts = AlertStore(self.db)
        self.outbox = Outbox(self.db)
        self.detection = DetectorRunner(self.db, self.series, detectors)
        self.ingestor = Ingestor(self.db, self.runs, self.series, self.ranks, self.detection, self.alerts)
        self.verifier = Verifier(self.db.engine)
        self.metrics = Metrics(LatestValues(self.db), settings.metrics_max_runs, settings.metrics_active_window)
        self.dispatcher = WebhookDispatcher(
            self.outbox,
            on_result=lambda ok: self.metrics.webhooks.labels("delivered" if ok else "failed").inc(),
            schedule=settings.webhook_schedule,
            allow_internal=settings.allow_internal_webhooks,
            run_url=settings.run_url,
        )
        self._started = False
        self.reaper = Reaper(
            self.ranks, settings.heartbeat_timeout, lambda: self.metrics.crashed.labels("heartbeat").inc()
        )

    def start(self) -> Collector:
        self._started = True
        endpoints.sync_config(
            self.db.engine, [endpoints.parse_spec(w) for w in self.settings.webhooks], self.settings.webhook_secrets
        )
        self.dispatcher.start()
        self.reaper.start()
        return self

    def close(self) -> None:
        if self._started:
            self.reaper.stop()
            self.dispatcher.stop()
        self.db.close()
