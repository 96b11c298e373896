"""The versioned wire format shared by the SDK and the collector, and the one table of series names.

Two versions, told apart by the first bytes of the body (documented in the README, "Wire format"):

- **Version 2** (what the SDK sends): binary and columnar. The batch's steps and times travel once;
  each series is one name, an optional presence mask over the batch's records, and its float64
  values. Decoding costs a few operations per *series*, not per point, which is what lets one
  collector ingest a million points a second; float64 bytes carry NaN and +-Inf exactly.
- **Version 1**: one JSON document per batch::

    {"v": 1, "run": "<run id>", "rank": 0, "seq": 17,
     "records": [[step, unix_time, {"loss": 2.31, "grad_norm": "NaN"}], ...]}

  Values are JSON numbers; the three non-finite values travel as the strings ``"NaN"``,
  ``"Infinity"`` and ``"-Infinity"`` because strict JSON has no token for them (the decoder also
  accepts Python's bare ``NaN``/``Infinity`` tokens). The collector still accepts it.

``(run, rank, seq)`` is the batch's idempotency key: the collector stores a key once and
acknowledges a repeat without storing it again. Non-finite values are data: they are never turned
into null or dropped.

This module imports only the standard library: both sides depend on it.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

WIRE_VERSION = 2  # what encode_batch writes; decode_batch reads versions 1 and 2

#: Bounds a sender must respect and a receiver enforces (documented in the README).
MAX_NAME_LEN = 200
MAX_RECORDS_PER_BATCH = 10_000
MAX_VALUES_PER_RECORD = 4_096  # version 1
MAX_SERIES_PER_BATCH = 10_000  # version 2
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,199}$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_RANK = 2**31 - 1  # ranks are signed 32-bit integers in the store
#: The run registration's metadata: each tag must match TAG_RE (whole), at most MAX_TAGS per run; each
#: rank's environment fingerprint is kept to MAX_ENVIRONMENT_BYTES as ``json.dumps`` writes it (ASCII,
#: default separators: an upper bound of its compact UTF-8 size too).
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/=+\-]{0,99}")
MAX_TAGS = 50
MAX_ENVIRONMENT_BYTES = 16 * 1024
#: The exporter counters every batch carries as the series sdk/<counter> (see the catalog).
SDK_COUNTERS = ("sent_points", "dropped", "retries", "spooled_batches", "spool_full", "rejected_batches")
#: The planned changes a run can declare (``Run.declare``), each sent as the series declare/<kind>_change.
DECLARE_KINDS = ("data", "schedule")


def sdk_series(counter: str) -> str:
    """The series an exporter counter travels as: ``sdk/<counter>``."""
    return f"sdk/{counter}"


def declare_series(kind: str) -> str:
    """The series a declared change travels as: ``declare/<kind>_change`` (value 1 at its step)."""
    return f"declare/{kind}_change"


#: The series of every SDK counter, in SDK_COUNTERS order.
SDK_SERIES = tuple(sdk_series(c) for c in SDK_COUNTERS)
#: A declared data-mixture switch and a declared (intended) learning-rate change.
DECLARE_DATA = declare_series("data")
DECLARE_SCHEDULE = declare_series("schedule")


@dataclass(frozen=True)
class SeriesSpec:
    """One series (or family, with ``{i}`` for a param group or ``{name}`` for a parameter): the
    single definition both sides and the README's catalog use."""

    name: str
    scope: str
    formula: str
    unit: str
    when: str
    exported: bool = False  # exposed on /metrics as optiscope_run_<name> (global series only)


_S = "sampled steps"
_ADAM = "Adam, AdamW"
_U = "u = m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t), t the optimizer's own step"

#: Every series the SDK emits. Order is the README's.
CATALOG: dict[str, SeriesSpec] = {
    s.name: s
    for s in (
        SeriesSpec("loss", "global", "the loss value the user logs", "as logged", "when logged", True),
        SeriesSpec("lr", "param group 0", "optimizer.param_groups[0]['lr']", "1", "every step", True),
        SeriesSpec("lr/group/{i}", "param group i >= 1", "optimizer.param_groups[i]['lr']", "1", "every step"),
        SeriesSpec(
            "step_time",
            "global",
            "host wall time between the ends of two consecutive optimizer steps",
            "s",
            "every step after the first",
            True,
        ),
        SeriesSpec(
            "loss_scale", "global (GradScaler watched)", "the GradScaler's scale at the step", "1", "every step", True
        ),
        SeriesSpec(
            "skipped_steps",
            "global (GradScaler watched)",
            "iterations whose optimizer step GradScaler skipped (non-finite gradients), cumulative",
            "count",
            "every step",
            True,
        ),
        SeriesSpec(
            "grad_norm",
            "global",
            "sqrt(sum over parameters of ||g||^2), gradients before any clipping "
            "(with vitals off, missing on the one sampled step where clipping first appears after sampled "
            "steps without it)",
            "1",
            "every step (sampled steps only with vitals off)",
            True,
        ),
        SeriesSpec(
            "grad_norm_clipped",
            "global",
            "the same norm of the gradients the optimizer steps with (after clipping; equal to grad_norm "
            "when nothing clips)",
            "1",
            _S,
            True,
        ),
        SeriesSpec(
            "grad_nonfinite_tensors",
            "global",
            "number of parameter tensors whose gradient holds NaN or +-Inf",
            "count",
            _S,
            True,
        ),
        SeriesSpec("param_norm", "global", "sqrt(sum over parameters of ||theta||^2) after the step", "1", _S, True),
        SeriesSpec("update_norm", "global", "||theta_after - theta_before||_2 over all parameters", "1", _S, True),
        SeriesSpec("update_ratio", "global", "update_norm / param_norm before the step", "1", _S, True),
        SeriesSpec(
            "update_cosine",
            "global",
            "cos(theta_after - theta_before, -g), g the gradient the optimizer steps with",
            "1",
            _S,
            True,
        ),
        SeriesSpec(
            "exp_avg_norm", "global (Adam family)", "||m||_2 of Adam's first moment after the step", "1", _S, True
        ),
        SeriesSpec(
            "exp_avg_sq_norm", "global (Adam family)", "||v||_2 of Adam's second moment after the step", "1", _S, True
        ),
        SeriesSpec(
            "update_rms",
            _ADAM,
            f"sqrt(mean of u^2) over all coordinates; {_U} (v = max_exp_avg_sq with amsgrad)",
            "1",
            _S,
            True,
        ),
        SeriesSpec("update_bimodality", _ADAM, "share of coordinates with |u| > 0.9", "1", _S, True),
        SeriesSpec(
            "v_underestimation",
            _ADAM,
            "sqrt(mean of g^2 / max(v_hat_{t-1}, eps^2)), before the step, over tensors that have a "
            "v_hat_{t-1} (absent on the first step)",
            "1",
            _S,
            True,
        ),
        SeriesSpec(
            "eps_headroom",
            _ADAM,
            "log10(median(sqrt(v_hat)) / eps); the median of a uniform strided sample of about 16,384 "
            "coordinates (one stride over all tensors)",
            "decades",
            _S,
            True,
        ),
        SeriesSpec("bias_correction1", _ADAM, "1 - beta1^t of the first parameter of param group 0", "1", _S),
        SeriesSpec("bias_correction2", _ADAM, "1 - beta2^t of the first parameter of param group 0", "1", _S),
        SeriesSpec(
            "act_headroom_bits",
            "global (model watched)",
            "min over watched modules of log2(finfo(dtype).max / max|output|); NaN if any output held NaN, "
            "-inf if one overflowed; on steps that are not sampled, over float16/float8 outputs only",
            "bits",
            "sampled steps; every step where a float16/float8 output exists (vitals)",
            True,
        ),
        SeriesSpec(
            "act_absmax/module/{name}",
            "one watched module",
            "max |output| over the forward passes of the step (every leaf module by default)",
            "as output",
            _S,
        ),
        SeriesSpec(
            "act_headroom_bits/module/{name}",
            "one watched module",
            "log2(finfo(output dtype).max / act_absmax)",
            "bits",
            _S,
        ),
        SeriesSpec(
            sdk_series("{counter}"),
            "the run's SDK process (one per rank)",
            "the exporter's cumulative counters when the batch was made: " + ", ".join(SDK_COUNTERS),
            "count",
            "every batch",
        ),
        SeriesSpec(
            declare_series("{change}"),
            "global (Run.declare)",
            "1 at the step where the run declared a planned change: data (a data-mixture switch) or "
            "schedule (an intended LR change); the detectors read what follows as expected",
            "1",
            "when declared",
        ),
        SeriesSpec(
            "state_norm/{key}",
            "other optimizers",
            "||state[key]||_2 over all parameters, for each "
            "floating-point state tensor kind (momentum_buffer, square_avg, sum, ...)",
            "1",
            _S,
        ),
        SeriesSpec(
            "{stat}/group/{i}",
            "param group i, when more than one has gradients",
            "the global formula over the group's parameters, for stat in grad_norm, update_ratio, "
            "update_cosine, exp_avg_norm, exp_avg_sq_norm, update_rms, update_bimodality, "
            "v_underestimation, eps_headroom",
            "as global",
            _S,
        ),
        SeriesSpec(
            "{stat}/param/{name}",
            "one parameter tensor (named from model.named_parameters())",
            "the global formula over one tensor, for stat in grad_norm, param_norm, update_ratio, "
            "update_rms, v_underestimation, eps_headroom (median of all coordinates up to 1,024, "
            "else of 1,024 at stride floor(n / 1,024))",
            "as global",
            _S,
        ),
    )
}

#: Series a Prometheus scrape exposes, one gauge family each (bounded label sets).
EXPORTED_SERIES = tuple(n for n, s in CATALOG.items() if s.exported)


class WireError(ValueError):
    """A batch that cannot be accepted. ``reason`` is machine-readable, ``str(err)`` is for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Batch:
    run: str
    rank: int
    seq: int
    records: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)

    def n_points(self) -> int:
        return sum(len(r[2]) for r in self.records)


_NONFINITE_OUT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
#: How a JSON document spells NaN, +Inf and -Inf (what ``encode_value`` writes).
NONFINITE_SPELLINGS = tuple(_NONFINITE_OUT.values())
_NONFINITE_IN = {
    "NaN": math.nan,
    "nan": math.nan,
    "Infinity": math.inf,
    "+Infinity": math.inf,
    "inf": math.inf,
    "+inf": math.inf,
    "Inf": math.inf,
    "+Inf": math.inf,
    "-Infinity": -math.inf,
    "-inf": -math.inf,
    "-Inf": -math.inf,
}


def encode_value(x: float) -> float | str:
    """A value for a JSON document: the float itself, or the wire's spelling of a non-finite one
    (``"NaN"``, ``"Infinity"``, ``"-Infinity"``). The one place these spellings are written."""
    x = float(x)
    return x if math.isfinite(x) else _NONFINITE_OUT[repr(x)]


def value_text(x: float) -> str:
    """A value as text (CSV, a message's field): its shortest round-trip form, non-finite values
    spelled as ``encode_value`` spells them."""
    v = encode_value(x)
    return v if isinstance(v, str) else repr(v)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float, at any depth of its dicts, lists and tuples (tuples
    become lists), spelled as ``encode_value`` spells it: strict JSON without losing NaN or +-Inf."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else encode_value(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def decode_value(x: Any) -> float:
    """The inverse of ``encode_value``: a JSON number, or one of the spellings of a non-finite
    value (also ``nan``, ``inf``, ``Inf`` and their signed forms); raises WireError for anything else."""
    if isinstance(x, bool):  # bool is an int subclass; a True loss is a sender bug
        raise WireError("bad_value", f"boolean is not a metric value: {x!r}")
    if isinstance(x, (int, float)):
        try:
            return float(x)
        except OverflowError:  # a JSON integer beyond float64: a sender bug, not an Inf
            raise WireError("bad_value", f"integer too large for float64: {str(x)[:40]}...") from None
    if isinstance(x, str) and x in _NONFINITE_IN:
        return _NONFINITE_IN[x]
    raise WireError("bad_value", f"not a number: {x!r}")


def _finite_float(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond float64
        return False


def valid_name(name: Any) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None  # fullmatch: "$" lets "\n" through


def valid_tag(tag: Any) -> bool:
    return isinstance(tag, str) and TAG_RE.fullmatch(tag) is not None


def encode_batch(batch: Batch, version: int = WIRE_VERSION) -> bytes:
    """The batch as a request body: version 2 (binary, columnar) unless version 1 (JSON) is asked."""
    if version == 2:
        return encode_columns(to_columns(batch))
    if version != 1:
        raise ValueError(f"no wire version {version}")
    doc = {
        "v": 1,
        "run": batch.run,
        "rank": batch.rank,
        "seq": batch.seq,
        "records": [[step, t, {k: encode_value(v) for k, v in values.items()}] for step, t, values in batch.records],
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _int(doc: Mapping[str, Any], key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    v = doc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise WireError("bad_field", f"'{key}' must be an integer from {lo} to {hi}, got {v!r}")
    return v


def decode_batch(body: bytes | str) -> Batch:
    """Parse and validate one batch of either version, as records; raises WireError with a reason
    on anything malformed."""
    if is_binary(body):
        return from_columns(decode_columns(body))
    return _decode_json(body)


def _decode_json(body: bytes | str) -> Batch:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError("malformed_json", f"body is not JSON: {e}") from None
    except RecursionError:  # nesting deeper than the parser's stack; no batch is nested past 3
        raise WireError("malformed_json", "body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise WireError("malformed_batch", "a batch is a JSON object")
    if doc.get("v") != 1:
        raise WireError(
            "unsupported_version",
            f"JSON wire version {doc.get('v')!r} is not supported (JSON is version 1; version 2 is binary)",
        )
    unknown = set(doc) - {"v", "run", "rank", "seq", "records"}
    if unknown:
        raise WireError("unknown_field", f"unknown batch fields: {sorted(unknown)}")
    run = doc.get("run")
    if not isinstance(run, str) or not RUN_ID_RE.match(run):
        raise WireError("bad_field", f"'run' must be a run id, got {run!r}")
    rank, seq = _int(doc, "rank", hi=MAX_RANK), _int(doc, "seq")
    records_in = doc.get("records")
    if not isinstance(records_in, list):
        raise WireError("bad_field", "'records' must be a list")
    if len(records_in) > MAX_RECORDS_PER_BATCH:
        raise WireError("too_many_records", f"{len(records_in)} records > {MAX_RECORDS_PER_BATCH}")
    records: list[tuple[int, float, dict[str, float]]] = []
    for i, rec in enumerate(records_in):
        if not (isinstance(rec, list) and len(rec) == 3 and isinstance(rec[2], dict)):
            raise WireError("malformed_record", f"record {i} must be [step, time, {{name: value}}]")
        step, t, values = rec
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= 2**63 - 1:
            raise WireError("bad_step", f"record {i}: step must be an integer >= 0, got {step!r}")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not _finite_float(t):
            raise WireError("bad_time", f"record {i}: time must be a finite number, got {t!r}")
        if len(values) > MAX_VALUES_PER_RECORD:
            raise WireError("too_many_values", f"record {i}: {len(values)} values > {MAX_VALUES_PER_RECORD}")
        out = {}
        for name, v in values.items():
            if not valid_name(name):
                raise WireError(
                    "bad_name",
                    f"record {i}: invalid series name {name[:80]!r} "
                    f"(letters, digits, _ . : / -, at most {MAX_NAME_LEN})",
                )
            try:
                out[name] = decode_value(v)
            except WireError as e:
                raise WireError(e.reason, f"record {i}, series {name!r}: {e}") from None
        records.append((step, float(t), out))
    return Batch(run=run, rank=rank, seq=seq, records=records)


# -- version 2: binary, columnar ------------------------------------------------------------------
# All integers and floats little-endian. Header, then the batch's columns, then each series:
#   magic "OSWB" | version u8 (2) | flags u8 (0) | run id length u16 | rank u32 | seq u64
#   | records n u32 | series u32 | run id (ASCII) | steps n x int64 | times n x float64
#   per series: name length u8 | kind u8 (0 dense, 1 masked) | name (ASCII)
#               | kind 1 only: presence mask, ceil(n/8) bytes, bit i (LSB first) = record i has a value
#               | values: one float64 per present record (n for a dense series)
MAGIC = b"OSWB"
CONTENT_TYPE = "application/vnd.optiscope.batch"
_HEAD = struct.Struct("<4sBBHIQII")
_SERIES = struct.Struct("<BB")
_LE = sys.byteorder == "little"
_N = TypeVar("_N", int, float)


def _le(a: array[_N]) -> array[_N]:
    """``a`` with little-endian items (a no-op everywhere but on big-endian hosts)."""
    if not _LE:
        a = array(a.typecode, a)
        a.byteswap()
    return a


@dataclass
class Column:
    """One series of a batch: its values for the records the mask marks (every record when None)."""

    name: str
    values: array[float]  # typecode "d", one per present record, in record order
    mask: bytes | None = None  # ceil(n/8) bytes, bit i (LSB first) set = record i has a value

    def indices(self, n_records: int) -> list[int]:
        if self.mask is None:
            return list(range(n_records))
        m = self.mask
        return [i for i in range(n_records) if m[i >> 3] >> (i & 7) & 1]


@dataclass
class Columns:
    """A batch column by column: what version 2 carries and what the collector stores."""

    run: str
    rank: int
    seq: int
    steps: array[int]  # typecode "q", one per record
    times: array[float]  # typecode "d", one per record
    series: list[Column] = field(default_factory=list)

    def n_points(self) -> int:
        return sum(len(c.values) for c in self.series)


def is_binary(body: bytes | str) -> TypeGuard[bytes]:
    return isinstance(body, (bytes, bytearray, memoryview)) and bytes(body[:4]) == MAGIC


def to_columns(batch: Batch) -> Columns:
    n = len(batch.records)
    cols: dict[str, tuple[list[int], array[float]]] = {}
    for i, (_, _, values) in enumerate(batch.records):
        for name, v in values.items():
            c = cols.get(name)
            if c is None:
                c = cols[name] = ([], array("d"))
            c[0].append(i)
            c[1].append(v)
    series = []
    for name, (idx, vals) in cols.items():
        mask = None
        if len(idx) != n:
            m = bytearray((n + 7) // 8)
            for i in idx:
                m[i >> 3] |= 1 << (i & 7)
            mask = bytes(m)
        series.append(Column(name, vals, mask))
    return Columns(
        batch.run,
        batch.rank,
        batch.seq,
        array("q", (r[0] for r in batch.records)),
        array("d", (r[1] for r in batch.records)),
        series,
    )


def from_columns(cols: Columns) -> Batch:
    records: list[tuple[int, float, dict[str, float]]] = [(s, t, {}) for s, t in zip(cols.steps, cols.times)]
    for c in cols.series:
        for i, v in zip(c.indices(len(records)), c.values):
            records[i][2][c.name] = v
    return Batch(cols.run, cols.rank, cols.seq, records)


def encode_columns(cols: Columns) -> bytes:
    """Version 2 body. The caller keeps the invariants decode_columns checks (valid, distinct names;
    masks of ceil(n/8) bytes; one value per set bit)."""
    run = cols.run.encode("ascii")
    parts = [
        _HEAD.pack(MAGIC, 2, 0, len(run), cols.rank, cols.seq, len(cols.steps), len(cols.series)),
        run,
        _le(cols.steps).tobytes(),
        _le(cols.times).tobytes(),
    ]
    for c in cols.series:
        name = c.name.encode("ascii")
        parts.append(_SERIES.pack(len(name), 0 if c.mask is None else 1) + name)
        if c.mask is not None:
            parts.append(bytes(c.mask))
        parts.append(_le(c.values).tobytes())
    return b"".join(parts)


def _take(body: memoryview, pos: int, n: int, what: str) -> tuple[memoryview, int]:
    if pos + n > len(body):
        raise WireError("truncated", f"body ends inside {what} (needs {pos + n} bytes, has {len(body)})")
    return body[pos : pos + n], pos + n


def _floats(raw: memoryview) -> array[float]:
    a = array("d")
    a.frombytes(raw)
    return _le(a)


def decode_columns(body: bytes | str) -> Columns:
    """Parse and validate a batch of either version, column by column. Per series, not per point:
    a version 2 body is checked with a handful of operations for each series."""
    if not is_binary(body):
        return to_columns(_decode_json(body))
    view = memoryview(body).cast("B")
    run, rank, seq, n, n_series, pos = _decode_header(view)
    steps, times, pos = _decode_steps_and_times(view, pos, n)
    series, pos = _decode_series(view, pos, n, n_series)
    if pos != len(view):
        raise WireError("trailing_bytes", f"{len(view) - pos} bytes after the last series")
    return Columns(run, rank, seq, steps, times, series)


def _decode_header(view: memoryview) -> tuple[str, int, int, int, int, int]:
    """The header and the run id, checked: (run, rank, seq, records, series, position after them)."""
    head, pos = _take(view, 0, _HEAD.size, "the header")
    _, version, flags, run_len, rank, seq, n, n_series = _HEAD.unpack(head)
    if version != 2:
        raise WireError("unsupported_version", f"binary wire version {version} is not supported (this side speaks 2)")
    if flags:
        raise WireError("bad_field", f"header flags must be 0, got {flags}")
    if rank > MAX_RANK or seq > 2**63 - 1:  # stored as signed 32- and 64-bit integers
        raise WireError("bad_field", f"rank must be at most {MAX_RANK} and seq at most 2**63 - 1")
    if n > MAX_RECORDS_PER_BATCH:
        raise WireError("too_many_records", f"{n} records > {MAX_RECORDS_PER_BATCH}")
    if n_series > MAX_SERIES_PER_BATCH:
        raise WireError("too_many_series", f"{n_series} series in one batch > {MAX_SERIES_PER_BATCH}")
    raw, pos = _take(view, pos, run_len, "the run id")
    run = bytes(raw).decode("latin-1")
    if not RUN_ID_RE.fullmatch(run):
        raise WireError("bad_field", f"'run' must be a run id, got {run[:80]!r}")
    return run, rank, seq, n, n_series, pos


def _decode_steps_and_times(view: memoryview, pos: int, n: int) -> tuple[array[int], array[float], int]:
    """The batch's ``n`` steps (each >= 0) and times (each finite), and the position after them."""
    raw, pos = _take(view, pos, 8 * n, "the steps")
    steps = array("q")
    steps.frombytes(raw)
    steps = _le(steps)
    if n and min(steps) < 0:
        raise WireError("bad_step", f"steps must be >= 0, got {min(steps)}")
    raw, pos = _take(view, pos, 8 * n, "the times")
    times = _floats(raw)
    if not all(map(math.isfinite, times)):
        raise WireError("bad_time", "times must be finite numbers")
    return steps, times, pos


def _decode_series(view: memoryview, pos: int, n: int, n_series: int) -> tuple[list[Column], int]:
    """The ``n_series`` series of a batch of ``n`` records, checked, and the position after them."""
    mask_len, tail, end = (n + 7) // 8, n % 8, len(view)
    series: list[Column] = []
    seen: set[str] = set()
    # The loop runs once per series; each step is a C call on a slice (no work per point).
    for k in range(n_series):
        if pos + 2 > end:
            raise WireError("truncated", f"body ends inside series {k}")
        name_len, kind = view[pos], view[pos + 1]
        pos += 2
        name = bytes(view[pos : pos + name_len]).decode("latin-1")
        pos += name_len
        if len(name) != name_len:
            raise WireError("truncated", f"body ends inside the name of series {k}")
        if NAME_RE.fullmatch(name) is None:
            raise WireError(
                "bad_name",
                f"series {k}: invalid series name {name[:80]!r} (letters, digits, _ . : / -, at most {MAX_NAME_LEN})",
            )
        if name in seen:
            raise WireError("duplicate_series", f"series {name!r} appears twice in one batch")
        seen.add(name)
        mask, count = None, n
        if kind == 1:
            mask = bytes(view[pos : pos + mask_len])
            pos += mask_len
            if len(mask) != mask_len:
                raise WireError("truncated", f"body ends inside the mask of {name!r}")
            if tail and mask[-1] >> tail:
                raise WireError("bad_mask", f"series {name!r}: mask marks records beyond the {n} of the batch")
            count = int.from_bytes(mask, "little").bit_count()
            if count == 0:
                raise WireError("bad_mask", f"series {name!r}: mask marks no record")
        elif kind != 0:
            raise WireError("bad_field", f"series {name!r}: kind must be 0 (dense) or 1 (masked), got {kind}")
        if pos + 8 * count > end:
            raise WireError("truncated", f"body ends inside the values of {name!r}")
        values = array("d")
        values.frombytes(view[pos : pos + 8 * count])
        pos += 8 * count
        series.append(Column(name, values if _LE else _le(values), mask))
    return series, pos
