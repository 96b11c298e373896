"""Access control: principals and scopes, API tokens and their verifier."""

from .principals import OPEN, ROOT, SCOPES, Principal, loopback_host
from .tokens import Verifier, create_token, list_tokens, revoke_token

__all__ = [
    "OPEN",
    "ROOT",
    "SCOPES",
    "Principal",
    "Verifier",
    "create_token",
    "list_tokens",
    "loopback_host",
    "revoke_token",
]
