"""Wire format: round trips of both versions (NaN, +Inf, -Inf included, bit-exact in version 2) and
a clear reason for every malformed batch."""

from __future__ import annotations

import json
import math
import struct
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from optiscope import wire

names = st.from_regex(wire.NAME_RE, fullmatch=True)
values = st.floats(allow_nan=True, allow_infinity=True)
records = st.lists(
    st.tuples(st.integers(0, 2**53), st.floats(0, 2e9), st.dictionaries(names, values, max_size=8)), max_size=20
)
run_ids = st.from_regex(wire.RUN_ID_RE, fullmatch=True)


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@given(run=run_ids, rank=st.integers(0, 1024), seq=st.integers(0, 2**62), recs=records)
def test_json_batch_round_trip(run, rank, seq, recs):
    body = wire.encode_batch(wire.Batch(run, rank, seq, recs), version=1)
    json.loads(body, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))  # strict JSON
    back = wire.decode_batch(body)
    assert (back.run, back.rank, back.seq) == (run, rank, seq)
    assert len(back.records) == len(recs)
    for (s1, t1, v1), (s2, t2, v2) in zip(recs, back.records):
        assert s1 == s2 and t1 == t2 and v1.keys() == v2.keys()
        assert all(same(v1[k], v2[k]) for k in v1)


@given(run=run_ids, rank=st.integers(0, wire.MAX_RANK), seq=st.integers(0, 2**63 - 1), recs=records)
def test_binary_batch_round_trip_is_bit_exact(run, rank, seq, recs):
    body = wire.encode_batch(wire.Batch(run, rank, seq, recs))
    assert wire.is_binary(body) and body[:4] == wire.MAGIC
    back = wire.decode_batch(body)
    assert (back.run, back.rank, back.seq) == (run, rank, seq)
    assert [(s, t) for s, t, _ in back.records] == [(s, t) for s, t, _ in recs]
    for (_, _, v1), (_, _, v2) in zip(recs, back.records):
        assert v1.keys() == v2.keys()
        assert all(bits(v1[k]) == bits(v2[k]) for k in v1)  # NaN payloads and the sign of zero included
    cols = wire.decode_columns(body)
    assert cols.n_points() == sum(len(v) for _, _, v in recs)
    # a series held by every record travels dense (no mask), any other one with its mask
    for c in cols.series:
        present = sum(c.name in v for _, _, v in recs)
        assert (c.mask is None) == (present == len(recs)) and len(c.values) == present


@given(recs=records.filter(lambda r: r and any(v for _, _, v in r)), data=st.data())
def test_damaged_binary_bodies_are_refused_with_a_reason(recs, data):
    body = wire.encode_batch(wire.Batch("r1", 0, 1, recs))
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(wire.WireError) as e:  # every strict prefix is refused, never misread
        wire.decode_columns(body[:cut])
    assert e.value.reason == ("truncated" if cut >= 4 else "malformed_json")  # short of the magic: not binary
    with pytest.raises(wire.WireError) as e:
        wire.decode_columns(body + b"\0")
    assert e.value.reason == "trailing_bytes"
    flipped = bytearray(body)
    pos = data.draw(st.integers(0, len(body) - 1))
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    try:  # a flipped bit is either refused with a reason or decodes into a valid batch
        wire.decode_columns(bytes(flipped))
    except wire.WireError as err:
        assert err.reason and str(err)


def test_non_finite_spelling_and_bare_tokens():
    assert [wire.encode_value(x) for x in (math.nan, math.inf, -math.inf, 1.5)] == ["NaN", "Infinity", "-Infinity", 1.5]
    # Python's json.dumps writes bare NaN/Infinity tokens; a lenient decoder accepts them too.
    body = json.dumps(
        {"v": 1, "run": "r1", "rank": 0, "seq": 0, "records": [[0, 0.0, {"a": math.nan, "b": -math.inf}]]}
    )
    rec = wire.decode_batch(body).records[0][2]
    assert math.isnan(rec["a"]) and rec["b"] == -math.inf


def test_one_spelling_for_documents_and_text():
    """``json_safe`` and ``value_text`` spell non-finite values as ``encode_value`` does, and
    ``decode_value`` reads every spelling back."""
    doc = {"a": [1.5, math.nan, {"b": (math.inf, -math.inf)}], "c": "NaN", "d": 2, "e": None, "f": True}
    safe = wire.json_safe(doc)
    assert safe == {"a": [1.5, "NaN", {"b": ["Infinity", "-Infinity"]}], "c": "NaN", "d": 2, "e": None, "f": True}
    json.dumps(safe, allow_nan=False)  # strict JSON
    assert [wire.value_text(x) for x in (0.1, 2.0, math.nan, math.inf, -math.inf)] == [
        "0.1",
        "2.0",
        "NaN",
        "Infinity",
        "-Infinity",
    ]
    for x in (math.inf, -math.inf, 0.25):
        assert wire.decode_value(wire.encode_value(x)) == x
    assert math.isnan(wire.decode_value(wire.encode_value(math.nan)))


def test_sdk_and_declare_series_names_are_defined_once():
    assert wire.SDK_SERIES == tuple(f"sdk/{c}" for c in wire.SDK_COUNTERS)
    assert wire.sdk_series("dropped") == "sdk/dropped"
    assert (wire.DECLARE_DATA, wire.DECLARE_SCHEDULE) == tuple(wire.declare_series(k) for k in wire.DECLARE_KINDS)
    assert wire.DECLARE_DATA == "declare/data_change" and wire.DECLARE_SCHEDULE == "declare/schedule_change"
    assert all(wire.valid_name(n) for n in wire.SDK_SERIES + (wire.DECLARE_DATA, wire.DECLARE_SCHEDULE))
    assert {"sdk/{counter}", "declare/{change}_change"} <= set(wire.CATALOG)


def test_json_is_decoded_into_columns_too():
    body = wire.encode_batch(wire.Batch("r1", 2, 3, [(5, 1.0, {"a": 1.0}), (6, 2.0, {"a": math.inf, "b": 2.0})]), 1)
    cols = wire.decode_columns(body)
    assert (cols.run, cols.rank, cols.seq, list(cols.steps), list(cols.times)) == ("r1", 2, 3, [5, 6], [1.0, 2.0])
    a, b = cols.series
    assert (a.name, a.mask, list(a.values)) == ("a", None, [1.0, math.inf])
    assert (b.name, b.mask, list(b.values)) == ("b", bytes([0b10]), [2.0])
    assert a.indices(2) == [0, 1] and b.indices(2) == [1]


GOOD = {"v": 1, "run": "r1", "rank": 0, "seq": 0, "records": [[0, 1.0, {"loss": 1.0}]]}


@pytest.mark.parametrize(
    "mutate,reason",
    [
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
        (lambda d: {**d, "records": [[0, 1.0, {"loss\n": 1.0}]]}, "bad_name"),
        (lambda d: {**d, "records": [[0, 1.0, {"loss": "1.0"}]]}, "bad_value"),
        (lambda d: {**d, "records": [[0, 1.0, {"loss": None}]]}, "bad_value"),
        (lambda d: {**d, "records": [[0, 1.0, {"loss": True}]]}, "bad_value"),
        (lambda d: {**d, "records": [[0, 1.0, {}]] * (wire.MAX_RECORDS_PER_BATCH + 1)}, "too_many_records"),
    ],
)
def test_malformed_json_batches_have_a_reason(mutate, reason):
    doc = mutate(dict(GOOD))
    body = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(wire.WireError) as e:
        wire.decode_batch(body)
    assert e.value.reason == reason
    assert str(e.value)


def _cols(**kw) -> wire.Columns:
    c = dict(
        run="r1",
        rank=0,
        seq=0,
        steps=array("q", [0, 1, 2]),
        times=array("d", [0.0, 1.0, 2.0]),
        series=[wire.Column("loss", array("d", [1.0, 2.0, 3.0]))],
    )
    c.update(kw)
    return wire.Columns(**c)


def _patch(body: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(body)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


GOOD_BIN = wire.encode_columns(_cols())
_SERIES0 = wire._HEAD.size + 2 + 3 * 16  # header, run id "r1", steps and times of three records


@pytest.mark.parametrize(
    "body,reason",
    [
        (_patch(GOOD_BIN, 4, "<B", 3), "unsupported_version"),
        (_patch(GOOD_BIN, 5, "<B", 1), "bad_field"),  # flags
        (wire.encode_columns(_cols(run="bad id!")), "bad_field"),
        (_patch(GOOD_BIN, 20, "<I", wire.MAX_RECORDS_PER_BATCH + 1), "too_many_records"),
        (_patch(GOOD_BIN, 24, "<I", wire.MAX_SERIES_PER_BATCH + 1), "too_many_series"),
        (_patch(GOOD_BIN, 24, "<I", 2), "truncated"),  # a series announced, not sent
        (GOOD_BIN[:-1], "truncated"),
        (GOOD_BIN + b"x", "trailing_bytes"),
        (wire.encode_columns(_cols(steps=array("q", [0, -1, 2]))), "bad_step"),
        (wire.encode_columns(_cols(times=array("d", [0.0, math.nan, 2.0]))), "bad_time"),
        (wire.encode_columns(_cols(series=[wire.Column("bad name", array("d", [1.0, 2.0, 3.0]))])), "bad_name"),
        (wire.encode_columns(_cols(series=[wire.Column("x" * 201, array("d", [1.0, 2.0, 3.0]))])), "bad_name"),
        (wire.encode_columns(_cols(series=[wire.Column("a", array("d", [1.0, 2.0, 3.0]))] * 2)), "duplicate_series"),
        (_patch(GOOD_BIN, _SERIES0 + 1, "<B", 7), "bad_field"),  # kind
        (wire.encode_columns(_cols(series=[wire.Column("a", array("d", [1.0]), bytes([0b1001]))])), "bad_mask"),
        (wire.encode_columns(_cols(series=[wire.Column("a", array("d"), bytes([0]))])), "bad_mask"),
        (wire.encode_columns(_cols(series=[wire.Column("a", array("d", [1.0]), bytes([0b11]))])), "truncated"),
    ],
)
def test_malformed_binary_batches_have_a_reason(body, reason):
    with pytest.raises(wire.WireError) as e:
        wire.decode_columns(body)
    assert e.value.reason == reason
    assert str(e.value)


def test_masked_series_and_limits_decode():
    cols = _cols(
        series=[
            wire.Column("every", array("d", [1.0, math.nan, -math.inf])),
            wire.Column("sparse", array("d", [math.inf]), bytes([0b100])),
        ]
    )
    back = wire.decode_batch(wire.encode_columns(cols))
    assert back.records[0][2] == {"every": 1.0} and back.records[2][2]["sparse"] == math.inf
    assert math.isnan(back.records[1][2]["every"]) and back.records[2][2]["every"] == -math.inf
    many = _cols(
        steps=array("q"),
        times=array("d"),
        series=[wire.Column(f"s{i}", array("d")) for i in range(wire.MAX_SERIES_PER_BATCH)],
    )
    assert len(wire.decode_columns(wire.encode_columns(many)).series) == wire.MAX_SERIES_PER_BATCH


def test_ranks_and_seqs_beyond_what_the_store_holds_are_refused():
    """rank is a signed 32-bit integer in the store and seq a signed 64-bit one: a batch beyond them
    is a clear bad_field, in either version, never an error at commit."""
    for rank, seq in ((wire.MAX_RANK + 1, 0), (0, 2**63), (2**32 - 1, 2**64 - 1)):
        binary = bytearray(wire.encode_batch(wire.Batch("r", 0, 0, [(0, 1.0, {"a": 1.0})])))
        struct.pack_into("<IQ", binary, 8, rank, seq)  # after magic, version, flags, run id length
        with pytest.raises(wire.WireError) as e:
            wire.decode_columns(bytes(binary))
        assert e.value.reason == "bad_field"
        doc = json.dumps({"v": 1, "run": "r", "rank": rank, "seq": seq, "records": []})
        with pytest.raises(wire.WireError) as e:
            wire.decode_batch(doc)
        assert e.value.reason == "bad_field"
    for body, reason in (
        ('{"v":1,"run":"r","rank":0,"seq":0,"records":[[9223372036854775808,0,{}]]}', "bad_step"),
        ('{"v":1,"run":"r","rank":0,"seq":0,"records":[[0,1e999999,{}]]}', "bad_time"),
        ('{"v":1,"run":"r","rank":0,"seq":0,"records":[[0,' + "9" * 400 + ",{}]]}", "bad_time"),
        ('{"v":1,"run":"r","rank":0,"seq":0,"records":[[0,1,{"a":' + "9" * 400 + "}]]}", "bad_value"),
        ("[" * 100_000 + "]" * 100_000, "malformed_json"),
    ):
        with pytest.raises(wire.WireError) as e:
            wire.decode_batch(body)
        assert e.value.reason == reason, body[:80]
