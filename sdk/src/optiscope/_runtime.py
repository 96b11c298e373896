"""What a ``Run`` (``run.py``) is made of: its registration document, with this rank's environment
fingerprint, and its transport (spool, exporter, processor), both built at ``init()``; and the
cleaning of the values ``Run.log`` records. ``run.py`` is about the run's life; this is about its parts.

Each function that may warn takes the run's ``warn`` (``Run._warn_once``), so a problem is logged
once per run, whichever part found it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import wire
from .transport import rundoc
from .transport.batches import BatchWriter
from .transport.collector import CollectorExporter
from .transport.exporters import SpoolExporter
from .transport.http import HttpClient
from .transport.processor import BatchProcessor

#: ``init()`` options that bound the processor (queue, batches) and the collector exporter.
PROCESSOR_OPTIONS = ("max_queue", "max_batch_records", "flush_interval")
COLLECTOR_OPTIONS = ("max_pending_batches", "backoff_max", "heartbeat_interval")

#: ``Run._warn_once``: (key, message, *args, exc_info=False), logged once per key.
Warn = Callable[..., None]


def registration_doc(
    project: str,
    name: str,
    rank: int,
    config: dict[str, Any],
    pid: int,
    tags: Iterable[str] | None,
    warn: Warn,
) -> dict[str, Any]:
    """The run's registration, without the environment (the caller adds it, see ``environment``)."""
    doc: dict[str, Any] = {
        "project": project,
        "name": name,
        "rank": rank,
        "config": json.loads(json.dumps(config, default=str)),
        "host": socket.gethostname(),
        "pid": pid,
    }
    kept, dropped = rundoc.clean_tags(tags)
    if dropped:
        warn(
            "tags",
            "%d tags dropped (e.g. %r): a tag is 1-100 of letters, digits and _.:/=+- "
            "(not starting with a symbol other than _), at most %d per run",
            len(dropped),
            dropped[0],
            wire.MAX_TAGS,
        )
    if kept:
        doc["tags"] = kept
    return doc


def environment(extra: Mapping[str, Any], warn: Warn, earlier: dict | None = None) -> dict:
    """This rank's fingerprint with the user's entries on top, within the collector's bound."""
    from .probe.environment import fingerprint  # stdlib only: torch is read, never imported

    env = fingerprint(earlier)
    try:
        env, cut = rundoc.bound_environment({**env, **extra})
    except Exception:  # e.g. a circular structure among the user's entries: keep the fingerprint
        warn(
            "environment_extra",
            "the environment entries given to init() cannot be sent as JSON; they are left out",
            exc_info=True,
        )
        env, cut = rundoc.bound_environment(env)
    if cut:
        warn(
            "environment_size",
            "the environment is over %d bytes as JSON; left out: %s",
            wire.MAX_ENVIRONMENT_BYTES,
            ", ".join(map(str, cut))[:200],
        )
    return env


def start_transport(
    run_id: str,
    rank: int,
    doc: dict[str, Any],
    url: str,
    token: str | None,
    offline: bool,
    observe: Callable[[Any], None] | None,
    options: dict[str, Any],
    warn: Warn,
) -> tuple[SpoolExporter | CollectorExporter, BatchProcessor]:
    """The spool, the exporter (the collector's, or the spool's alone when offline) and the
    processor that feeds it; ``options`` are init()'s bounds, ``observe`` sees every batch of records
    on the exporter thread (the in-process detectors)."""
    options = dict(options)
    spool_opt = options.pop("spool", True)
    spool_root = options.pop("spool_dir", None)
    spool_max = options.pop("spool_max_bytes", None)
    unknown = sorted(set(options) - set(PROCESSOR_OPTIONS) - set(COLLECTOR_OPTIONS))
    if unknown:
        raise TypeError(f"init() got an unexpected keyword argument {unknown[0]!r}")
    # Checked before anything is written: a malformed URL must not leave a spool behind, which the
    # next run would replay as an empty crashed run.
    client = None if offline else HttpClient(url, token)
    spool = root = None
    if spool_opt:
        from .transport.spool import DEFAULT_MAX_BYTES, Spool, default_root

        root = spool_root or default_root()
        try:
            spool = Spool(root, run_id, rank, doc, max_bytes=spool_max or DEFAULT_MAX_BYTES)
        except OSError:
            warn("spool", "cannot create the spool under %s; batches are kept in memory only", root, exc_info=True)
    writer = BatchWriter(run_id, rank, doc, spool=spool)
    collector = {k: options[k] for k in COLLECTOR_OPTIONS if k in options}
    # offline: the collector's bounds have nothing to bound; they are accepted all the same
    exporter: SpoolExporter | CollectorExporter = (
        SpoolExporter(writer) if client is None else CollectorExporter(client, writer, replay_root=root, **collector)
    )
    processor = BatchProcessor(
        exporter,
        writer.counters,
        observe=observe,
        **{k: options[k] for k in PROCESSOR_OPTIONS if k in options},
    )
    return exporter, processor


def clean_values(values: Mapping[str, Any], warn: Warn) -> dict[str, Any]:
    """The values of one ``Run.log`` call that can be recorded: 0-d tensors detached (read later,
    on the exporter thread: no host sync here), numbers as floats; the others are warned of once."""
    clean: dict[str, Any] = {}
    for k, v in values.items():
        if not wire.valid_name(k):
            warn(f"name:{k}", "series name %r is invalid and is not recorded", k)
        elif hasattr(v, "detach"):
            if v.numel() != 1:
                warn(f"shape:{k}", "%r is not a scalar and is not recorded", k)
                continue
            clean[k] = v.detach().reshape(())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            clean[k] = float(v)
        elif hasattr(v, "item"):  # numpy scalars
            clean[k] = float(v.item())
        else:
            warn(f"type:{k}", "%r has type %s, not a number; not recorded", k, type(v).__name__)
    return clean
