"""/v1/admin for the operator (keys in the database, every tenant's usage) and /v1/usage for apps.

The admin API answers only `RECEIVER_ADMIN_KEY` as a bearer key (compared as SHA-256 digests in constant
time); any other key is a 401. Unset, /v1/admin/* is a 404: there is no admin API to find.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from datetime import UTC
from datetime import date
from datetime import datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from receiver.config import Settings
from receiver.keys import bearer
from receiver.keys import digest
from receiver.keys import new_key_id
from receiver.keys import new_secret
from receiver.logs import event
from receiver.schema import AdminUsageQuery
from receiver.schema import ApiKey
from receiver.schema import KeyChange
from receiver.schema import KeyCreate
from receiver.schema import KeyList
from receiver.schema import ModelResponse
from receiver.schema import NewApiKey
from receiver.schema import Usage
from receiver.schema import UsageGroup
from receiver.schema import UsageQuery
from receiver.schema import check
from receiver.store import Store
from receiver.store.records import KeyRecord
from receiver.tasks import iso
from receiver.web import ApiError
from receiver.web import json_object
from receiver.web import read_capped

log = logging.getLogger("receiver.admin")
MAX_ADMIN_BODY = 16 * 1024
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LAST = datetime(9999, 12, 30, tzinfo=UTC)  # a day short of the end: any zone's offset still fits


def render_key(key: KeyRecord) -> ApiKey:
    return ApiKey(
        id=key.id,
        tenant=key.tenant,
        name=key.name,
        budget_usd=key.budget_usd,
        budget_period=key.budget_period,  # type: ignore[arg-type]  # "day" | "month" | None, as kept
        rate_per_minute=key.rate_per_minute,
        disabled=key.disabled,
        created_at=iso(key.created_at),
        updated_at=iso(key.updated_at),
    )


class Admin:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.settings = settings
        key = settings.admin_key
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    def _admit(self, request: Request) -> None:
        if self._digest is None:
            raise ApiError(404, "not_found", "the admin API is off: set RECEIVER_ADMIN_KEY")
        key = bearer(request.scope)
        given = hashlib.sha256((key or "").encode()).digest()
        if key is None or not hmac.compare_digest(given, self._digest):
            raise ApiError(
                401, "unauthorized", "the admin API wants 'Authorization: Bearer <RECEIVER_ADMIN_KEY>'"
            )

    async def _body(self, request: Request) -> dict[str, Any]:
        return json_object(await read_capped(request, MAX_ADMIN_BODY, self.settings.body_timeout))

    async def create_key(self, request: Request) -> Response:
        self._admit(request)
        create, errors = check(await self._body(request), KeyCreate)
        if create is None:
            raise ApiError(422, "invalid", "the request has invalid fields", errors)
        secret = new_secret()
        key = await self.store.create_key(
            new_key_id(),
            digest(secret),
            create.tenant,
            create.name,
            create.budget_usd,
            create.budget_period,
            create.rate_per_minute,
        )
        event(log, "key created", key_id=key.id, tenant=key.tenant)  # never the secret
        shown = render_key(key)
        return ModelResponse(NewApiKey(**msgspec.structs.asdict(shown), key=secret), status_code=201)

    async def list_keys(self, request: Request) -> Response:
        self._admit(request)
        return ModelResponse(KeyList([render_key(key) for key in await self.store.keys()]))

    async def change_key(self, request: Request) -> Response:
        self._admit(request)
        change, errors = check(await self._body(request), KeyChange)
        if change is None:
            raise ApiError(422, "invalid", "the request has invalid fields", errors)
        given = {
            name: value
            for name, value in msgspec.structs.asdict(change).items()
            if value is not msgspec.UNSET
        }
        key = await self.store.change_key(request.path_params["key_id"], given)
        if key is None:
            raise ApiError(404, "not_found", "no such key")
        event(log, "key changed", key_id=key.id, tenant=key.tenant, fields=",".join(sorted(given)))
        return ModelResponse(render_key(key))

    async def delete_key(self, request: Request) -> Response:
        self._admit(request)
        key_id = request.path_params["key_id"]
        if not await self.store.delete_key(key_id):
            raise ApiError(404, "not_found", "no such key")
        event(log, "key revoked", key_id=key_id)
        return Response(status_code=204)

    async def usage(self, request: Request) -> Response:
        """Any tenant's usage (`tenant=`), or every tenant's together."""
        self._admit(request)
        query, errors = check(request.query_params, AdminUsageQuery, strict=False)
        return await usage_answer(self.store, query, errors, query.tenant if query is not None else None)


async def usage_answer(
    store: Store, query: UsageQuery | AdminUsageQuery | None, errors: dict[str, str], tenant: str | None
) -> Response:
    """The usage of `tenant` (every tenant's for None) as the query asks; a bad parameter is a 422."""
    since = until = None
    if query is not None:
        now = store.clock()
        since = _instant(query.from_, errors, "from") if query.from_ is not None else _month_start(now)
        until = _instant(query.to, errors, "to") if query.to is not None else now
        if since is not None and until is not None and until < since:
            errors["to"] = "must not be before from"
    if query is None or errors or since is None or until is None:
        raise ApiError(422, "invalid", "the query has invalid parameters", errors)
    tasks, usd, groups = await store.usage(tenant, since, until, query.group_by)
    return ModelResponse(
        Usage(
            from_=iso(since),
            to=iso(until),
            tasks=tasks,
            usd=round(usd, 6),
            groups=[UsageGroup(group, count, round(spent, 6)) for group, count, spent in groups],
        )
    )


def _month_start(now: float) -> float:
    day = datetime.fromtimestamp(now, UTC)
    return datetime(day.year, day.month, 1, tzinfo=UTC).timestamp()


def _instant(text: str, errors: dict[str, str], name: str) -> float | None:
    """An RFC 3339 date (midnight UTC) or date-time (UTC when it names no zone), as epoch seconds."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC).timestamp()
        moment = datetime.fromisoformat(text)
    except ValueError:
        errors[name] = "must be a date (2026-05-01) or a date and time (2026-05-01T12:00:00Z)"
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if not EPOCH <= moment <= LAST:
        errors[name] = "must lie between 1970 and 9999"
        return None
    return moment.timestamp()
