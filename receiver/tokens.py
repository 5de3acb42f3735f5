"""Callback tokens and signed links, both itsdangerous signatures under RECEIVER_SECRET_KEY.

A callback token names one task, the provider it was given to and the hop of the task's fallback chain
it was given for (`tsk_….0.<signature>`); it never expires (providers retry for hours). Each provider's
tokens are signed with their own salt, so one provider's token on another provider's route fails its
signature: a provider the task has left cannot finish it at the next one. A signed link names a path
and an expiry time, under a salt of its own, so neither kind can stand in for the other.

Tokens from before tokens were bound (`tsk_….<signature>`, the task alone) still verify, as `hop` None;
callbacks.py decides what such a token may still do.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlencode

from itsdangerous import Signer
from itsdangerous.encoding import base64_encode

from receiver.routes import url_path

# An expiry time: ASCII digits, few enough for int() (str.isdigit() also takes '²').
EXPIRES = re.compile(r"[0-9]{1,18}")
# A hop in a callback token: the chain holds at most a handful of providers.
HOP = re.compile(r"[0-9]{1,3}")
LEGACY_SALT = "receiver.callback"


@dataclass(frozen=True)
class CallbackClaim:
    """What a verified callback token says: the task, and the hop it was issued for (None: a token
    issued before tokens named their provider and hop)."""

    task_id: str
    hop: int | None


class Tokens:
    def __init__(self, secret_key: str, public_url: str, link_ttl: int) -> None:
        self._secret_key = secret_key
        self._link = Signer(secret_key, salt="receiver.link", digest_method=hashlib.sha256)
        self._public_url = public_url
        self._link_ttl = link_ttl
        # Each salt's signer and the key itsdangerous derives for it: derived once, not on every check.
        self._signers: dict[str, tuple[Signer, bytes]] = {}
        # A verified token is cached (providers retry), keyed by its route's provider and exact text.
        self._verified: OrderedDict[tuple[str, str], CallbackClaim] = OrderedDict()

    def _signer(self, salt: str) -> tuple[Signer, bytes]:
        known = self._signers.get(salt)
        if known is None:
            signer = Signer(self._secret_key, salt=salt, digest_method=hashlib.sha256)
            known = self._signers[salt] = (signer, signer.derive_key())
        return known

    def callback_token(self, provider: str, task_id: str, hop: int) -> str:
        signer, _ = self._signer(f"receiver.callback.{provider}")
        return signer.sign(f"{task_id}.{hop}").decode()

    def callback_url(self, provider: str, task_id: str, hop: int = 0) -> str:
        return self._public_url + url_path(
            "callback", provider=provider, token=self.callback_token(provider, task_id, hop)
        )

    def callback_of(self, provider: str, token: str) -> CallbackClaim | None:
        """What a token posted to `provider`'s route names, or None when it is not one we gave that
        provider (a token of another provider, a forged or changed one)."""
        cached = self._verified.get((provider, token))
        if cached is not None:
            return cached
        if not token.isascii():
            return None
        value, dot, _ = token.rpartition(".")
        if not dot:
            return None
        task_id, dot, hop = value.rpartition(".")
        claim = None
        if dot and HOP.fullmatch(hop) and self._signed(f"receiver.callback.{provider}", value, token):
            claim = CallbackClaim(task_id, int(hop))
        elif self._signed(LEGACY_SALT, value, token):
            claim = CallbackClaim(value, None)
        if claim is None:
            return None
        self._verified[(provider, token)] = claim
        if len(self._verified) > 4096:
            self._verified.popitem(last=False)
        return claim

    def _signed(self, salt: str, value: str, token: str) -> bool:
        # One HMAC: the exact token we would issue for that value, compared whole in constant time (so
        # base64's forgiven padding or a changed character never passes).
        signer, key = self._signer(salt)
        signature = signer.algorithm.get_signature(key, value.encode())
        return hmac.compare_digest(token.encode(), f"{value}.".encode() + base64_encode(signature))

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
