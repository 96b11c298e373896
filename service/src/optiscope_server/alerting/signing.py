"""The Standard Webhooks signature (https://www.standardwebhooks.com).

Every delivery carries ``webhook-id`` (the same on every retry of it, so a receiver can drop
repeats), ``webhook-timestamp`` (unix seconds of this attempt) and ``webhook-signature``:
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` under each of the endpoint's secrets,
space-separated, so a receiver that knows either the old or the new secret verifies a delivery
during a rotation. Secrets are ``whsec_`` + base64 of 32 random bytes; the HMAC key is the decoded
bytes, as the scheme defines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _secrets
import time

SECRET_PREFIX = "whsec_"
#: During a rotation: the new secret and the one receivers may still hold.
MAX_SECRETS = 2


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode()


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """The signing primitive (checked against GitHub's published webhook test vector)."""
    return hmac.new(key, message, hashlib.sha256).digest()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac_sha256(_key(s), signed)).decode() for s in secrets)


def headers(secrets: list[str] | None, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    ts = int(time.time() if now is None else now)
    out = {"webhook-id": msg_id, "webhook-timestamp": str(ts)}
    if secrets:
        out["webhook-signature"] = signature(secrets, msg_id, ts, body)
    return out


def valid_secret(secret: str) -> bool:
    if not secret.startswith(SECRET_PREFIX):
        return False
    try:
        return 24 <= len(_key(secret)) <= 64
    except ValueError:
        return False
