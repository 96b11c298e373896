"""Reading requests: bodies within their limits, query items, cursors; and the CSV answer."""

from __future__ import annotations

import base64
import json
import math
import zlib

from fastapi import Request

from optiscope import wire

from . import schemas as m
from .errors import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, with the limit enforced on streamed and on decompressed bytes before parsing."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds {limit}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, "body_too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "gzip":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = d.decompress(body, limit + 1)
        except zlib.error as e:
            raise ApiError(400, "bad_encoding", f"gzip body cannot be decompressed: {e}") from None
        if len(body) > limit or d.unconsumed_tail:
            raise ApiError(413, "body_too_large", f"decompressed body exceeds {limit} bytes")
        if not d.eof or d.unused_data:  # cut short, or more after the first member: not what was sent
            raise ApiError(400, "bad_encoding", "the gzip body is truncated or has data after its end")
    elif encoding not in ("identity", ""):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported (gzip is)")
    return body


def config_filters(items: list[str]) -> dict[str, str]:
    """``key=value`` query items as {key: the value's JSON text}: a value that parses as JSON (a
    number, true, false, null) matches that JSON value, anything else matches the string."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not wire.NAME_RE.fullmatch(key):
            raise ApiError(
                422,
                "bad_config_filter",
                {
                    "loc": ["query", "config"],
                    "input": item,
                    "msg": "expected key=value with a key of letters, digits, _ . : / -",
                },
            )
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        if isinstance(parsed, (dict, list)):
            parsed = value
        out[key] = json.dumps(parsed)
    return out


def encode_cursor(last: tuple, sort: str, order: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([sort, order, *last]).encode()).decode()


def decode_cursor(cursor: str, sort: str, order: str) -> tuple:
    """The (sort value, run id) a page ends on; a cursor made for another sort or order, or not
    made by us, is a 422."""
    try:
        got_sort, got_order, value, run_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        ok = (
            (got_sort, got_order) == (sort, order)
            and isinstance(run_id, str)
            and wire.RUN_ID_RE.fullmatch(run_id) is not None
        )
        if sort == "name":
            ok = ok and isinstance(value, str) and len(value) <= 200 and "\x00" not in value
            value.encode("utf-8")  # a lone surrogate cannot reach the database
        else:  # a time: a float, as the column holds it (a bool or a huge int would reach the database)
            ok = ok and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value)
    except (ValueError, TypeError, OverflowError, RecursionError, UnicodeError, AttributeError):
        ok = False
    if not ok:
        raise ApiError(
            422,
            "bad_cursor",
            {"loc": ["query", "cursor"], "msg": "not a next_cursor of this listing (same sort and order)"},
        )
    return value, run_id


async def refuse_nul(request: Request) -> None:  # async: no I/O, so no hop to the thread pool
    """No path or query value may hold a NUL character: PostgreSQL's text cannot store one, and no
    name, id or filter of ours contains one."""
    if "\x00" in request.url.path or any("\x00" in k or "\x00" in v for k, v in request.query_params.multi_items()):
        raise ApiError(422, "bad_character", "the path or query contains a NUL character")


def series_csv(data: m.SeriesData) -> str:
    """step,rank,value lines; values as Python's shortest round-trip repr, non-finite ones spelt
    as in JSON responses (NaN, Infinity, -Infinity)."""
    lines = ["step,rank,value"]
    for s, r, v in zip(data.steps, data.ranks, data.values):
        lines.append(f"{s},{r},{wire.value_text(v)}")
    return "\n".join(lines) + "\n"
