"""The route table: each path this service answers for apps and providers, named and described once.

`create_app` turns `ENDPOINTS` into Starlette routes (the name is the handler's), `openapi_document`
walks those routes for the public document (as Starlette's `SchemaGenerator` walks a router), and every
URL of ours is built from a name by Starlette's `url_path_for` (`url_path`), never formatted by hand.
An endpoint's `Operation` is what a type cannot say: its id, tag, summary, answers and examples; its
query and header parameters are the Structs in `receiver.schema` that also parse them.
The sandbox's and the console's static routes are declared in their own modules, out of the document.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.routing import Router

from receiver import schema
from receiver.models import ErrorCode
from receiver.models import Status

REF = "#/components/schemas/{name}"
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
BINARY = {"schema": {"type": "string", "format": "binary"}}
# An image is served with its own type; application/octet-stream is listed too (first), since that is
# how client generators (openapi-python-client with its defaults) know a body of raw bytes.
IMAGE_CONTENT = {"application/octet-stream": BINARY, **{kind.value: BINARY for kind in schema.ImageType}}
# One entry, not one per image type: client generators (openapi-python-client) emit broken code for an
# operation whose body has several raw media types. The image types it takes are in the description.
UPLOAD_CONTENT = {"application/octet-stream": BINARY}

EXAMPLE_TASK = schema.Task(
    id="tsk_5f0c6a1e9b2d4c7a8e3f1b2c",
    status=Status.SUCCEEDED,
    provider=schema.ProviderName.FAL,
    model="flux-kontext-pro",
    prompt="Put a donut next to the flour",
    provider_task_id="764cabcf-b745-4b3e-ae38-1200304cf45b",
    images=[
        schema.Image(
            index=0,
            url="https://receiver.example.org/v1/tasks/tsk_5f0c6a1e9b2d4c7a8e3f1b2c/images/0"
            "?expires=1767225600&signature=3Ch2Xx8a",
            content_type=schema.ImageType.PNG,
            size=1482213,
            sha256="9f2c1d0b7a4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5061728394a5b6c7d8e",
            width=1024,
            height=768,
            source_url="https://v3.fal.media/files/rabbit/result.png",
            expired=False,
        )
    ],
    error=None,
    fallback=[],
    attempts=[],
    metadata={"order": 4711},
    created_at="2026-05-01T12:00:00.000Z",
    updated_at="2026-05-01T12:00:09.250Z",
    completed_at="2026-05-01T12:00:09.250Z",
    cost=schema.Cost(usd=0.04, source="price"),
)
EXAMPLE_QUEUED = msgspec.structs.replace(
    EXAMPLE_TASK,
    status=Status.QUEUED,
    provider_task_id=None,
    images=[],
    updated_at=EXAMPLE_TASK.created_at,
    completed_at=None,
    cost=None,
)
EXAMPLE_FAILED = msgspec.structs.replace(
    EXAMPLE_TASK,
    status=Status.FAILED,
    images=[],
    error=schema.TaskFailure(ErrorCode.CONTENT_MODERATED, "the prompt was flagged", "nsfw"),
)
EXAMPLE_CANCELLED = msgspec.structs.replace(
    EXAMPLE_QUEUED, status=Status.CANCELLED, completed_at=EXAMPLE_TASK.updated_at
)
EXAMPLE_CREATE = {
    "provider": "fal",
    "model": "flux-kontext-pro",
    "prompt": "Put a donut next to the flour",
    "images": ["https://images.example.org/kitchen.png"],
    "aspect_ratio": "16:9",
    "notify_url": "https://app.example.org/hooks/images",
    "metadata": {"order": 4711},
}
EXAMPLE_ERROR = schema.ErrorBody(
    schema.ErrorDetail("invalid", "the request has invalid fields", {"prompt": "required"})
)


def ref(model: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": REF.format(name=model.__name__)}


def answer(model: type[msgspec.Struct], description: str, example: Any = None) -> dict[str, Any]:
    """A JSON answer of `model`'s schema."""
    media: dict[str, Any] = {"schema": ref(model)}
    if example is not None:
        media["example"] = msgspec.to_builtins(example)
    return {"description": description, "content": {"application/json": media}}


def error(description: str) -> dict[str, Any]:
    return answer(schema.ErrorBody, description)


def json_body(model: type[msgspec.Struct]) -> dict[str, Any]:
    """A required JSON request body of `model`'s schema."""
    return {"required": True, "content": {"application/json": {"schema": ref(model)}}}


UNAUTHORIZED = {"401": error("no valid `Authorization: Bearer <key>` (answered with WWW-Authenticate)")}
NOT_FOUND = {"404": error("no such task for this tenant")}
ADMIN_ONLY = {
    "401": error("not the RECEIVER_ADMIN_KEY as a bearer key"),
    "404": error("no such key, or the admin API is off (RECEIVER_ADMIN_KEY unset)"),
}
INVALID = {"422": error("invalid fields, each named in error.fields")}
ADMIN_BODY_ERRORS = {
    "400": error("the body is not a JSON object (code invalid_json)"),
    **ADMIN_ONLY,
    "413": error("the body is over the size cap"),
    **INVALID,
}
IMAGE_ANSWER = {
    "description": "the stored bytes",
    "headers": {
        "ETag": {"schema": {"type": "string"}, "description": "the sha256, quoted"},
        "X-Content-Type-Options": {"schema": {"type": "string", "const": "nosniff"}},
    },
    "content": IMAGE_CONTENT,
}
NOT_MODIFIED = {"304": {"description": "not modified (If-None-Match matched the ETag)"}}
# A path parameter's schema, where it says more than "a string" (an `{x:int}` one is an integer).
PATH_SCHEMAS: Mapping[str, dict[str, Any]] = {
    "id": {"type": "string", "pattern": schema.TASK_ID_PATTERN},
    "key_id": {"type": "string", "pattern": schema.KEY_ID_PATTERN},
}


@dataclass(frozen=True)
class Operation:
    """An endpoint as the OpenAPI document describes it, beside what its types already say."""

    id: str
    tag: str
    summary: str
    responses: Mapping[str, Any]
    description: str | None = None
    query: type[msgspec.Struct] | None = None  # the Struct its handler parses the query string with
    headers: type[msgspec.Struct] | None = None  # the same for request headers
    body: Mapping[str, Any] | None = None  # the requestBody object
    security: list[dict[str, list[str]]] | None = None  # None: the document's (a bearer key)


@dataclass(frozen=True)
class Endpoint:
    name: str  # the route's name, for url_path_for; also the handler's
    path: str
    method: str
    operation: Operation | None = None  # None: served, but not for apps (out of the document)
    every_role: bool = False  # answered by a worker-only process too (health checks, metrics)


ENDPOINTS: tuple[Endpoint, ...] = (
    # For providers, not for apps: out of the public OpenAPI document. First, so the busiest path is
    # matched without trying every other route's pattern before it (no other path overlaps).
    Endpoint("callback", "/callbacks/{provider}/{token}", "POST"),
    Endpoint("callback_suffixed", "/callbacks/{provider}/{token}/callback", "POST"),
    Endpoint(
        "create_task",
        "/v1/tasks",
        "POST",
        Operation(
            "createTask",
            "tasks",
            "Create a task",
            description="Records the task and submits it to the provider; the answer does not wait "
            "for the image. Bodies over the size cap are a 413.",
            headers=schema.CreateHeaders,
            body={
                "required": True,
                "content": {
                    "application/json": {"schema": ref(schema.TaskCreate), "example": EXAMPLE_CREATE}
                },
            },
            responses={
                "202": {
                    **answer(schema.Task, "accepted", EXAMPLE_QUEUED),
                    "headers": {"Location": {"schema": {"type": "string"}, "description": "the task"}},
                },
                "200": answer(schema.Task, "the same Idempotency-Key and body again: the same task"),
                "400": error("the body is not a JSON object (code invalid_json)"),
                **UNAUTHORIZED,
                "402": error(
                    "the key's budget would be passed (code budget_exceeded, with remaining_usd); nothing "
                    "was submitted"
                ),
                "409": error("the same Idempotency-Key with another body"),
                "413": error("the body is over the size cap"),
                "429": {
                    **error("the key's rate_per_minute is used up (code rate_limited)"),
                    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
                },
                "422": answer(schema.ErrorBody, "invalid fields, each named in error.fields", EXAMPLE_ERROR),
            },
        ),
    ),
    Endpoint(
        "list_tasks",
        "/v1/tasks",
        "GET",
        Operation(
            "listTasks",
            "tasks",
            "List tasks, newest first",
            query=schema.ListQuery,
            responses={"200": answer(schema.TaskPage, "a page of tasks"), **UNAUTHORIZED, **INVALID},
        ),
    ),
    Endpoint(
        "get_task",
        "/v1/tasks/{id}",
        "GET",
        Operation(
            "getTask",
            "tasks",
            "A task; with wait, the answer waits until it ends or N seconds pass",
            query=schema.WaitQuery,
            responses={
                "200": answer(schema.Task, "the task", EXAMPLE_TASK),
                **UNAUTHORIZED,
                **NOT_FOUND,
                **INVALID,
            },
        ),
    ),
    Endpoint(
        "cancel_task",
        "/v1/tasks/{id}/cancel",
        "POST",
        Operation(
            "cancelTask",
            "tasks",
            "Cancel a task that has not ended",
            description="The task ends at once as `cancelled` (`error` null, `completed_at` set): a queued "
            "task is never submitted; a submitted one is cancelled at the provider where the provider "
            "offers it (fal's queue does), else left to run there unheeded. Later callbacks are recorded "
            "as events and change nothing, nothing more is downloaded, and the app is notified once "
            "with `task.cancelled`.",
            responses={
                "200": answer(schema.Task, "the task, now cancelled", EXAMPLE_CANCELLED),
                **UNAUTHORIZED,
                **NOT_FOUND,
                "409": error("the task has already ended (code task_ended)"),
            },
        ),
    ),
    Endpoint(
        "delete_task",
        "/v1/tasks/{id}",
        "DELETE",
        Operation(
            "deleteTask",
            "tasks",
            "Delete an ended task with its images and events",
            description="Removes the task at once with its stored images (their bytes too), its events "
            "and any notification still due; a later lookup is a 404.",
            responses={
                "204": {"description": "deleted"},
                **UNAUTHORIZED,
                **NOT_FOUND,
                "409": error("the task has not ended: cancel it first (code task_active)"),
            },
        ),
    ),
    Endpoint(
        "task_events",
        "/v1/tasks/{id}/events",
        "GET",
        Operation(
            "listTaskEvents",
            "tasks",
            "Every callback, poll, download and notification of the task, oldest first",
            query=schema.EventsQuery,
            responses={
                "200": answer(schema.EventPage, "a page of events"),
                **UNAUTHORIZED,
                **NOT_FOUND,
                **INVALID,
            },
        ),
    ),
    Endpoint(
        "task_image",
        "/v1/tasks/{id}/images/{index:int}",
        "GET",
        Operation(
            "getTaskImage",
            "images",
            "A stored image: with the owner's bearer key, or as the signed link in `url`",
            query=schema.LinkQuery,
            security=[*BEARER, {}],
            responses={
                "200": IMAGE_ANSWER,
                **NOT_MODIFIED,
                **UNAUTHORIZED,
                "404": error("no such task or image (yet)"),
                "410": error("`image_expired`: the image is past RECEIVER_RETAIN_IMAGES, its bytes deleted"),
            },
        ),
    ),
    Endpoint(
        "create_upload",
        "/v1/uploads",
        "POST",
        Operation(
            "createUpload",
            "uploads",
            "Upload an image for use in a task's `images`",
            description="The body is the image's raw bytes, PNG, JPEG or WebP (told apart by their "
            "first bytes, not by the header), sent with Content-Type image/png, image/jpeg, image/webp "
            "or application/octet-stream; anything else is a 415.",
            body={"required": True, "content": UPLOAD_CONTENT},
            responses={
                "201": answer(schema.Upload, "stored"),
                **UNAUTHORIZED,
                "413": error("over RECEIVER_MAX_IMAGE_BYTES"),
                "415": error("the Content-Type or the bytes are not PNG, JPEG or WebP"),
            },
        ),
    ),
    Endpoint(
        "get_upload",
        "/uploads/{name}",
        "GET",
        Operation(
            "getUpload",
            "uploads",
            "An uploaded image, by its signed link",
            query=schema.LinkQuery,
            security=[],
            responses={
                "200": IMAGE_ANSWER,
                "401": error("the link is not signed, or has expired"),
                "404": error("no such upload"),
            },
        ),
    ),
    Endpoint(
        "list_providers",
        "/v1/providers",
        "GET",
        Operation(
            "listProviders",
            "providers",
            "The providers this deployment offers (key set, and the sandbox)",
            responses={"200": answer(schema.ProviderList, "the providers"), **UNAUTHORIZED},
        ),
    ),
    Endpoint(
        "usage",
        "/v1/usage",
        "GET",
        Operation(
            "getUsage",
            "usage",
            "The calling tenant's tasks and spend, in all and grouped",
            description="Tasks created in [from, to); a task still running counts by its estimate.",
            query=schema.UsageQuery,
            responses={"200": answer(schema.Usage, "the usage"), **UNAUTHORIZED, **INVALID},
        ),
    ),
    Endpoint(
        "create_key",
        "/v1/admin/keys",
        "POST",
        Operation(
            "createKey",
            "admin",
            "Create a key for a tenant: the answer shows its secret, this once",
            body=json_body(schema.KeyCreate),
            responses={
                "201": answer(schema.NewApiKey, "created"),
                **ADMIN_BODY_ERRORS,
            },
        ),
    ),
    Endpoint(
        "list_keys",
        "/v1/admin/keys",
        "GET",
        Operation(
            "listKeys",
            "admin",
            "Every key kept in the database (never a secret)",
            responses={"200": answer(schema.KeyList, "the keys"), **ADMIN_ONLY},
        ),
    ),
    Endpoint(
        "change_key",
        "/v1/admin/keys/{key_id}",
        "PATCH",
        Operation(
            "changeKey",
            "admin",
            "Change a key's name, budget, period, rate or disabled (null clears)",
            body=json_body(schema.KeyChange),
            responses={
                "200": answer(schema.ApiKey, "changed"),
                **ADMIN_BODY_ERRORS,
            },
        ),
    ),
    Endpoint(
        "delete_key",
        "/v1/admin/keys/{key_id}",
        "DELETE",
        Operation(
            "deleteKey",
            "admin",
            "Revoke a key: refused on every replica within a second",
            responses={"204": {"description": "revoked"}, **ADMIN_ONLY},
        ),
    ),
    Endpoint(
        "admin_usage",
        "/v1/admin/usage",
        "GET",
        Operation(
            "getAdminUsage",
            "admin",
            "Any tenant's usage (tenant=), or every tenant's (group_by=tenant groups them)",
            query=schema.AdminUsageQuery,
            responses={"200": answer(schema.Usage, "the usage"), **ADMIN_ONLY, **INVALID},
        ),
    ),
    Endpoint(
        "healthz",
        "/healthz",
        "GET",
        Operation(
            "health",
            "service",
            "The process is alive",
            security=[],
            responses={"200": answer(schema.Health, "alive")},
        ),
        every_role=True,
    ),
    Endpoint(
        "readyz",
        "/readyz",
        "GET",
        Operation(
            "readiness",
            "service",
            "The database and the media store both work",
            security=[],
            responses={
                "200": answer(schema.Readiness, "ready"),
                "503": answer(schema.Readiness, "not ready, with the problems"),
            },
        ),
        every_role=True,
    ),
    Endpoint(
        "openapi",
        "/openapi.json",
        "GET",
        Operation(
            "openapiDocument",
            "service",
            "This document",
            security=[],
            responses={
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {
                        "application/json": {"schema": {"type": "object", "additionalProperties": True}}
                    },
                }
            },
        ),
    ),
    Endpoint("metrics", "/metrics", "GET", every_role=True),  # for Prometheus
)
OPERATIONS: Mapping[str, Operation] = {e.name: e.operation for e in ENDPOINTS if e.operation is not None}


def routes(endpoints: Mapping[str, Any], *, every_role_only: bool = False) -> list[Route]:
    """Starlette routes for `ENDPOINTS`, each answered by `endpoints[name]` (a KeyError names one left
    without a handler). `every_role_only`: just those a worker-only process answers."""
    return [
        Route(
            e.path,
            endpoints[e.name],
            methods=[e.method],
            name=e.name,
            include_in_schema=e.operation is not None,
        )
        for e in ENDPOINTS
        if e.every_role or not every_role_only
    ]


async def _unserved(request: Request) -> Response:  # the table below builds URLs; it answers nothing
    raise NotImplementedError


TABLE = Router(routes({e.name: _unserved for e in ENDPOINTS}))


def url_path(route: str, /, **params: Any) -> str:
    """The path of the route named `route` with `params` filled in: Starlette's `url_path_for` on the route
    table create_app serves (e.g. `url_path("task_image", id=task_id, index=0)`)."""
    return str(TABLE.url_path_for(route, **params))
