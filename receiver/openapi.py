"""The OpenAPI 3.1 description of every route; a test keeps it equal to the app's routes."""

from __future__ import annotations

from typing import Any

from receiver.models import OPTIONAL_FIELDS
from receiver.models import ErrorCode
from receiver.models import Status


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "401": _json(_ref("Error"), "missing or wrong key"),
    "404": _json(_ref("Error"), "no such task for this tenant"),
    "422": _json(_ref("Error"), "invalid fields, named in error.fields"),
}
# The sandbox's own endpoints answer like a provider would: {"error": "..."} (or our Error body).
SANDBOX_ERROR = _json({"type": "object", "required": ["error"]}, "refused")
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
TASK_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document(server_url: str) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "fields"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "fields": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                }
            },
        },
        "TaskCreate": {
            "type": "object",
            "required": ["provider", "prompt"],
            "additionalProperties": False,
            "properties": {
                "provider": {"type": "string", "examples": ["sandbox", "kie", "fal"]},
                "prompt": {"type": "string", "maxLength": 10000},
                "model": {"type": "string"},
                "images": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "http(s) URLs or data:image/…;base64 URIs",
                },
                "aspect_ratio": {"type": "string"},
                "output_format": {"type": "string"},
                "seed": {"type": "integer", "minimum": 0},
                "safety_tolerance": {"type": "integer"},
                "prompt_upsampling": {"type": "boolean"},
                "resolution": {"type": "string"},
                "num_images": {"type": "integer", "minimum": 1},
                "options": {"type": "object", "description": "provider-native fields, passed through"},
                "notify_url": {"type": "string", "format": "uri"},
                "metadata": {"type": "object", "description": "echoed back, at most 16 KiB"},
                "fallback": {
                    "type": "array",
                    "items": {"type": "string"},
                    "maxItems": 4,
                    "description": "providers to move the task to, in order, when the current one refuses"
                    " it for a reason not the request's fault or fails the generation",
                },
            },
        },
        "Image": {
            "type": "object",
            "properties": {
                "index": {"type": "integer"},
                "url": {"type": "string", "description": "signed, expiring link"},
                "content_type": {"type": "string"},
                "size": {"type": "integer"},
                "sha256": {"type": "string"},
                "width": {"type": ["integer", "null"]},
                "height": {"type": ["integer", "null"]},
                "source_url": {"type": "string"},
            },
        },
        "Task": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "status": {"type": "string", "enum": [s.value for s in Status]},
                "provider": {"type": "string"},
                "model": {"type": "string"},
                "prompt": {"type": "string"},
                "provider_task_id": {"type": ["string", "null"]},
                "images": {"type": "array", "items": _ref("Image")},
                "error": {
                    "oneOf": [
                        {"type": "null"},
                        {
                            "type": "object",
                            "properties": {
                                "code": {"type": "string", "enum": [c.value for c in ErrorCode]},
                                "message": {"type": "string"},
                                "provider_code": {"type": ["string", "null"]},
                            },
                        },
                    ]
                },
                "fallback": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "the providers still ahead of the task",
                },
                "attempts": {
                    "type": "array",
                    "description": "each provider the task moved away from, in order, with its error",
                    "items": {
                        "type": "object",
                        "properties": {
                            "provider": {"type": "string"},
                            "model": {"type": "string"},
                            "provider_task_id": {"type": ["string", "null"]},
                            "error": {"type": "object"},
                            "at": {"type": "string", "format": "date-time"},
                        },
                    },
                },
                "metadata": {"type": "object"},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "completed_at": {"type": ["string", "null"], "format": "date-time"},
            },
        },
        "Event": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "at": {"type": "string", "format": "date-time"},
                "kind": {"type": "string", "examples": ["created", "submit", "callback", "poll", "download"]},
                "verified": {"type": "boolean"},
                "summary": {"type": "string"},
                "change": {"type": ["string", "null"]},
                "repeats": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "refused callbacks in a row are one event: how many came",
                },
            },
        },
        "Provider": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "models": {"type": "array", "items": {"type": "string"}},
                "default_model": {"type": "string"},
                "accepts_any_model": {"type": "boolean", "description": "other model ids are taken too"},
                "fields": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "the optional request fields it honours",
                },
                "min_images": {"type": "integer"},
                "max_images": {"type": "integer"},
                "native_models": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "the provider's own ids, also taken as given",
                },
                "other_models": {
                    "type": ["string", "null"],
                    "description": "how other native ids it takes look (accepts_any_model)",
                },
                "model_inputs": {
                    "type": "object",
                    "description": "per model: image count; the provider's id without and with images",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "min_images": {"type": "integer"},
                            "max_images": {"type": "integer"},
                            "text_to_image": {"type": ["string", "null"]},
                            "edit": {"type": ["string", "null"]},
                        },
                    },
                },
                "data_uris": {"type": "string", "enum": ["sent inline", "sent as signed links"]},
                "synchronous": {"type": "boolean", "description": "generates inside the submit call"},
                "limits": {
                    "type": "object",
                    "properties": {
                        "max_concurrent": {"type": ["integer", "null"]},
                        "max_concurrent_by_model": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                        },
                        "new_tasks_per_window": {"type": ["integer", "null"]},
                        "window_seconds": {"type": ["number", "null"]},
                        "shared_with": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "providers paced together with it (one account)",
                        },
                    },
                },
            },
        },
    }
    assert set(OPTIONAL_FIELDS) <= set(schemas["TaskCreate"]["properties"])
    signed = [
        {"name": "expires", "in": "query", "schema": {"type": "integer"}},
        {"name": "signature", "in": "query", "schema": {"type": "string"}},
    ]
    callback = {
        "post": {
            "summary": "A provider's callback; the token in the path names the task",
            "parameters": [
                {"name": "provider", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {
                "200": {"description": "verified (also a duplicate or a provider-reported failure)"},
                "400": _json(_ref("Error"), "verified, but not the provider's JSON"),
                "401": _json(_ref("Error"), "bad token or signature"),
                "413": _json(_ref("Error"), "over 1 MiB"),
            },
        }
    }
    image_bytes = {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "receiver",
            "version": "1",
            "description": "FLUX image tasks with verified callbacks",
        },
        "servers": [{"url": server_url}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/tasks": {
                "post": {
                    "summary": "Create a task",
                    "security": BEARER,
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("TaskCreate")}},
                    },
                    "responses": {
                        "202": _json(_ref("Task"), "accepted"),
                        "200": _json(_ref("Task"), "the same Idempotency-Key and body again"),
                        "409": _json(_ref("Error"), "the same Idempotency-Key with another body"),
                        **ERRORS,
                    },
                },
                "get": {
                    "summary": "List tasks, newest first",
                    "security": BEARER,
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"type": "string", "enum": [s.value for s in Status]},
                        },
                        {"name": "provider", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "items": {"type": "array", "items": _ref("Task")},
                                    "next_cursor": {"type": ["string", "null"]},
                                },
                            },
                            "a page of tasks",
                        ),
                        **ERRORS,
                    },
                },
            },
            "/v1/tasks/{id}": {
                "get": {
                    "summary": "A task; with wait, hold the answer until it ends or N seconds pass",
                    "security": BEARER,
                    "parameters": [
                        TASK_ID,
                        {
                            "name": "wait",
                            "in": "query",
                            "schema": {"type": "number", "minimum": 0, "maximum": 60},
                        },
                    ],
                    "responses": {"200": _json(_ref("Task"), "the task"), **ERRORS},
                }
            },
            "/v1/tasks/{id}/events": {
                "get": {
                    "summary": "Every callback, poll and change of the task, oldest first, a page at a time",
                    "security": BEARER,
                    "parameters": [
                        TASK_ID,
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "items": {"type": "array", "items": _ref("Event")},
                                    "next_cursor": {"type": ["string", "null"]},
                                },
                            },
                            "a page of events",
                        ),
                        **ERRORS,
                    },
                }
            },
            "/v1/tasks/{id}/images/{index}": {
                "get": {
                    "summary": "The stored image bytes (bearer key of the owner, or the signed link)",
                    "security": [*BEARER, {}],
                    "parameters": [
                        TASK_ID,
                        {"name": "index", "in": "path", "required": True, "schema": {"type": "integer"}},
                        *signed,
                    ],
                    "responses": {
                        "200": {"description": "the image", **image_bytes},
                        "304": {"description": "not modified (ETag)"},
                        **ERRORS,
                    },
                }
            },
            "/v1/uploads": {
                "post": {
                    "summary": "Upload an image for use in `images`",
                    "security": BEARER,
                    "requestBody": {"required": True, **image_bytes},
                    "responses": {
                        "201": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "url": {"type": "string"},
                                    "sha256": {"type": "string"},
                                    "content_type": {"type": "string"},
                                    "size": {"type": "integer"},
                                },
                            },
                            "stored",
                        ),
                        "413": _json(_ref("Error"), "over RECEIVER_MAX_IMAGE_BYTES"),
                        "415": _json(_ref("Error"), "not PNG, JPEG or WebP"),
                        "401": ERRORS["401"],
                    },
                }
            },
            "/uploads/{name}": {
                "get": {
                    "summary": "An uploaded image, by signed link",
                    "parameters": [
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                        *signed,
                    ],
                    "responses": {
                        "200": {"description": "the image", **image_bytes},
                        "401": ERRORS["401"],
                        "404": ERRORS["404"],
                    },
                }
            },
            "/callbacks/{provider}/{token}": callback,
            "/callbacks/{provider}/{token}/callback": callback,
            "/healthz": {"get": {"summary": "Alive", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {
                "get": {
                    "summary": "Database and media writable",
                    "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (with RECEIVER_METRICS_TOKEN set, for that bearer only)",
                    "responses": {"200": {"description": "text"}, "401": ERRORS["401"]},
                }
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "JSON"}}}
            },
            "/sandbox/v1/generate": {
                "post": {
                    "summary": "The sandbox provider's submit (used by the worker)",
                    "responses": {
                        "200": {"description": "accepted"},
                        **{status: SANDBOX_ERROR for status in ("400", "401", "408", "413", "422", "503")},
                    },
                }
            },
            "/sandbox/v1/tasks/{id}": {
                "get": {
                    "summary": "The sandbox provider's status",
                    "parameters": [TASK_ID],
                    "responses": {
                        "200": {"description": "status"},
                        **{status: SANDBOX_ERROR for status in ("401", "404", "503")},
                    },
                }
            },
            "/sandbox/files/{name}": {
                "get": {
                    "summary": "A sandbox result image",
                    "parameters": [
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {"description": "PNG"},
                        **{status: SANDBOX_ERROR for status in ("404", "503")},
                    },
                }
            },
            "/v1/providers": {
                "get": {
                    "summary": "The providers this deployment offers (key set, and the sandbox)",
                    "security": BEARER,
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {"items": {"type": "array", "items": _ref("Provider")}},
                            },
                            "the providers",
                        ),
                        "401": ERRORS["401"],
                    },
                }
            },
            "/ui": {
                "get": {
                    "summary": "The browser console (HTML; the API key is entered in the page)",
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
                }
            },
            "/ui/static/{name}": {
                "get": {
                    "summary": "The console's stylesheet and script",
                    "parameters": [
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {"200": {"description": "CSS or JavaScript"}, "404": ERRORS["404"]},
                }
            },
        },
    }
