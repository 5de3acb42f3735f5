"""A stored task as the API shows it, and as a provider sees it."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import overload

from receiver.models import ErrorCode
from receiver.models import Status
from receiver.models import TaskSpec
from receiver.routes import url_path
from receiver.schema import Attempt
from receiver.schema import Cost
from receiver.schema import Event
from receiver.schema import Image
from receiver.schema import ImageType
from receiver.schema import ProviderName
from receiver.schema import Task
from receiver.schema import TaskFailure
from receiver.store.records import EventRecord
from receiver.store.records import ImageRecord
from receiver.store.records import TaskRecord
from receiver.store.records import TaskView
from receiver.tokens import Tokens

UPLOAD_PREFIX = "upload:"


@overload
def iso(timestamp: float) -> str: ...
@overload
def iso(timestamp: float | None) -> str | None: ...
def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def image_path(task_id: str, index: int) -> str:
    return url_path("task_image", id=task_id, index=index)


def render_task(row: TaskView, images: Sequence[ImageRecord], tokens: Tokens) -> Task:
    """The task of CONTRACT.md; images appear once they are stored, each with a signed link."""
    return Task(
        id=row.id,
        status=Status(row.status),
        provider=ProviderName(row.provider),
        model=row.model,
        prompt=row.prompt,
        provider_task_id=row.provider_task_id,
        images=[_image(row.id, image, tokens) for image in images if image.path is not None],
        error=_failure(row.error) if row.error else None,
        fallback=[ProviderName(name) for name in remaining_fallback(row)],
        attempts=[
            Attempt(
                provider=ProviderName(attempt["provider"]),
                model=attempt["model"],
                provider_task_id=attempt["provider_task_id"],
                error=_failure(attempt["error"]),
                at=iso(attempt["at"]),
            )
            for attempt in row.attempts
        ],
        metadata=dict(row.metadata),
        created_at=iso(row.created_at),
        updated_at=iso(row.updated_at),
        completed_at=iso(row.completed_at),
        cost=_cost(row),
    )


def _cost(row: TaskView) -> Cost | None:
    """What the task cost, once it ended (a charge the provider reported with its result is kept from
    then, but shown only at the end, when it is the task's final cost)."""
    if row.cost_usd is None or row.completed_at is None:
        return None
    return Cost(usd=row.cost_usd, source="provider" if row.cost_source == "provider" else "price")


def _image(task_id: str, image: ImageRecord, tokens: Tokens) -> Image:
    """A stored image: once its file is there, its type, size and hash are known too."""
    assert image.content_type is not None and image.size is not None and image.sha256 is not None
    return Image(
        index=image.idx,
        url=tokens.signed_link(image_path(task_id, image.idx)),
        content_type=ImageType(image.content_type),
        size=image.size,
        sha256=image.sha256,
        width=image.width,
        height=image.height,
        source_url=image.source_url,
    )


def _failure(error: Mapping[str, Any]) -> TaskFailure:
    return TaskFailure(ErrorCode(error["code"]), error["message"], error.get("provider_code"))


def remaining_fallback(row: TaskView) -> list[str]:
    """The providers still ahead of the task: its chain, less the hops already made."""
    return list(row.fallback[len(row.attempts) :])


def render_event(row: EventRecord) -> Event:
    return Event(
        id=row.id,
        at=iso(row.at),
        kind=row.kind,
        verified=row.verified,
        summary=row.summary,
        change=row.change,
        detail=row.detail,
        repeats=row.repeats or 1,  # refused callbacks in a row are one event
    )


def uploads_of(row: TaskRecord) -> list[str]:
    """The names of our own uploads among the task's input images."""
    refs = row.request.get("images", [])
    return [ref[len(UPLOAD_PREFIX) :] for ref in refs if ref.startswith(UPLOAD_PREFIX)]


def task_spec(
    row: TaskRecord, tokens: Tokens | None = None, inline: Mapping[str, bytes] | None = None
) -> TaskSpec:
    """What the provider sees. With `tokens`, our uploads become signed links, or data URIs of the
    bytes in `inline` (upload name -> bytes) for a provider that takes images inline."""
    request = row.request
    images: list[str] = []
    for ref in request.get("images", []):
        if not ref.startswith(UPLOAD_PREFIX) or tokens is None:
            images.append(ref)
            continue
        name = ref[len(UPLOAD_PREFIX) :]
        if inline is not None and name in inline:
            images.append(data_uri(name, inline[name]))
        else:
            images.append(tokens.signed_link(url_path("get_upload", name=name)))
    return TaskSpec(
        id=row.id,
        model=row.model,
        prompt=row.prompt,
        images=tuple(images),
        params=request.get("params", {}),
        options=request.get("options", {}),
        provider_task_id=row.provider_task_id,
        state=dict(row.provider_state),
        image_sizes=tuple((size[0], size[1]) if size else None for size in request.get("image_sizes", ())),
    )


def upload_type(name: str) -> str:
    return {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}[name.rsplit(".", 1)[-1]]


def data_uri(name: str, data: bytes) -> str:
    return f"data:{upload_type(name)};base64,{base64.b64encode(data).decode()}"
