"""How records leave the training process.

A ``BatchProcessor`` (bounded queue, one worker thread, deadline-bounded close, fork handling)
batches records (``Record``) into points and hands them to an ``Exporter``: ``CollectorExporter`` (HTTP,
with retry, heartbeats and the disk spool), ``SpoolExporter`` (offline) or ``InMemoryExporter``
(tests). HTTP goes through a ``Transport``; every failure to reach the collector is a ``TransportError``.
"""

from .batches import BatchWriter, EncodedBatch
from .collector import DEFAULT_HEARTBEAT_INTERVAL, CollectorExporter
from .exporters import Exporter, InMemoryExporter, SpoolExporter
from .http import RETRYABLE, HttpClient, Transport, TransportError
from .processor import BatchProcessor
from .record import COUNTER_NAMES, Point, Record, new_counters
from .session import CollectorSession

__all__ = [
    "COUNTER_NAMES",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "RETRYABLE",
    "BatchProcessor",
    "BatchWriter",
    "CollectorExporter",
    "CollectorSession",
    "EncodedBatch",
    "Exporter",
    "HttpClient",
    "InMemoryExporter",
    "Point",
    "Record",
    "SpoolExporter",
    "Transport",
    "TransportError",
    "new_counters",
]
