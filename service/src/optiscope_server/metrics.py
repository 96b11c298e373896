"""Prometheus exposition: the latest value of each canonical series for active runs, the SDK's own
counters per rank, plus the collector's own counters. Label sets are bounded: at most ``max_runs``
runs are exported, only the canonical series of the wire catalog (one gauge family each), and the
SDK counters of at most ``LatestValues.RANK_WINDOW_MAX`` ranks per run (one gauge family each)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily

from optiscope import wire
from optiscope.wire import CATALOG, EXPORTED_SERIES, SDK_COUNTERS

from .storage import LatestValues

RUN_LABELS = ("project", "run_id", "run_name")
RANK_LABELS = (*RUN_LABELS, "rank")
#: The series sdk/<counter> each batch carries, exported as optiscope_run_sdk_<counter>.
SDK_SERIES = {wire.sdk_series(c): f"optiscope_run_sdk_{c}" for c in SDK_COUNTERS}

# The *_created samples double every counter in the exposition and no dashboard or rule uses them.
disable_created_metrics()


class RunSeriesCollector:
    """Reads the store on each scrape, so every collector replica exports the same values."""

    def __init__(self, store: LatestValues, max_runs: int, active_window: float):
        self.store, self.max_runs, self.active_window = store, max_runs, active_window

    def collect(self):
        rows = self.store.active_runs_latest(
            time.time() - self.active_window, self.max_runs, EXPORTED_SERIES, per_rank=SDK_SERIES
        )
        fams = {
            n: GaugeMetricFamily(
                f"optiscope_run_{n}", f"Latest {n} of the run: {CATALOG[n].formula}", labels=RUN_LABELS
            )
            for n in EXPORTED_SERIES
        }
        step = GaugeMetricFamily("optiscope_run_step", "Latest step stored for the run", labels=RUN_LABELS)
        seen = GaugeMetricFamily(
            "optiscope_run_last_ingest_timestamp_seconds",
            "Unix time of the run's last ingest or state change",
            labels=RUN_LABELS,
        )
        firing = GaugeMetricFamily(
            "optiscope_run_alerts_firing", "optiscope alerts firing for the run", labels=RUN_LABELS
        )
        # Cumulative per SDK process, so one series per rank: a sum or max over ranks would fall
        # whenever a rank left the export, and increase() would read that as a counter reset.
        sdk = {
            n: GaugeMetricFamily(
                m,
                f"Latest {n} the rank's SDK reported (its exporter's cumulative counter when the batch was made)",
                labels=RANK_LABELS,
            )
            for n, m in SDK_SERIES.items()
        }
        for r in rows:
            labels = [r["project"], r["run_id"], r["name"]]
            for n, v in r["values"].items():
                fams[n].add_metric(labels, v)  # NaN and +-Inf are exposed as such
            if r["step"] is not None:
                step.add_metric(labels, r["step"])
            seen.add_metric(labels, r["updated_at"])
            firing.add_metric(labels, r["firing"])
            for n, per_rank in r["ranks"].items():
                for rank, v in sorted(per_rank.items()):
                    sdk[n].add_metric([*labels, str(rank)], v)
        active = GaugeMetricFamily("optiscope_runs_active", "Runs exported by this scrape")
        active.add_metric([], len(rows))
        yield from fams.values()
        yield from (step, seen, firing)
        yield from sdk.values()
        yield active


class Metrics:
    def __init__(self, store: LatestValues, max_runs: int = 200, active_window: float = 300.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.batches = Counter("optiscope_ingest_batches", "Batches received, by outcome", ["outcome"], registry=r)
        self.points = Counter("optiscope_ingest_points", "Points stored", registry=r)
        self.rejections = Counter("optiscope_ingest_rejections", "Rejected requests, by reason", ["reason"], registry=r)
        self.alerts = Counter("optiscope_alerts_fired", "Alerts fired, by rule", ["rule"], registry=r)
        self.webhooks = Counter(
            "optiscope_webhook_deliveries", "Webhook delivery attempts, by outcome", ["outcome"], registry=r
        )
        self.crashed = Counter(
            "optiscope_runs_crashed",
            "Ranks marked crashed, by reason (reported by the SDK, or heartbeat: silent longer than the timeout)",
            ["reason"],
            registry=r,
        )
        r.register(RunSeriesCollector(store, max_runs, active_window))
