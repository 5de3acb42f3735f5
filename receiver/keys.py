"""Keys kept in the database (the admin API): how a secret is made, kept and recognised.

A secret is `rk_` and 32 random bytes (`secrets.token_urlsafe`), so the database keeps only its SHA-256:
a hash of that much entropy cannot be reversed or guessed, and a slow password hash (bcrypt, scrypt)
would only slow every request down. The digest is looked up by its unique index and compared again in
constant time (`Store.key_by_digest`).

Every request of an app with such a key would read the database; a cache of one second per process
keeps that to one read a second per key. A key's change or removal clears every replica's cache at once
on PostgreSQL (a notice on the store's change channel, as task changes travel); on SQLite the cache
forgets each entry after a second. Either way a revoked key is refused everywhere within a second.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

from starlette.types import ASGIApp
from starlette.types import Receive
from starlette.types import Scope
from starlette.types import Send

from receiver.store import Store
from receiver.store import StoreUnavailable
from receiver.store.records import KeyRecord
from receiver.web import error_response

KEY_PREFIX = "rk_"  # a secret of ours is recognisable (and a secret scanner can be told so)
CACHE_SECONDS = 1.0  # how long a process trusts what it read of a key (SQLite has no notices)
CACHE_SIZE = 10_000  # entries at most: garbage keys sent by the thousand cannot grow it further
SCOPE_KEY = "receiver.key"  # where the request's database key, when there is one, is put


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return f"key_{secrets.token_hex(8)}"


def digest(secret: str) -> str:
    """What the database keeps of a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyCache:
    """The database keys this process read in the last second (and those that were not there)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._seen: dict[str, tuple[float, KeyRecord | None]] = {}
        self._version = store.backend.wakeups.keys_version

    async def find(self, secret: str) -> KeyRecord | None:
        """The key with this secret, as of at most a second ago (at once after a notice)."""
        wakeups = self.store.backend.wakeups
        if wakeups.keys_version != self._version:
            self._seen.clear()
            self._version = wakeups.keys_version
        hashed = digest(secret)
        now = self.clock()
        seen = self._seen.get(hashed)
        if seen is not None and seen[0] > now:
            return seen[1]
        version = self._version
        record = await self.store.key_by_digest(hashed)
        if len(self._seen) >= CACHE_SIZE:
            self._seen.clear()
        if version == wakeups.keys_version:  # not kept if a change was heard while it was read
            self._seen[hashed] = (now + CACHE_SECONDS, record)
        return record


def bearer(scope: Scope) -> str | None:
    """The bearer key of a request, if it sent one."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" and key.strip() else None
    return None


class ResolveKeys:
    """Finds a request's database key before its handler runs (handlers check keys synchronously):
    for /v1 calls other than the admin API's, a bearer key that looks like ours is looked up and put in
    the scope under SCOPE_KEY. Whether it may do anything (disabled, which tenant) is the handler's."""

    def __init__(self, app: ASGIApp, keys: KeyCache) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/v1/") and not path.startswith("/v1/admin/"):
            key = bearer(scope)
            if key is not None and key.startswith(KEY_PREFIX):
                try:
                    record = await self.keys.find(key)
                except StoreUnavailable:
                    answer = error_response(
                        503, "database_unavailable", "the database cannot be reached right now; try again"
                    )
                    await answer(scope, receive, send)
                    return
                if record is not None:
                    scope[SCOPE_KEY] = record
        await self.app(scope, receive, send)
