"""Wire format: round trips (NaN, +Inf, -Inf included) and a clear reason for every malformed batch."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from optiscope import wire

names = st.from_regex(wire.NAME_RE, fullmatch=True)
values = st.floats(allow_nan=True, allow_infinity=True)
records = st.lists(st.tuples(st.integers(0, 2**53), st.floats(0, 2e9), st.dictionaries(names, values, max_size=8)),
                   max_size=20)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@given(run=st.from_regex(wire.RUN_ID_RE, fullmatch=True), rank=st.integers(0, 1024),
       seq=st.integers(0, 2**62), recs=records)
def test_batch_round_trip(run, rank, seq, recs):
    body = wire.encode_batch(wire.Batch(run, rank, seq, recs))
    json.loads(body, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))  # strict JSON
    back = wire.decode_batch(body)
    assert (back.run, back.rank, back.seq) == (run, rank, seq)
    assert len(back.records) == len(recs)
    for (s1, t1, v1), (s2, t2, v2) in zip(recs, back.records):
        assert s1 == s2 and t1 == t2 and v1.keys() == v2.keys()
        assert all(same(v1[k], v2[k]) for k in v1)


def test_non_finite_spelling_and_bare_tokens():
    assert [wire.encode_value(x) for x in (math.nan, math.inf, -math.inf, 1.5)] == ["NaN", "Infinity", "-Infinity", 1.5]
    # Python's json.dumps writes bare NaN/Infinity tokens; a lenient decoder accepts them too.
    body = json.dumps({"v": 1, "run": "r1", "rank": 0, "seq": 0, "records": [[0, 0.0, {"a": math.nan, "b": -math.inf}]]})
    rec = wire.decode_batch(body).records[0][2]
    assert math.isnan(rec["a"]) and rec["b"] == -math.inf


GOOD = {"v": 1, "run": "r1", "rank": 0, "seq": 0, "records": [[0, 1.0, {"loss": 1.0}]]}


@pytest.mark.parametrize("mutate,reason", [
    (lambda d: "not json", "malformed_json"),
    (lambda d: [1, 2], "malformed_batch"),
    (lambda d: {**d, "v": 2}, "unsupported_version"),
    (lambda d: {**d, "extra": 1}, "unknown_field"),
    (lambda d: {**d, "run": "bad id!"}, "bad_field"),
    (lambda d: {**d, "seq": -1}, "bad_field"),
    (lambda d: {**d, "rank": "0"}, "bad_field"),
    (lambda d: {**d, "records": {}}, "bad_field"),
    (lambda d: {**d, "records": [[0, 1.0]]}, "malformed_record"),
    (lambda d: {**d, "records": [[-1, 1.0, {}]]}, "bad_step"),
    (lambda d: {**d, "records": [[1.5, 1.0, {}]]}, "bad_step"),
    (lambda d: {**d, "records": [[0, "now", {}]]}, "bad_time"),
    (lambda d: {**d, "records": [[0, 1.0, {"bad name": 1.0}]]}, "bad_name"),
    (lambda d: {**d, "records": [[0, 1.0, {"x" * 201: 1.0}]]}, "bad_name"),
    (lambda d: {**d, "records": [[0, 1.0, {"loss": "1.0"}]]}, "bad_value"),
    (lambda d: {**d, "records": [[0, 1.0, {"loss": None}]]}, "bad_value"),
    (lambda d: {**d, "records": [[0, 1.0, {"loss": True}]]}, "bad_value"),
    (lambda d: {**d, "records": [[0, 1.0, {}]] * (wire.MAX_RECORDS_PER_BATCH + 1)}, "too_many_records"),
])
def test_malformed_batches_have_a_reason(mutate, reason):
    doc = mutate(dict(GOOD))
    body = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(wire.WireError) as e:
        wire.decode_batch(body)
    assert e.value.reason == reason
    assert str(e.value)
