"""Standard Webhooks v1, both ends: the receiver signs its notifications, an app verifies them.

The signature is `v1,<base64 HMAC-SHA256>` over `{webhook-id}.{webhook-timestamp}.{body}` with the key
that the `whsec_…` secret carries in base64. Several secrets (rotation) give several signatures,
space-separated; a receiving app accepts the message when any of them matches one of its secrets.
This module needs nothing but the standard library, so `receiver.client` can use it in any app.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

TOLERANCE = 300  # seconds a notification's timestamp may be off, either way (as the reference libraries)
MIN_SECRET_BYTES = 24  # the least key a whsec_ secret may carry (RECEIVER_NOTIFY_SECRET is checked at start)
# webhook-timestamp: seconds since the epoch in ASCII digits, few enough to be a time at all (int() also
# takes spaces, underscores and other scripts' digits, and a 300-digit number overflows a float).
TIMESTAMP = re.compile(r"[0-9]{1,12}")


class NotificationError(ValueError):
    """A notification that did not verify: missing headers, a stale timestamp, or no matching signature."""


def secret_bytes(secret: str) -> bytes:
    """The HMAC key in a `whsec_<base64>` secret (the prefix is optional)."""
    text = secret.strip().removeprefix("whsec_")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:  # binascii.Error, or text that is not ASCII
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if not key:
        raise ValueError("an empty webhook secret")
    return key


def _sign(key: bytes, message_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


class WebhookSigner:
    """Signs with every given secret."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one whsec_ secret is needed")
        self._keys = [secret_bytes(secret) for secret in secrets]

    def signature(self, message_id: str, timestamp: int, body: bytes) -> str:
        return " ".join(
            "v1," + base64.b64encode(_sign(key, message_id, str(timestamp), body)).decode()
            for key in self._keys
        )

    def headers(self, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        return {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(message_id, timestamp, body),
        }


def verify_notification(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str | Sequence[str],
    *,
    tolerance: float = TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """The notification's JSON once its signature and timestamp check out; NotificationError otherwise.

    `headers` is the request's headers (any mapping; names are matched case-insensitively), `body` the
    raw bytes as received (not re-serialised JSON), `secret` the receiver's RECEIVER_NOTIFY_SECRET (or
    several, during a rotation). Signatures are compared in constant time.
    """
    lowered = {str(name).lower(): value for name, value in headers.items()}
    message_id = lowered.get("webhook-id", "")
    timestamp = lowered.get("webhook-timestamp", "")
    signatures = lowered.get("webhook-signature", "")
    if not all(isinstance(value, str) for value in (message_id, timestamp, signatures)):
        raise NotificationError("webhook-id, webhook-timestamp and webhook-signature must be text")
    if not message_id or not timestamp or not signatures:
        raise NotificationError("webhook-id, webhook-timestamp and webhook-signature are required")
    if not TIMESTAMP.fullmatch(timestamp):
        raise NotificationError("webhook-timestamp is not a number of seconds")
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        raise NotificationError("webhook-timestamp is too far from now (a replay or a wrong clock)")
    try:
        signed = f"{message_id}.{timestamp}.".encode()
        raw = body.encode() if isinstance(body, str) else bytes(body)
    except UnicodeEncodeError:
        raise NotificationError("webhook-id or the body is not UTF-8 text") from None
    keys = [secret_bytes(one) for one in ([secret] if isinstance(secret, str) else secret)]
    expected = [hmac.new(key, signed + raw, hashlib.sha256).digest() for key in keys]
    matched = False
    for candidate in signatures.split():
        version, _, encoded = candidate.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except ValueError:  # binascii.Error, or text that is not ASCII
            continue
        for digest in expected:
            # Every pair is compared (no early exit), each in constant time.
            matched |= hmac.compare_digest(digest, given)
    if not matched:
        raise NotificationError("no webhook-signature matches the secret")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise NotificationError("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise NotificationError("the body is not a JSON object")
    return payload
