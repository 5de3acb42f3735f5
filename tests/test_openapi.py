"""The OpenAPI document: complete for generators, and equal to what the service really takes and answers."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from receiver import schema
from receiver.openapi import openapi_document
from receiver.providers import REGISTRY
from tests.fakes.common import png
from tests.harness import Receiver

DOCUMENT = openapi_document("http://127.0.0.1:8000")
SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            yield path, method, operation
    for name, item in DOCUMENT["webhooks"].items():
        for method, operation in item.items():
            yield name, method, operation


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_the_provider_enum_is_the_registry() -> None:
    assert {name.value for name in schema.ProviderName} == set(REGISTRY)
    assert set(SCHEMAS["ProviderName"]["enum"]) == set(REGISTRY)


def test_every_operation_has_an_id_a_tag_and_its_error_answers() -> None:
    declared_tags = {tag["name"] for tag in DOCUMENT["tags"]}
    ids = []
    for path, method, operation in operations():
        ids.append(operation["operationId"])
        assert operation["summary"], (path, method)
        assert operation["tags"] and set(operation["tags"]) <= declared_tags, (path, method)
        for status, answer in operation["responses"].items():
            assert answer["description"], (path, method, status)
            if status.startswith("4") and status != "410":
                schema_ref = answer["content"]["application/json"]["schema"]
                assert schema_ref == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, status)
        if any(operation.get("security", DOCUMENT["security"])):  # a key may be asked for: a 401 may come
            assert "401" in operation["responses"], (path, method)
    assert len(ids) == len(set(ids))
    create = DOCUMENT["paths"]["/v1/tasks"]["post"]["responses"]
    assert {"200", "202", "400", "401", "409", "413", "422"} <= set(create)


def test_every_reference_resolves_and_answers_require_every_field() -> None:
    for ref in refs(DOCUMENT):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in SCHEMAS, ref
    for name in ("Task", "Image", "TaskFailure", "TaskPage", "Event", "EventPage", "Upload", "ProviderInfo"):
        assert set(SCHEMAS[name]["required"]) == set(SCHEMAS[name]["properties"]), name
    # What the issue found undocumented or loose is now in the document.
    assert "detail" in SCHEMAS["Event"]["properties"]
    # A provider by name, or `auto` (routing).
    assert SCHEMAS["TaskCreate"]["properties"]["provider"]["$ref"] == "#/components/schemas/ProviderChoice"
    assert sorted(SCHEMAS["ProviderChoice"]["enum"]) == sorted([*SCHEMAS["ProviderName"]["enum"], "auto"])
    assert SCHEMAS["TaskCreate"]["properties"]["prompt"]["minLength"] == 1
    assert SCHEMAS["TaskCreate"]["additionalProperties"] is False
    [key] = DOCUMENT["paths"]["/v1/tasks"]["post"]["parameters"]
    assert (key["name"], key["in"], key["schema"]["minLength"], key["schema"]["maxLength"]) == (
        "Idempotency-Key",
        "header",
        1,
        255,
    )
    upload = DOCUMENT["paths"]["/v1/uploads"]["post"]
    assert set(upload["requestBody"]["content"]) == {"application/octet-stream"}
    assert all(kind in upload["description"] for kind in ("image/png", "image/jpeg", "image/webp"))
    image = DOCUMENT["paths"]["/v1/tasks/{id}/images/{index}"]["get"]["responses"]["200"]["content"]
    # Its own type, and raw bytes for generators that know no image types (openapi-python-client).
    assert set(image) == {"image/png", "image/jpeg", "image/webp", "application/octet-stream"}
    assert "taskEnded" in DOCUMENT["webhooks"]


def test_the_examples_are_valid_values_of_their_schemas() -> None:
    create = DOCUMENT["paths"]["/v1/tasks"]["post"]
    example = create["requestBody"]["content"]["application/json"]["example"]
    assert schema.check(example, schema.TaskCreate)[1] == {}
    for status in ("202",):
        msgspec.convert(create["responses"][status]["content"]["application/json"]["example"], schema.Task)
    msgspec.convert(
        DOCUMENT["paths"]["/v1/tasks/{id}"]["get"]["responses"]["200"]["content"]["application/json"][
            "example"
        ],
        schema.Task,
    )
    hook = DOCUMENT["webhooks"]["taskEnded"]["post"]["requestBody"]["content"]["application/json"]
    for example in hook["examples"].values():
        msgspec.convert(example["value"], schema.Notification)


@pytest.fixture
def receiver(start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver()


def test_answers_carry_exactly_the_documented_fields(receiver: Receiver) -> None:
    def fields(name: str) -> set[str]:
        return set(SCHEMAS[name]["properties"])

    task = receiver.wait(receiver.submit(provider="sandbox", prompt="a pear", metadata={"k": 1})["id"])
    assert set(task) == fields("Task")
    assert task["images"] and all(set(image) == fields("Image") for image in task["images"])
    page = receiver.alice.get("/v1/tasks").json()
    assert set(page) == fields("TaskPage")
    events = receiver.alice.get(f"/v1/tasks/{task['id']}/events").json()
    assert set(events) == fields("EventPage")
    assert events["items"] and all(set(event) == fields("Event") for event in events["items"])
    upload = receiver.alice.post("/v1/uploads", content=png(8, 8), headers={"Content-Type": "image/png"})
    assert set(upload.json()) == fields("Upload")
    providers = receiver.alice.get("/v1/providers").json()
    assert set(providers) == fields("ProviderList")
    assert all(set(item) == fields("ProviderInfo") for item in providers["items"])
    failed = receiver.submit(provider="sandbox", prompt="x", options={"outcome": "generation_failed"})
    assert set(receiver.wait(failed["id"])["error"]) == fields("TaskFailure")
    refused = receiver.alice.post("/v1/tasks", json={"provider": "sandbox"})
    assert set(refused.json()) == fields("ErrorBody")
    # remaining_usd comes only with a 402 budget_exceeded (tests/test_budgets.py).
    assert set(refused.json()["error"]) == fields("ErrorDetail") - {"remaining_usd"}
    # Every answer decodes into its Struct, strictly.
    msgspec.convert(task, schema.Task)
    msgspec.convert(page, schema.TaskPage)
    msgspec.convert(events, schema.EventPage)
    msgspec.convert(providers, schema.ProviderList)
