"""API tokens scoped to one project: creation, listing, revocation, and the verifier.

A token reads ``osk_<id>_<secret>``: the prefix makes a leaked token recognisable to secret
scanners, the id finds its row without a scan, and only a SHA-256 of the whole token is stored,
compared in constant time. Scopes: ``ingest`` (register runs, send batches, heartbeats, finish),
``read`` (every GET), ``admin`` (everything in its project: deletions, acknowledgements, the audit
log). The collector's own ``--token`` is a root token: every scope on every project.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from ..storage.audit import write_audit
from ..storage.projects import ensure_project
from ..storage.tables import tokens
from .principals import SCOPES, Principal

PREFIX = "osk_"
TOKEN_RE = re.compile(r"osk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
#: last_used_at is written at most this often per token: a write per request would queue every
#: read behind SQLite's one writer.
_TOUCH_EVERY = 60.0
#: How long "no token exists" is believed before the table is asked again.
NO_TOKEN_TTL = 1.0
_DUMMY_HASH = hashlib.sha256(b"optiscope-no-such-token").hexdigest()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: Engine, project: str, scopes: list[str], name: str, actor: str) -> tuple[str, dict]:
    """A new token (shown once: only its hash is kept) and its row."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")
    tid = secrets.token_hex(8)
    token = f"{PREFIX}{tid}_{secrets.token_urlsafe(32)}"
    now = time.time()
    row = {
        "id": tid,
        "name": name,
        "project": project,
        "scopes": ",".join(sorted(set(scopes))),
        "secret_hash": _hash(token),
        "created_at": now,
        "created_by": actor,
    }
    with engine.begin() as conn:
        ensure_project(conn, project, now)
        conn.execute(insert(tokens).values(**row))
        write_audit(conn, actor, "token.create", project, tid, {"name": name, "scopes": row["scopes"]})
    return token, _public(row)


def revoke_token(engine: Engine, token_id: str, actor: str) -> dict:
    now = time.time()
    with engine.begin() as conn:
        row = conn.execute(select(tokens).where(tokens.c.id == token_id)).mappings().first()
        if row is None:
            raise LookupError(token_id)
        if row["revoked_at"] is None:
            conn.execute(update(tokens).where(tokens.c.id == token_id).values(revoked_at=now))
            write_audit(conn, actor, "token.revoke", row["project"], token_id, {"name": row["name"]})
        return _public(conn.execute(select(tokens).where(tokens.c.id == token_id)).mappings().one())


def list_tokens(engine: Engine, project: str | None = None) -> list[dict]:
    q = select(tokens).order_by(tokens.c.created_at)
    if project is not None:
        q = q.where(tokens.c.project == project)
    with engine.connect() as conn:
        return [_public(r) for r in conn.execute(q).mappings()]


def _public(row) -> dict:
    return {k: v for k, v in dict(row).items() if k != "secret_hash"}


class Verifier:
    """Checks bearer tokens against the table. Revocation is seen by the next request: rows are
    read on every call (one primary-key lookup), never cached."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._touched: dict[str, float] = {}
        self._seen_token = False
        self._asked_at = -1e18

    def any_token(self) -> bool:
        """Whether a token was ever made here: from then on every request needs one (revoking the
        last token must not open the collector to everyone). Rows are never deleted, so a yes is
        remembered; a no is asked again at most once a second (``optiscope token create`` may run
        at any time: the open collector closes within a second of it), not on every request."""
        now = time.monotonic()
        if not self._seen_token and now - self._asked_at >= NO_TOKEN_TTL:
            with self.engine.connect() as conn:
                self._seen_token = conn.execute(select(tokens.c.id).limit(1)).first() is not None
            self._asked_at = now
        return self._seen_token

    def verify(self, token: str) -> Principal | None:
        m = TOKEN_RE.fullmatch(token)
        row = None
        if m:
            with self.engine.connect() as conn:
                row = conn.execute(
                    select(
                        tokens.c.id,
                        tokens.c.name,
                        tokens.c.project,
                        tokens.c.scopes,
                        tokens.c.secret_hash,
                        tokens.c.revoked_at,
                    ).where(tokens.c.id == m.group(1))
                ).first()
        # Compare even when there is no row, so a miss takes as long as a wrong secret.
        ok = hmac.compare_digest(_hash(token), row.secret_hash if row is not None else _DUMMY_HASH)
        if not ok or row is None or row.revoked_at is not None:
            return None
        self._touch(row.id)
        return Principal(f"token:{row.id} ({row.name})", row.project, frozenset(row.scopes.split(",")))

    def _touch(self, token_id: str) -> None:
        now = time.time()
        if now - self._touched.get(token_id, 0.0) < _TOUCH_EVERY:
            return
        self._touched[token_id] = now
        with self.engine.begin() as conn:
            conn.execute(update(tokens).where(tokens.c.id == token_id).values(last_used_at=now))
