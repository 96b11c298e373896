"""The versioned wire format shared by the SDK and the collector, and the one table of series names.

A batch is one JSON document (optionally gzip-compressed in transit)::

    {"v": 1, "run": "<run id>", "rank": 0, "seq": 17,
     "records": [[step, unix_time, {"loss": 2.31, "grad_norm": "NaN"}], ...]}

``(run, rank, seq)`` is the batch's idempotency key: the collector stores a key once and
acknowledges a repeat without storing it again. Values are JSON numbers; the three non-finite
values travel as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` because strict JSON has no
token for them (the decoder also accepts Python's bare ``NaN``/``Infinity`` tokens). Non-finite values
are data: they are never turned into null or dropped.

This module imports only the standard library: both sides depend on it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

WIRE_VERSION = 1

#: Bounds a sender must respect and a receiver enforces (documented in the README).
MAX_NAME_LEN = 200
MAX_RECORDS_PER_BATCH = 10_000
MAX_VALUES_PER_RECORD = 4_096
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,199}$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


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
        SeriesSpec("step_time", "global", "host wall time between the ends of two consecutive optimizer steps",
                   "s", "every step after the first", True),
        SeriesSpec("loss_scale", "global (GradScaler watched)", "the GradScaler's scale at the step", "1",
                   "every step", True),
        SeriesSpec("skipped_steps", "global (GradScaler watched)",
                   "iterations whose optimizer step GradScaler skipped (non-finite gradients), cumulative", "count",
                   "every step", True),
        SeriesSpec("grad_norm", "global", "sqrt(sum over parameters of ||g||^2), gradients before any clipping",
                   "1", _S, True),
        SeriesSpec("grad_norm_clipped", "global",
                   "the same norm of the gradients the optimizer steps with (after clipping; equal to grad_norm "
                   "when nothing clips)", "1", _S, True),
        SeriesSpec("grad_nonfinite_tensors", "global", "number of parameter tensors whose gradient holds NaN or +-Inf",
                   "count", _S, True),
        SeriesSpec("param_norm", "global", "sqrt(sum over parameters of ||theta||^2) after the step", "1", _S, True),
        SeriesSpec("update_norm", "global", "||theta_after - theta_before||_2 over all parameters", "1", _S, True),
        SeriesSpec("update_ratio", "global", "update_norm / param_norm before the step", "1", _S, True),
        SeriesSpec("update_cosine", "global",
                   "cos(theta_after - theta_before, -g), g the gradient the optimizer steps with", "1", _S, True),
        SeriesSpec("exp_avg_norm", "global (Adam family)", "||m||_2 of Adam's first moment after the step", "1", _S, True),
        SeriesSpec("exp_avg_sq_norm", "global (Adam family)", "||v||_2 of Adam's second moment after the step",
                   "1", _S, True),
        SeriesSpec("update_rms", _ADAM, f"sqrt(mean of u^2) over all coordinates; {_U} (v = max_exp_avg_sq "
                   "with amsgrad)", "1", _S, True),
        SeriesSpec("update_bimodality", _ADAM, "share of coordinates with |u| > 0.9", "1", _S, True),
        SeriesSpec("v_underestimation", _ADAM,
                   "sqrt(mean of g^2 / max(v_hat_{t-1}, eps^2)), before the step, over tensors that have a "
                   "v_hat_{t-1} (absent on the first step)", "1", _S, True),
        SeriesSpec("eps_headroom", _ADAM,
                   "log10(median(sqrt(v_hat)) / eps); the median of a uniform strided sample of about 65,536 "
                   "coordinates", "decades", _S, True),
        SeriesSpec("bias_correction1", _ADAM, "1 - beta1^t of the first parameter of param group 0", "1", _S),
        SeriesSpec("bias_correction2", _ADAM, "1 - beta2^t of the first parameter of param group 0", "1", _S),
        SeriesSpec("act_headroom_bits", "global (model watched)",
                   "min over watched modules of log2(finfo(dtype).max / max|output|); NaN if any output held NaN, "
                   "-inf if one overflowed", "bits", _S, True),
        SeriesSpec("act_absmax/module/{name}", "one watched module",
                   "max |output| over the forward passes of the step (every leaf module by default)", "as output", _S),
        SeriesSpec("act_headroom_bits/module/{name}", "one watched module",
                   "log2(finfo(output dtype).max / act_absmax)", "bits", _S),
        SeriesSpec("sdk/{counter}", "the run's SDK process (one per rank)",
                   "the exporter's cumulative counters when the batch was made: sent_points, dropped, retries, "
                   "spooled_batches, spool_full, rejected_batches", "count", "every batch"),
        SeriesSpec("state_norm/{key}", "other optimizers", "||state[key]||_2 over all parameters, for each "
                   "floating-point state tensor kind (momentum_buffer, square_avg, sum, ...)", "1", _S),
        SeriesSpec("{stat}/group/{i}", "param group i, when more than one has gradients",
                   "the global formula over the group's parameters, for stat in grad_norm, update_ratio, "
                   "update_cosine, exp_avg_norm, exp_avg_sq_norm, update_rms, update_bimodality, "
                   "v_underestimation, eps_headroom", "as global", _S),
        SeriesSpec("{stat}/param/{name}", "one parameter tensor (named from model.named_parameters())",
                   "the global formula over one tensor, for stat in grad_norm, param_norm, update_ratio, "
                   "update_rms, v_underestimation, eps_headroom (median of a strided sample of at most 4,096 "
                   "coordinates)", "as global", _S),
    )
}

#: Series a Prometheus scrape exposes, one gauge family each (bounded label sets).
EXPORTED_SERIES = tuple(n for n, s in CATALOG.items() if s.exported)


class WireError(ValueError):
    """A batch that cannot be accepted. ``reason`` is machine-readable, ``str(err)`` is for people."""

    def __init__(self, reason: str, message: str):
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
_NONFINITE_IN = {"NaN": math.nan, "nan": math.nan, "Infinity": math.inf, "+Infinity": math.inf,
                 "inf": math.inf, "+inf": math.inf, "Inf": math.inf, "+Inf": math.inf,
                 "-Infinity": -math.inf, "-inf": -math.inf, "-Inf": -math.inf}


def encode_value(x: float) -> float | str:
    x = float(x)
    return x if math.isfinite(x) else _NONFINITE_OUT[repr(x)]


def decode_value(x: Any) -> float:
    if isinstance(x, bool):  # bool is an int subclass; a True loss is a sender bug
        raise WireError("bad_value", f"boolean is not a metric value: {x!r}")
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x in _NONFINITE_IN:
        return _NONFINITE_IN[x]
    raise WireError("bad_value", f"not a number: {x!r}")


def valid_name(name: Any) -> bool:
    return isinstance(name, str) and NAME_RE.match(name) is not None


def encode_batch(batch: Batch) -> bytes:
    doc = {
        "v": WIRE_VERSION,
        "run": batch.run,
        "rank": batch.rank,
        "seq": batch.seq,
        "records": [[step, t, {k: encode_value(v) for k, v in values.items()}]
                    for step, t, values in batch.records],
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _int(doc: Mapping, key: str, lo: int = 0) -> int:
    v = doc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise WireError("bad_field", f"'{key}' must be an integer >= {lo}, got {v!r}")
    return v


def decode_batch(body: bytes | str) -> Batch:
    """Parse and validate one batch; raises WireError with a reason on anything malformed."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError("malformed_json", f"body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise WireError("malformed_batch", "a batch is a JSON object")
    if doc.get("v") != WIRE_VERSION:
        raise WireError("unsupported_version", f"wire version {doc.get('v')!r} is not supported "
                                               f"(this collector speaks {WIRE_VERSION})")
    unknown = set(doc) - {"v", "run", "rank", "seq", "records"}
    if unknown:
        raise WireError("unknown_field", f"unknown batch fields: {sorted(unknown)}")
    run = doc.get("run")
    if not isinstance(run, str) or not RUN_ID_RE.match(run):
        raise WireError("bad_field", f"'run' must be a run id, got {run!r}")
    rank, seq = _int(doc, "rank"), _int(doc, "seq")
    records_in = doc.get("records")
    if not isinstance(records_in, list):
        raise WireError("bad_field", "'records' must be a list")
    if len(records_in) > MAX_RECORDS_PER_BATCH:
        raise WireError("too_many_records", f"{len(records_in)} records > {MAX_RECORDS_PER_BATCH}")
    records = []
    for i, rec in enumerate(records_in):
        if not (isinstance(rec, list) and len(rec) == 3 and isinstance(rec[2], dict)):
            raise WireError("malformed_record", f"record {i} must be [step, time, {{name: value}}]")
        step, t, values = rec
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise WireError("bad_step", f"record {i}: step must be an integer >= 0, got {step!r}")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            raise WireError("bad_time", f"record {i}: time must be a finite number, got {t!r}")
        if len(values) > MAX_VALUES_PER_RECORD:
            raise WireError("too_many_values", f"record {i}: {len(values)} values > {MAX_VALUES_PER_RECORD}")
        out = {}
        for name, v in values.items():
            if not valid_name(name):
                raise WireError("bad_name", f"record {i}: invalid series name {name[:80]!r} "
                                            f"(letters, digits, _ . : / -, at most {MAX_NAME_LEN})")
            try:
                out[name] = decode_value(v)
            except WireError as e:
                raise WireError(e.reason, f"record {i}, series {name!r}: {e}") from None
        records.append((step, float(t), out))
    return Batch(run=run, rank=rank, seq=seq, records=records)
