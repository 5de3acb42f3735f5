"""The public OpenAPI 3.1 document, built from the Structs in `receiver.schema`.

Schemas, query and header parameters come from the same classes that validate requests and encode
answers; this module adds what a type cannot say: each operation's id, tag, summary and error answers,
the examples, and the notification under `webhooks`. Routes for providers, the sandbox, the console
and Prometheus are served with `include_in_schema=False` and stay out; a test keeps the documented
operations equal to the served ones.
"""

from __future__ import annotations

from typing import Any

import msgspec

from receiver import __version__
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

# Structs the document names; parameter Structs are spread into parameters, not kept as schemas.
MODELS: tuple[type[msgspec.Struct], ...] = (
    schema.TaskCreate,
    schema.Task,
    schema.TaskPage,
    schema.EventPage,
    schema.Upload,
    schema.ProviderList,
    schema.ErrorBody,
    schema.Health,
    schema.Readiness,
    schema.Notification,
)
PARAMETER_MODELS: tuple[type[msgspec.Struct], ...] = (
    schema.CreateHeaders,
    schema.ListQuery,
    schema.WaitQuery,
    schema.EventsQuery,
    schema.LinkQuery,
)

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
        )
    ],
    error=None,
    fallback=[],
    attempts=[],
    metadata={"order": 4711},
    created_at="2026-05-01T12:00:00.000Z",
    updated_at="2026-05-01T12:00:09.250Z",
    completed_at="2026-05-01T12:00:09.250Z",
)
EXAMPLE_QUEUED = msgspec.structs.replace(
    EXAMPLE_TASK,
    status=Status.QUEUED,
    provider_task_id=None,
    images=[],
    updated_at=EXAMPLE_TASK.created_at,
    completed_at=None,
)
EXAMPLE_FAILED = msgspec.structs.replace(
    EXAMPLE_TASK,
    status=Status.FAILED,
    images=[],
    error=schema.TaskFailure(ErrorCode.CONTENT_MODERATED, "the prompt was flagged", "nsfw"),
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


def _ref(model: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": REF.format(name=model.__name__)}


def _json(model: type[msgspec.Struct], description: str, example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": _ref(model)}
    if example is not None:
        media["example"] = msgspec.to_builtins(example)
    return {"description": description, "content": {"application/json": media}}


def _example(value: msgspec.Struct) -> dict[str, Any]:
    return {"value": msgspec.to_builtins(value)}


def _error(description: str) -> dict[str, Any]:
    return _json(schema.ErrorBody, description)


UNAUTHORIZED = {"401": _error("no valid `Authorization: Bearer <key>` (answered with WWW-Authenticate)")}
NOT_FOUND = {"404": _error("no such task for this tenant")}
INVALID = {"422": _error("invalid fields, each named in error.fields")}
TASK_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": schema.TASK_ID_PATTERN},
}


def _typed_enums(node: Any) -> Any:
    """msgspec leaves `type` off an enum; generators want `"type": "string"` beside the values."""
    if isinstance(node, dict):
        if "enum" in node and "type" not in node and all(isinstance(v, str) for v in node["enum"]):
            node["type"] = "string"
        for value in node.values():
            _typed_enums(value)
    elif isinstance(node, list):
        for value in node:
            _typed_enums(value)
    return node


def _without_null(item: dict[str, Any]) -> dict[str, Any]:
    """`X | None` as a parameter is just an optional X: a query string or header has no null."""
    options = [option for option in item.get("anyOf", ()) if option != {"type": "null"}]
    if len(options) == 1:
        item = {**{k: v for k, v in item.items() if k != "anyOf"}, **options[0]}
    return {k: v for k, v in item.items() if not (k == "default" and v is None)}


def _parameters(model: dict[str, Any], location: str) -> list[dict[str, Any]]:
    required = set(model.get("required", ()))
    parameters = []
    for name, item in model["properties"].items():
        item = _without_null(item)
        parameter: dict[str, Any] = {"name": name, "in": location, "required": name in required}
        if "description" in item:
            parameter["description"] = item.pop("description")
        parameters.append({**parameter, "schema": item})
    return parameters


def openapi_document(server_url: str) -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(MODELS + PARAMETER_MODELS, ref_template=REF)
    _typed_enums(schemas)
    header = _parameters(schemas.pop("CreateHeaders"), "header")
    list_query = _parameters(schemas.pop("ListQuery"), "query")
    wait_query = _parameters(schemas.pop("WaitQuery"), "query")
    events_query = _parameters(schemas.pop("EventsQuery"), "query")
    link_query = _parameters(schemas.pop("LinkQuery"), "query")
    image_answer = {
        "description": "the stored bytes",
        "headers": {
            "ETag": {"schema": {"type": "string"}, "description": "the sha256, quoted"},
            "X-Content-Type-Options": {"schema": {"type": "string", "const": "nosniff"}},
        },
        "content": IMAGE_CONTENT,
    }
    not_modified = {"304": {"description": "not modified (If-None-Match matched the ETag)"}}
    paths: dict[str, Any] = {
        "/v1/tasks": {
            "post": {
                "operationId": "createTask",
                "tags": ["tasks"],
                "summary": "Create a task",
                "description": "Records the task and submits it to the provider; the answer does not wait "
                "for the image. Bodies over the size cap are a 413.",
                "parameters": header,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref(schema.TaskCreate), "example": EXAMPLE_CREATE}
                    },
                },
                "responses": {
                    "202": {
                        **_json(schema.Task, "accepted", EXAMPLE_QUEUED),
                        "headers": {"Location": {"schema": {"type": "string"}, "description": "the task"}},
                    },
                    "200": _json(schema.Task, "the same Idempotency-Key and body again: the same task"),
                    "400": _error("the body is not a JSON object (code invalid_json)"),
                    **UNAUTHORIZED,
                    "409": _error("the same Idempotency-Key with another body"),
                    "413": _error("the body is over the size cap"),
                    "422": _json(
                        schema.ErrorBody, "invalid fields, each named in error.fields", EXAMPLE_ERROR
                    ),
                },
            },
            "get": {
                "operationId": "listTasks",
                "tags": ["tasks"],
                "summary": "List tasks, newest first",
                "parameters": list_query,
                "responses": {"200": _json(schema.TaskPage, "a page of tasks"), **UNAUTHORIZED, **INVALID},
            },
        },
        "/v1/tasks/{id}": {
            "get": {
                "operationId": "getTask",
                "tags": ["tasks"],
                "summary": "A task; with wait, the answer waits until it ends or N seconds pass",
                "parameters": [TASK_ID, *wait_query],
                "responses": {
                    "200": _json(schema.Task, "the task", EXAMPLE_TASK),
                    **UNAUTHORIZED,
                    **NOT_FOUND,
                    **INVALID,
                },
            }
        },
        "/v1/tasks/{id}/events": {
            "get": {
                "operationId": "listTaskEvents",
                "tags": ["tasks"],
                "summary": "Every callback, poll, download and notification of the task, oldest first",
                "parameters": [TASK_ID, *events_query],
                "responses": {
                    "200": _json(schema.EventPage, "a page of events"),
                    **UNAUTHORIZED,
                    **NOT_FOUND,
                    **INVALID,
                },
            }
        },
        "/v1/tasks/{id}/images/{index}": {
            "get": {
                "operationId": "getTaskImage",
                "tags": ["images"],
                "summary": "A stored image: with the owner's bearer key, or as the signed link in `url`",
                "security": [*BEARER, {}],
                "parameters": [
                    TASK_ID,
                    {"name": "index", "in": "path", "required": True, "schema": {"type": "integer"}},
                    *link_query,
                ],
                "responses": {
                    "200": image_answer,
                    **not_modified,
                    **UNAUTHORIZED,
                    "404": _error("no such task or image (yet)"),
                },
            }
        },
        "/v1/uploads": {
            "post": {
                "operationId": "createUpload",
                "tags": ["uploads"],
                "summary": "Upload an image for use in a task's `images`",
                "description": "The body is the image's raw bytes, PNG, JPEG or WebP (told apart by their "
                "first bytes, not by the header), sent with Content-Type image/png, image/jpeg, image/webp "
                "or application/octet-stream; anything else is a 415.",
                "requestBody": {"required": True, "content": UPLOAD_CONTENT},
                "responses": {
                    "201": _json(schema.Upload, "stored"),
                    **UNAUTHORIZED,
                    "413": _error("over RECEIVER_MAX_IMAGE_BYTES"),
                    "415": _error("the Content-Type or the bytes are not PNG, JPEG or WebP"),
                },
            }
        },
        "/uploads/{name}": {
            "get": {
                "operationId": "getUpload",
                "tags": ["uploads"],
                "summary": "An uploaded image, by its signed link",
                "security": [],
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    *link_query,
                ],
                "responses": {
                    "200": image_answer,
                    "401": _error("the link is not signed, or has expired"),
                    "404": _error("no such upload"),
                },
            }
        },
        "/v1/providers": {
            "get": {
                "operationId": "listProviders",
                "tags": ["providers"],
                "summary": "The providers this deployment offers (key set, and the sandbox)",
                "responses": {"200": _json(schema.ProviderList, "the providers"), **UNAUTHORIZED},
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "tags": ["service"],
                "summary": "The process is alive",
                "security": [],
                "responses": {"200": _json(schema.Health, "alive")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readiness",
                "tags": ["service"],
                "summary": "The database and the media store both work",
                "security": [],
                "responses": {
                    "200": _json(schema.Readiness, "ready"),
                    "503": _json(schema.Readiness, "not ready, with the problems"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapiDocument",
                "tags": ["service"],
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {
                            "application/json": {"schema": {"type": "object", "additionalProperties": True}}
                        },
                    }
                },
            }
        },
    }
    at = "2026-05-01T12:00:09.250Z"
    webhook_headers = [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}, "description": text}
        for name, text in (
            ("webhook-id", "the same on every retry of one notification"),
            ("webhook-timestamp", "seconds since the epoch"),
            ("webhook-signature", "v1,<base64 HMAC-SHA256 of id.timestamp.body> (RECEIVER_NOTIFY_SECRET)"),
        )
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "receiver",
            "version": __version__,
            "description": "FLUX image tasks with verified callbacks. Errors are "
            '`{"error": {"code", "message", "fields"}}`.',
        },
        "servers": [{"url": server_url}],
        "security": BEARER,
        "tags": [
            {"name": "tasks", "description": "Create, read, list and follow tasks"},
            {"name": "images", "description": "The stored results"},
            {"name": "uploads", "description": "Input images kept by this service"},
            {"name": "providers", "description": "What this deployment offers"},
            {"name": "service", "description": "Health and this document"},
        ],
        "paths": paths,
        "webhooks": {
            "taskEnded": {
                "post": {
                    "operationId": "taskEnded",
                    "tags": ["tasks"],
                    "summary": "Sent to a task's notify_url when it ends (Standard Webhooks signature)",
                    "security": [],
                    "parameters": webhook_headers,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": _ref(schema.Notification),
                                "examples": {
                                    "succeeded": _example(
                                        schema.Notification("task.succeeded", at, EXAMPLE_TASK)
                                    ),
                                    "failed": _example(
                                        schema.Notification("task.failed", at, EXAMPLE_FAILED)
                                    ),
                                },
                            }
                        },
                    },
                    "responses": {
                        "200": {"description": "any 2xx: received; anything else is retried for a day"},
                        "410": {"description": "Gone: no more attempts"},
                    },
                }
            }
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
