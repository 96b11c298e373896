"""``optiscope.init`` and the ``Run``: the one object a training script holds.

After ``init()`` returns, nothing here raises into the training loop: errors are logged once and
the run goes on unobserved rather than crashing the job.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import _runtime, wire
from ._runtime import COLLECTOR_OPTIONS as COLLECTOR_OPTIONS
from ._runtime import PROCESSOR_OPTIONS as PROCESSOR_OPTIONS
from .transport.record import Record, WarnOnce

log = logging.getLogger("optiscope")

DEFAULT_URL = "http://127.0.0.1:8737"
DEFAULT_PROJECT = "default"
FINISH_TIMEOUT = 10.0
#: Default sampling period of the full optimizer statistics (see bench/overhead.py and the README).
DEFAULT_EVERY = 100


def new_run_id() -> str:
    """Time-ordered, collision-resistant id made on the client, so ``run.id`` is known at once
    even when the collector is not reachable yet: 12 hex digits of milliseconds + 10 random."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


class Run:
    def __init__(
        self,
        project: str,
        name: str | None,
        url: str,
        token: str | None,
        config: Mapping[str, Any] | None,
        rank: int = 0,
        run_id: str | None = None,
        tags: Iterable[str] | None = None,
        environment: bool | Mapping[str, Any] = True,
        detect: bool = False,
        offline: bool = False,
        **exporter_options,
    ):
        self.id = run_id or new_run_id()
        self.project, self.url, self.rank = project, url.rstrip("/"), rank
        self.name = name or f"run-{self.id[-6:]}"
        self.config = dict(config or {})
        self._pid = os.getpid()  # a forked child (DataLoader worker) must not send for the parent
        self._probes: list = []
        self._closers: list = []
        self._auto_step = 0
        self._finished = False
        self._warn_once = WarnOnce()  # one line per kind of trouble, never one per step
        doc = _runtime.registration_doc(project, self.name, rank, self.config, self._pid, tags, self._warn_once)
        self._env_extra = dict(environment) if isinstance(environment, Mapping) else {}
        self._env_on = environment is not False
        if self._env_on:
            doc["environment"] = self._environment()
        self._doc = doc
        #: with ``detect``: every alert transition the in-process detectors saw (firing, resolved)
        self.alerts: list = []
        self._detectors = None
        if detect:
            from .detect import default_detectors  # numpy: only when asked

            self._detectors = default_detectors(self.config)
        self._exporter, self._processor = _runtime.start_transport(
            self.id,
            rank,
            self._doc,
            self.url,
            token,
            offline,
            self._detect if detect else None,
            exporter_options,
            self._warn_once,
        )
        atexit.register(self._atexit)

    @property
    def api_url(self) -> str:
        """The run's URL in the REST API."""
        return f"{self.url}/api/v1/runs/{self.id}"

    @property
    def counters(self) -> dict[str, int]:
        """Delivery counters: sent_batches, sent_points, dropped, retries, rejected_batches, bad_values,
        spooled_batches, spool_full, replayed_batches, split_batches, heartbeats."""
        return dict(self._processor.counters)

    def _active(self) -> bool:
        return not self._finished and os.getpid() == self._pid

    def _environment(self, earlier: dict | None = None) -> dict:
        """This rank's fingerprint with the user's entries on top, within the collector's bound."""
        return _runtime.environment(self._env_extra, self._warn_once, earlier)

    def _refresh_environment(self) -> None:
        # The model usually reaches the GPU between init() and watch(), and the fingerprint names
        # devices only once CUDA is up (it never brings CUDA up itself): take it again, register again.
        from .probe.environment import devices_pending

        if self._env_on and devices_pending(self._doc.get("environment")):
            self._doc = {**self._doc, "environment": self._environment(self._doc.get("environment"))}
            self._exporter.update_run_doc(self._doc)
            self._processor.wake()

    # -- public ------------------------------------------------------------------------------
    def watch(
        self,
        optimizer,
        model=None,
        every: int = DEFAULT_EVERY,
        activations=True,
        scaler=None,
        start_step: int | None = None,
        vitals: bool = True,
    ) -> Run:
        """Attach to a ``torch.optim.Optimizer`` through its step hooks; full statistics on one
        optimizer step in ``every``.

        ``model`` names the per-tensor series (``model.named_parameters()``) and, unless
        ``activations`` is False, gets forward hooks for activation headroom: on every leaf module
        by default, or on the modules named in ``activations`` (a list of names from
        ``model.named_modules()``). ``scaler``: a ``torch.amp.GradScaler`` whose loss scale and
        skipped steps to record. ``start_step``: the index of the next optimizer step; by default
        the step count kept in the optimizer's state (so a run resumed from a checkpoint goes on
        numbering where it stopped), or 0 for a fresh optimizer. ``vitals`` (default on): also on
        the steps that are not sampled, the gradient norm before clipping and the headroom of
        float16/float8 activations, which the divergence detectors need on every step.
        """
        try:
            self._attach(optimizer, model, every, activations, scaler, start_step, vitals)
        except Exception:
            self._warn_once("watch", "could not attach to the optimizer; training continues unobserved", exc_info=True)
        try:
            self._refresh_environment()
        except Exception:
            self._warn_once("refresh", "could not update the environment fingerprint", exc_info=True)
        return self

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Record values (Python numbers or 0-d tensors) at ``step``; never waits, never raises.

        Without ``step``: the index of the last completed optimizer step when an optimizer is
        watched (so log after ``optimizer.step()``), otherwise a counter of ``log`` calls.
        Tensors are detached and read on the exporter thread, so this call forces no host sync.
        """
        if not self._active():
            return
        try:
            if step is None:
                if self._probes:
                    step = max(0, self._probes[0].steps - 1)
                else:
                    step = self._auto_step
                    self._auto_step += 1
            clean = _runtime.clean_values(values, self._warn_once)
            if clean:
                self._processor.submit(Record(int(step), time.time(), clean))
        except Exception:
            self._warn_once("log", "log() failed; the value is not recorded", exc_info=True)

    def finish(self, timeout: float = FINISH_TIMEOUT, status: str = "finished") -> bool:
        """Flush and close, waiting at most ``timeout`` seconds; True if everything was delivered."""
        if not self._active():
            return True
        self._finished = True
        atexit.unregister(self._atexit)  # a process that makes many runs keeps none of them alive
        try:
            for p in self._probes:
                p.close()
            for close in self._closers:
                close()
            return self._processor.close(timeout, status)
        except Exception:
            self._warn_once("finish", "finish() failed", exc_info=True)
            return False

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(status="crashed" if exc_type is not None else "finished")

    def declare(self, change: str, step: int | None = None) -> None:
        """Declare a planned change at ``step`` (default: as ``log``), so that what follows is read as
        expected rather than as an incident: ``"data"`` (a data-mixture switch: the loss rules take
        a new baseline after a grace period) or ``"schedule"`` (an intended LR change: the LR now in
        use becomes the declared reference). Travels as the series ``declare/<change>_change``, so
        the collector's detectors see it, and it stays in the run's history."""
        if change not in wire.DECLARE_KINDS:
            raise ValueError(f"optiscope: declare() takes 'data' or 'schedule', not {change!r}")
        self.log({wire.declare_series(change): 1.0}, step=step)

    # -- internal ----------------------------------------------------------------------------
    def _attach(self, optimizer, model, every: int, activations, scaler, start_step: int | None, vitals: bool) -> None:
        """``watch``'s probes: the optimizer's, and on it the model's activations and the scaler's."""
        from .probe.activations import ActivationProbe  # imports torch: only here
        from .probe.optimizer import OptimizerProbe

        names = {id(p): n for n, p in model.named_parameters()} if model is not None else None
        # OPTISCOPE_FUSED=0: never compile the fused statistics kernels (eager blocks only)
        probe = OptimizerProbe(
            optimizer,
            self._emit,
            every=every,
            names=names,
            start_step=start_step,
            fused=os.environ.get("OPTISCOPE_FUSED", "1") != "0",
            vitals=vitals,
        )
        self._probes.append(probe)
        if model is not None and activations is not False:
            act = ActivationProbe(
                model,
                probe.sampling_next,
                modules=None if activations is True else list(activations),
                native=probe.native,
                vitals=vitals,
            )
            probe.contributors.append(act)
            self._closers.append(act.close)
        if scaler is not None:
            from .probe.amp import ScalerProbe

            amp = ScalerProbe(scaler, probe)
            probe.contributors.append(amp)
            self._closers.append(amp.close)

    def _detect(self, records) -> None:
        """On the exporter thread: the same detectors as the collector's, over the same records."""
        for step, _, values in records:
            for d in self._detectors or ():
                for ev in d.update(step, values, self.rank):
                    self.alerts.append(ev)
                    if ev.state == "firing" and ev.severity == "page":
                        log.warning("optiscope: ALERT %s: %s", ev.rule, ev.message)

    def _emit(self, step: int, values: dict, vector) -> None:
        if self._active():
            self._processor.submit(Record(step, time.time(), values, vector))

    def _atexit(self) -> None:
        if self._active():
            # An uncaught exception ended the interpreter: Python has set sys.last_type by now.
            crashed = getattr(sys, "last_type", None) is not None
            self.finish(timeout=FINISH_TIMEOUT, status="crashed" if crashed else "finished")


def _resolve(
    project: str | None, url: str | None, token: str | None, run_id: str | None, rank: int | None
) -> tuple[str, str, str | None, str | None, int]:
    """``init()``'s arguments that fall back to the environment, resolved and checked:
    (project, url, token, run_id, rank)."""
    project = project or os.environ.get("OPTISCOPE_PROJECT") or DEFAULT_PROJECT
    run_id = run_id or os.environ.get("OPTISCOPE_RUN_ID") or None
    if run_id is not None and not wire.RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"optiscope: invalid run id {run_id!r} (letters, digits, _ and -, at most 64)")
    if rank is None:
        try:
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            rank = 0
    if not 0 <= rank <= wire.MAX_RANK:  # the collector refuses the registration of any other
        raise ValueError(f"optiscope: rank must be from 0 to {wire.MAX_RANK}, got {rank}")
    url = url or os.environ.get("OPTISCOPE_URL") or DEFAULT_URL
    token = token or os.environ.get("OPTISCOPE_TOKEN") or None
    if not wire.valid_name(project):
        raise ValueError(f"optiscope: invalid project name {project!r}")
    return project, url, token, run_id, rank


def init(
    project: str | None = None,
    name: str | None = None,
    url: str | None = None,
    token: str | None = None,
    config: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    rank: int | None = None,
    tags: Iterable[str] | None = None,
    environment: bool | Mapping[str, Any] = True,
    detect: bool = False,
    offline: bool = False,
    **options,
) -> Run:
    """Start a run. ``url``, ``token`` and ``project`` fall back to ``OPTISCOPE_URL``,
    ``OPTISCOPE_TOKEN`` and ``OPTISCOPE_PROJECT``; the collector need not be reachable yet.

    The processes of one data-parallel training report to one run, each as its rank: ``run_id``
    (or ``OPTISCOPE_RUN_ID``, set once by the launcher for every process) names the shared run,
    and ``rank`` falls back to ``RANK`` (which torchrun sets), then 0. Without a run id every call
    starts a new run.

    ``tags``: strings of ``wire.TAG_RE`` (at most ``wire.MAX_TAGS``); others are dropped with one
    log line. ``environment``: True sends this rank's fingerprint (``probe.environment``) with the
    registration, False sends none, a dict adds its entries on top of the fingerprint.
    ``detect``: also run the collector's detectors in this process, on the exporter thread; their
    transitions collect in ``run.alerts`` and a page is logged. ``offline``: send nothing (batches
    go to the spool, for ``optiscope sync``, unless ``spool=False``).
    ``heartbeat_interval`` (seconds, default 30, None for none) and the other options are the
    transport's bounds (``transport.processor.BatchProcessor``, ``transport.collector.CollectorExporter``)."""
    project, url, token, run_id, rank = _resolve(project, url, token, run_id, rank)
    if not isinstance(environment, (bool, Mapping)):
        raise ValueError(f"optiscope: environment must be True, False or a dict, got {type(environment).__name__}")
    if tags is not None and not isinstance(tags, (str, Iterable)):
        raise ValueError(f"optiscope: tags must be strings, got {type(tags).__name__}")
    heartbeat = options.get("heartbeat_interval")
    if heartbeat is not None and not heartbeat > 0:
        raise ValueError(f"optiscope: heartbeat_interval must be > 0 seconds or None, got {heartbeat!r}")
    return Run(
        project,
        name,
        url,
        token,
        config,
        rank=rank,
        run_id=run_id,
        tags=tags,
        environment=environment,
        detect=detect,
        offline=offline,
        **options,
    )
