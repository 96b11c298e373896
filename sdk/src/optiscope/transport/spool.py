"""The disk spool: every batch is appended here before it is sent, and released once the collector
has acknowledged it, so a collector that is down, or a training process that is killed, loses
nothing that reached the spool.

Layout: one directory per (run, rank) under the spool root, holding ``run.json`` (the run's
registration document), segment files ``<first seq>.seg`` and, once the run has ended,
``end.json`` (its final status). A segment is a sequence of frames::

    magic b"OSB1" | payload length (uint32, big-endian) | CRC-32 of the payload (uint32) | payload

and the payload is one encoded wire batch. The reader stops at the first frame whose magic,
length or checksum is wrong: a torn or corrupted tail costs the frames from there on, never the
frames before. A segment is deleted when every batch in it has been acknowledged; replaying a
spool re-sends whatever is left, and the collector's (run, rank, seq) idempotency drops the
batches it already has.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from . import rundoc
from .http import RETRYABLE, UNAUTHORIZED, Body, Transport, TransportError

MAGIC = b"OSB1"
HEADER = struct.Struct(">4sII")
SEGMENT_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024  # per run and rank

log = logging.getLogger("optiscope")


def default_root() -> Path:
    env = os.environ.get("OPTISCOPE_SPOOL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optiscope" / "spool"


def frame(payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_frames(path: Path) -> Iterator[bytes]:
    """Every intact frame of a segment, in order, up to the first damaged one."""
    try:
        data = path.read_bytes()
    except OSError:
        return
    pos = 0
    while pos + HEADER.size <= len(data):
        magic, length, crc = HEADER.unpack_from(data, pos)
        start, end = pos + HEADER.size, pos + HEADER.size + length
        if magic != MAGIC or end > len(data) or zlib.crc32(data[start:end]) != crc:
            return
        yield data[start:end]
        pos = end


# A spool holds a run's config, environment and values: readable by its owner only.
def _private_dir(path: Path) -> None:
    """``path`` and the folders made for it, owner-only (an existing folder is tightened too)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for p in (path, *missing):
        os.chmod(p, 0o700)


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _private_write(path: Path, data: bytes) -> None:
    with open(path, "wb", opener=_private_opener) as f:
        f.write(data)


class Spool:
    """The spool of one (run, rank). Used by the exporter thread only: no locking."""

    def __init__(self, root: Path, run_id: str, rank: int, run_doc: dict[str, Any], max_bytes: int = DEFAULT_MAX_BYTES):
        self.dir = Path(root) / f"{run_id}-{rank}"
        _private_dir(self.dir)
        self.lock = Lock(self.dir)
        self.lock.acquire()  # a replayer in another process leaves this spool alone while we live
        self.run_id, self.rank = run_id, rank
        self.set_doc(run_doc)
        self.max_bytes = max_bytes
        self._segment: Path | None = None
        self._segment_size = 0
        self._unacked: dict[Path, set[int]] = {}
        self._seg_of: dict[int, Path] = {}
        self.bytes = 0

    def set_doc(self, run_doc: dict[str, Any]) -> None:
        """Keep the run's registration document, the one a replay registers. Written to a temporary
        file and renamed: a process killed mid-write leaves the old document, never half of one."""
        tmp = self.dir / "run.json.tmp"
        _private_write(tmp, json.dumps({"run": self.run_id, "rank": self.rank, "doc": run_doc}).encode())
        os.replace(tmp, self.dir / "run.json")

    def append(self, seq: int, body: bytes) -> bool:
        """Durably record one batch before it is sent. False when the spool is full (the batch
        then lives in memory only; the caller counts it)."""
        data = frame(body)
        if self.bytes + len(data) > self.max_bytes:
            return False
        if self._segment is None or self._segment_size + len(data) > SEGMENT_BYTES:
            self._segment, self._segment_size = self.dir / f"{seq:020d}.seg", 0
            self._unacked[self._segment] = set()
        with open(self._segment, "ab", opener=_private_opener) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the point of a spool: it survives the process
        self._segment_size += len(data)
        self.bytes += len(data)
        self._unacked[self._segment].add(seq)
        self._seg_of[seq] = self._segment
        return True

    def release(self, seq: int) -> None:
        """The collector acknowledged (or finally refused) this batch."""
        seg = self._seg_of.pop(seq, None)
        if seg is None:
            return
        pending = self._unacked[seg]
        pending.discard(seq)
        if not pending and seg != self._segment:
            self._drop(seg)

    def _drop(self, seg: Path) -> None:
        self.bytes -= seg.stat().st_size if seg.exists() else 0
        seg.unlink(missing_ok=True)
        self._unacked.pop(seg, None)

    def close(self, status: str, delivered: bool) -> None:
        """At the end of the run: remove the spool when everything was delivered, else leave it
        with the run's final status for the next replay."""
        if self._segment is not None and not self._unacked.get(self._segment):
            self._drop(self._segment)
        if delivered and not any(self._unacked.values()):
            for p in self.dir.iterdir():
                p.unlink(missing_ok=True)
            self.dir.rmdir()
        else:
            _private_write(self.dir / "end.json", json.dumps({"status": status}).encode())
        self.lock.release()


def pending_spools(root: Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / "run.json").exists()) if root.is_dir() else []


class Lock:
    """An exclusive advisory lock on a spool directory, held by its writer for the run's life and
    taken by a replayer; the OS releases it when a process dies, so a killed run's spool is free."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: What the collector answers to a batch it will never accept, whoever sends it: the batch goes to
#: the quarantine folder (with one log line) instead of holding up the batches behind it.
MALFORMED = frozenset({400, 422})
QUARANTINE = "quarantine"


#: What replaying one spool came to:
#: ``done`` every batch acknowledged (or quarantined as malformed), the end of the run acknowledged,
#: the spool removed; ``busy`` its writer is alive; ``unreachable`` no answer, or one that asks to
#: retry (5xx, 429), kept for later; ``unauthorized`` 401 or 403, kept whole for a sender with the
#: right token; ``refused`` another refusal (the run is gone or belongs elsewhere, the body is too
#: large), kept whole for a person to look at.
Outcome = Literal["done", "busy", "unreachable", "unauthorized", "refused"]


def _verdict(status: int | None) -> Outcome | None:
    """None when the answer releases what was sent (2xx), else why the replay stops here."""
    if status is not None and 200 <= status < 300:
        return None
    if status is None or status in RETRYABLE or status >= 500:
        return "unreachable"
    return "unauthorized" if status in UNAUTHORIZED else "refused"


def replay(directory: Path, client: Transport) -> tuple[Outcome, int]:
    """Send what one spool directory holds; returns (outcome, batches acknowledged). Only an
    acknowledgement releases a batch: a segment is deleted once each of its batches was answered
    2xx, or was malformed and moved to the quarantine folder beside the spools."""
    directory = Path(directory)
    lock = Lock(directory)
    if not lock.acquire():
        return "busy", 0
    try:
        meta = json.loads((directory / "run.json").read_text())
        run_id = meta["run"]
        status, _ = rundoc.put_run(lambda m, p, b: _status(client, m, p, b), run_id, meta["doc"])
        stop = _verdict(status)
        if stop is not None:
            return stop, 0
        sent = 0
        for seg in sorted(directory.glob("*.seg")):
            stop, n = _replay_segment(directory, seg, run_id, client)
            sent += n
            if stop is not None:
                return stop, sent
            seg.unlink()
        end = directory / "end.json"
        # No end.json: the writer died before finish() (killed, out of memory): the run crashed.
        final = json.loads(end.read_text())["status"] if end.exists() else "crashed"
        status = _status(client, "POST", f"/api/v1/runs/{run_id}/finish", {"status": final, "rank": meta["rank"]})
        stop = _verdict(status)
        if stop is not None:
            return stop, sent
        for p in directory.iterdir():
            if p.name != "lock":
                p.unlink(missing_ok=True)
        (directory / "lock").unlink(missing_ok=True)
        directory.rmdir()
        return "done", sent
    finally:
        lock.release()


def _replay_segment(directory: Path, seg: Path, run_id: str, client: Transport) -> tuple[Outcome | None, int]:
    """Send one segment's batches; (why it stopped or None when every batch is settled, batches
    acknowledged)."""
    sent = 0
    for i, body in enumerate(read_frames(seg)):
        status = _status(client, "POST", f"/api/v1/runs/{run_id}/batches", body)
        if status in MALFORMED:
            _quarantine(directory, seg, i, body, status)
            continue
        stop = _verdict(status)
        if stop is not None:
            return stop, sent
        sent += 1
    return None, sent


def _quarantine(directory: Path, seg: Path, index: int, body: bytes, status: int | None) -> None:
    """Keep a batch the collector will never accept, out of the way of the ones it will."""
    folder = directory.parent / QUARANTINE / directory.name
    _private_dir(folder)
    path = folder / f"{seg.stem}-{index}.batch"
    _private_write(path, body)
    log.warning("optiscope: the collector refused a spooled batch as malformed (HTTP %s); kept at %s", status, path)


def _status(client: Transport, method: str, path: str, body: Body) -> int | None:
    try:
        return client.request(method, path, body)[0]
    except TransportError:
        return None
