"""The run's registration document (``PUT /api/v1/runs/{id}``): its optional metadata, kept
within the collector's bounds, and how it is registered with a collector that refuses that metadata.

The core of the document (project, name, config, rank, host, pid) is what every collector
accepts. Tags and the environment fingerprint came later, and the collector forbids fields it does
not know: an older collector answers 422 to a document that carries them. Losing a run's data
over its metadata would be the wrong trade, so a refused registration is sent again without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from .. import wire

#: Keys a collector may refuse; the rest of the document is its core.
OPTIONAL_KEYS = ("tags", "environment")
#: Answers to a registration that say "not this document" (an unknown field, a bound passed),
#: as opposed to "not now" (http.RETRYABLE) or "not you" (401, 403).
REFUSED = frozenset({400, 413, 422})


def clean_tags(tags: Iterable[Any] | str | None) -> tuple[list[str], list[Any]]:
    """(tags kept, in order and without repeats; tags dropped): invalid ones, and those past
    ``wire.MAX_TAGS``. A single string is one tag, not a sequence of one-letter tags."""
    if tags is None:
        return [], []
    if isinstance(tags, str):
        tags = [tags]
    kept: list[str] = []
    dropped: list[Any] = []
    for t in tags:
        if not wire.valid_tag(t) or len(kept) >= wire.MAX_TAGS:
            dropped.append(t)
        elif t not in kept:
            kept.append(t)
    return kept, dropped


def bound_environment(env: dict[str, Any], limit: int = wire.MAX_ENVIRONMENT_BYTES) -> tuple[dict[str, Any], list[str]]:
    """``env`` as JSON values, within ``limit`` bytes of ``json.dumps``: the largest top-level
    entries leave first, and ``"truncated"`` lists their keys (or counts them, if the list is long).
    Returns (the document, the keys that left)."""
    env = json.loads(json.dumps(env, default=str))  # what JSON cannot hold becomes its str()
    dropped: list[str] = []
    while _size(env) > limit:
        keys = [k for k in env if k != "truncated"]
        if not keys:
            return {"truncated": len(dropped)}, dropped
        key = max(keys, key=lambda k: _size({k: env[k]}))
        del env[key]
        dropped.append(key)
        listed = sorted(dropped)
        env["truncated"] = listed if _size(listed) <= limit // 8 else len(dropped)
    return env, dropped


def core(doc: dict[str, Any]) -> dict[str, Any] | None:
    """``doc`` without its optional metadata; None when it has none (nothing to fall back to)."""
    if not any(k in doc for k in OPTIONAL_KEYS):
        return None
    return {k: v for k, v in doc.items() if k not in OPTIONAL_KEYS}


def put_run(call: Callable[[str, str, Any], int | None], run_id: str, doc: dict[str, Any]) -> tuple[int | None, bool]:
    """Register ``doc`` through ``call(method, path, body) -> status | None``; when the collector
    refuses it (``REFUSED``) and it carries optional metadata, register its core instead.
    Returns (the last status, whether the core was sent): the caller says so in its log."""
    path = f"/api/v1/runs/{run_id}"
    status = call("PUT", path, doc)
    fallback = core(doc) if status in REFUSED else None
    if fallback is None:
        return status, False
    return call("PUT", path, fallback), True


def _size(value: Any) -> int:
    return len(json.dumps(value))
