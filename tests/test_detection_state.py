"""The collector's detectors are streaming state held in memory; the store is the truth. A collector
that restarts mid-run, and replicas that each receive only some of a run's batches, must raise
exactly the alerts one collector that saw every batch raises."""

from __future__ import annotations

import numpy as np
import pytest

from optiscope import wire
from optiscope_server.collector import Collector
from optiscope_server.settings import Settings

STEPS, PER_BATCH = 900, 25


def _batches(rank: int = 0, seed: int = 0) -> list[wire.Columns]:
    """A run that learns, then (from step 500) loses its progress for good; loss and gradient norm
    in separate records, as the SDK sends them (probe record, then the user's loss)."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS)
    loss = 2 * np.exp(-t / 60) + 0.1 + 0.02 * rng.standard_normal(STEPS)
    loss[500:] += np.linspace(0, 3, STEPS - 500)
    gn = 1 + 0.1 * rng.standard_normal(STEPS)
    gn[500:] *= np.linspace(1, 6, STEPS - 500)
    out = []
    for seq, lo in enumerate(range(0, STEPS, PER_BATCH)):
        records = []
        for s in range(lo, lo + PER_BATCH):
            records.append((s, 0.0, {"lr": 1e-3, "grad_norm": float(gn[s])}))
            records.append((s, 0.0, {"loss": float(loss[s])}))
        out.append(wire.decode_columns(wire.encode_batch(wire.Batch("run1", rank, seq, records))))
    return out


class Store:
    """One collector process's store and detectors (no HTTP, no background threads)."""

    def __init__(self, url: str):
        self.c = Collector(Settings(db_url=url))
        self.ingest = self.c.ingestor.ingest
        self.upsert_run, self.delete_runs = self.c.runs.upsert_run, self.c.runs.delete_runs
        self.list_alerts, self.close = self.c.alerts.list_alerts, self.c.close


def _alerts(store: Store) -> list[tuple]:
    return sorted((a["rule"], a["rank"], a["step"], a["state"]) for a in store.list_alerts("run1"))


def _store(url: str) -> Store:
    s = Store(url)
    s.upsert_run("run1", "p", "n", {"lr": 1e-3}, None)
    s.upsert_run("run1", "p", "n", {"lr": 1e-3}, None, rank=1)
    return s


@pytest.fixture
def fresh(db_url):
    made: list[Store] = []

    def make() -> Store:
        made.append(_store(db_url))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_reference_stream_pages(fresh):
    """The stream used below does page (else the comparisons would prove nothing)."""
    store = fresh()
    for b in _batches():
        store.ingest(b)
    got = _alerts(store)
    assert any(rule == "early_divergence" and 480 <= step <= 560 for rule, _, step, _ in got), got


def test_a_restarted_collector_raises_exactly_the_alerts_of_one_that_never_stopped(db_url, tmp_path, fresh):
    reference = Store(f"sqlite:///{tmp_path / 'reference.db'}")
    reference.upsert_run("run1", "p", "n", {"lr": 1e-3}, None)
    for b in _batches():
        reference.ingest(b)
    want = _alerts(reference)
    reference.close()
    assert want
    batches = _batches()
    for cut in (8, 21):  # during the baseline's first windows, and just before the divergence
        first = fresh()
        first.delete_runs("run1", force=True)  # the previous cut's run
        first.upsert_run("run1", "p", "n", {"lr": 1e-3}, None)
        for b in batches[:cut]:
            first.ingest(b)
        first.close()
        second = fresh()  # a new process: no detector state in memory
        for b in batches[cut:]:
            second.ingest(b)
        assert _alerts(second) == want, cut


def test_replicas_that_each_see_some_batches_raise_the_alerts_once(fresh):
    a, b = fresh(), fresh()
    ranks = {0: _batches(rank=0, seed=0), 1: _batches(rank=1, seed=1)}
    for i in range(len(ranks[0])):
        for rank in (0, 1):
            (a if (i + rank) % 3 else b).ingest(ranks[rank][i])  # uneven, interleaved
    got = _alerts(a)
    one = fresh()
    one.delete_runs("run1", force=True)
    one.upsert_run("run1", "p", "n", {"lr": 1e-3}, None)
    one.upsert_run("run1", "p", "n", {"lr": 1e-3}, None, rank=1)
    for i in range(len(ranks[0])):
        for rank in (0, 1):
            one.ingest(ranks[rank][i])
    assert got == _alerts(one) and {r for _, r, _, _ in got} == {0, 1}
