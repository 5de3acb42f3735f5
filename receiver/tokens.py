"""Callback tokens and signed links, both itsdangerous signatures under RECEIVER_SECRET_KEY.

A callback token names one task and never expires (providers retry for hours); a signed link names a
path and an expiry time. Each has its own salt, so neither can stand in for the other.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections import OrderedDict
from urllib.parse import urlencode

from itsdangerous import Signer
from itsdangerous.encoding import base64_encode

# An expiry time: ASCII digits, few enough for int() (str.isdigit() also takes '²').
EXPIRES = re.compile(r"[0-9]{1,18}")


class Tokens:
    def __init__(self, secret_key: str, public_url: str, link_ttl: int) -> None:
        self._callback = Signer(secret_key, salt="receiver.callback", digest_method=hashlib.sha256)
        self._link = Signer(secret_key, salt="receiver.link", digest_method=hashlib.sha256)
        self._public_url = public_url
        self._link_ttl = link_ttl
        # The key itsdangerous derives from the secret and salt: derived once, not on every check.
        self._callback_key = self._callback.derive_key()
        # A verified token is cached (providers retry), keyed by its exact text.
        self._verified: OrderedDict[str, str] = OrderedDict()

    def callback_token(self, task_id: str) -> str:
        return self._callback.sign(task_id).decode()

    def callback_url(self, provider: str, task_id: str) -> str:
        return f"{self._public_url}/callbacks/{provider}/{self.callback_token(task_id)}"

    def task_of(self, token: str) -> str | None:
        """The task a callback token names, or None when it is not one of ours."""
        cached = self._verified.get(token)
        if cached is not None:
            return cached
        if not token.isascii():
            return None
        task_id, dot, _ = token.rpartition(".")
        if not dot:
            return None
        # One HMAC: the exact token we would issue for that task, compared whole in constant time (so
        # base64's forgiven padding or a changed character never passes).
        signature = self._callback.algorithm.get_signature(self._callback_key, task_id.encode())
        if not hmac.compare_digest(token.encode(), f"{task_id}.".encode() + base64_encode(signature)):
            return None
        self._verified[token] = task_id
        if len(self._verified) > 4096:
            self._verified.popitem(last=False)
        return task_id

    def signed_link(self, path: str, ttl: float | None = None) -> str:
        expires = int(time.time() + (self._link_ttl if ttl is None else ttl))
        signature = self._link.get_signature(f"{path}|{expires}").decode()
        return f"{self._public_url}{path}?{urlencode({'expires': expires, 'signature': signature})}"

    def link_valid(self, path: str, expires: str | None, signature: str | None) -> bool:
        if not expires or not signature or not EXPIRES.fullmatch(expires) or not signature.isascii():
            return False
        if int(expires) < time.time():
            return False
        # Compared with the one signature we issue, not decoded: `sig=` must not pass for `sig`.
        expected = self._link.get_signature(f"{path}|{expires}".encode())
        return hmac.compare_digest(expected, signature.encode())
