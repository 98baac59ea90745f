"""Shopper tokens: which shopper a browser's events may speak for (``POST /v1/events``).

A site's backend, which knows who the shopper is, signs the shopper's id and an expiry with the
site's secret (``collector.site_secrets[site]``) and puts the token in the page; the tracker sends it
with every batch, and the collector accepts only events of that user id. The format, for a backend in
any language::

    payload = "lcs1." + base64url(user_id, no padding) + "." + expiry (epoch seconds, decimal)
    token   = payload + "." + base64url(HMAC-SHA256(key=secret, msg=payload), no padding)

In Python: ``from stream.access.shopper_token import sign_shopper_token``; from a shell:
``livecopy keys shopper-token --site SITE --user U``. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass

from core.contracts import is_user_id

VERSION = "lcs1"
MAX_TOKEN_CHARS = 512


@dataclass(frozen=True)
class Shopper:
    user_id: str
    expires_s: int


class BadToken(ValueError):
    """A token that names no shopper; ``reason``: ``malformed``, ``bad_signature``, ``expired``, ``too_long_lived``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())


def sign_shopper_token(secret: str, user_id: str, ttl_s: int = 24 * 3600, now_s: float | None = None) -> str:
    """A token letting a page report ``user_id``'s events until now + ``ttl_s``."""
    if not secret:
        raise ValueError("the site's secret is empty")
    if not is_user_id(user_id):
        raise ValueError("user_id must be 1-128 chars of [A-Za-z0-9_.:@-]")
    expires = int((time.time() if now_s is None else now_s) + ttl_s)
    payload = f"{VERSION}.{_b64(user_id.encode())}.{expires}"
    return f"{payload}.{_mac(secret, payload)}"


def verify_shopper_token(secret: str, token: str, now_s: float | None = None,
                         max_ttl_s: int | None = None) -> Shopper:
    """The shopper ``token`` names, if ``secret`` signed it and it has not expired; raises ``BadToken``.
    ``max_ttl_s``: a token expiring further ahead than this is refused too (a leaked long-lived token)."""
    if not secret or len(token) > MAX_TOKEN_CHARS:
        raise BadToken("malformed", "not a shopper token")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != VERSION or not parts[2].isdigit():
        raise BadToken("malformed", "not a shopper token")
    payload = ".".join(parts[:3])
    if not hmac.compare_digest(_mac(secret, payload), parts[3]):
        raise BadToken("bad_signature", "the shopper token's signature does not match")
    try:
        user_id = _unb64(parts[1]).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadToken("malformed", "the shopper token's user id is not base64url") from None
    if not is_user_id(user_id):
        raise BadToken("malformed", "the shopper token's user id is not a valid user id")
    expires = int(parts[2])
    now = time.time() if now_s is None else now_s
    if expires <= now:
        raise BadToken("expired", "the shopper token has expired")
    if max_ttl_s is not None and expires > now + max_ttl_s:
        raise BadToken("too_long_lived", f"the shopper token expires more than {max_ttl_s} s ahead")
    return Shopper(user_id, expires)
