"""The public OpenAPI 3.1 document, built from the Structs in `receiver.schema`.

Paths come from the routes served (the table in `receiver.routes`, where each endpoint's id, tag,
summary, answers and examples are declared beside its path); schemas, query and header parameters
from the same Structs that validate requests and encode answers. This module adds the notification
under `webhooks`. Routes for providers, the sandbox, the console and Prometheus are served with
`include_in_schema=False` and stay out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import msgspec
from starlette.convertors import IntegerConvertor
from starlette.routing import BaseRoute
from starlette.routing import Route

from receiver import __version__
from receiver import schema
from receiver.routes import BEARER
from receiver.routes import EXAMPLE_CANCELLED
from receiver.routes import EXAMPLE_FAILED
from receiver.routes import EXAMPLE_TASK
from receiver.routes import OPERATIONS
from receiver.routes import PATH_SCHEMAS
from receiver.routes import REF
from receiver.routes import TABLE
from receiver.routes import Operation
from receiver.routes import ref

CONVERTER = re.compile(r":\w+}")

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
    schema.Usage,
    schema.KeyCreate,
    schema.KeyChange,
    schema.ApiKey,
    schema.NewApiKey,
    schema.KeyList,
)
PARAMETER_MODELS: tuple[type[msgspec.Struct], ...] = (
    schema.CreateHeaders,
    schema.ListQuery,
    schema.WaitQuery,
    schema.EventsQuery,
    schema.LinkQuery,
    schema.UsageQuery,
    schema.AdminUsageQuery,
)


def _example(value: msgspec.Struct) -> dict[str, Any]:
    return {"value": msgspec.to_builtins(value)}


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


def _parameters(model: dict[str, Any]) -> list[dict[str, Any]]:
    """A parameter Struct's fields as OpenAPI parameters (their `in` is filled in by `_operation`)."""
    required = set(model.get("required", ()))
    parameters = []
    for name, item in model["properties"].items():
        item = _without_null(item)
        parameter: dict[str, Any] = {"name": name, "required": name in required}
        if "description" in item:
            parameter["description"] = item.pop("description")
        parameters.append({**parameter, "schema": item})
    return parameters


def _operation(
    route: Route, operation: Operation, parameters: Mapping[type[msgspec.Struct], list[dict[str, Any]]]
) -> dict[str, Any]:
    """One operation object: the route's path parameters (typed by their convertor, or `PATH_SCHEMAS`),
    then the header and query parameters of the Structs its handler parses them with."""
    given: list[dict[str, Any]] = []
    for name, convertor in route.param_convertors.items():
        kind = {"type": "integer"} if isinstance(convertor, IntegerConvertor) else {"type": "string"}
        given.append({"name": name, "in": "path", "required": True, "schema": PATH_SCHEMAS.get(name, kind)})
    for model, location in ((operation.headers, "header"), (operation.query, "query")):
        if model is not None:
            given += [{**parameter, "in": location} for parameter in parameters[model]]
    document: dict[str, Any] = {
        "operationId": operation.id,
        "tags": [operation.tag],
        "summary": operation.summary,
    }
    if operation.description is not None:
        document["description"] = operation.description
    if operation.security is not None:
        document["security"] = operation.security
    if given:
        document["parameters"] = given
    if operation.body is not None:
        document["requestBody"] = operation.body
    document["responses"] = operation.responses
    return document


def openapi_document(server_url: str, served: Sequence[BaseRoute] = TABLE.routes) -> dict[str, Any]:
    """The document for `served` (create_app's routes; by default the route table they are made from):
    each route in the schema with its endpoint's `Operation`, walked as Starlette's SchemaGenerator does."""
    _, schemas = msgspec.json.schema_components(MODELS + PARAMETER_MODELS, ref_template=REF)
    _typed_enums(schemas)
    parameters = {model: _parameters(schemas.pop(model.__name__)) for model in PARAMETER_MODELS}
    paths: dict[str, Any] = {}
    for route in served:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        operation = OPERATIONS[route.name]
        path = CONVERTER.sub("}", route.path)  # `{index:int}` is `{index}` in OpenAPI
        for method in sorted((route.methods or set()) - {"HEAD"}):
            paths.setdefault(path, {})[method.lower()] = _operation(route, operation, parameters)
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
            {"name": "usage", "description": "Tasks and spend"},
            {
                "name": "admin",
                "description": "Keys in the database and every tenant's usage (RECEIVER_ADMIN_KEY)",
            },
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
                                "schema": ref(schema.Notification),
                                "examples": {
                                    "succeeded": _example(
                                        schema.Notification("task.succeeded", at, EXAMPLE_TASK)
                                    ),
                                    "failed": _example(
                                        schema.Notification("task.failed", at, EXAMPLE_FAILED)
                                    ),
                                    "cancelled": _example(
                                        schema.Notification("task.cancelled", at, EXAMPLE_CANCELLED)
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
