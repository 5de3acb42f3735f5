"""One API description: the route table names every URL we build, the OpenAPI paths are walked from the
served routes, /v1/providers answers its schema Struct, lists page through their query Structs, and the
CLI's flags follow the request schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.routing import Match
from starlette.routing import Route

from receiver import schema
from receiver.api import UPLOADS
from receiver.app import create_app
from receiver.cli import build_parser
from receiver.config import load_settings
from receiver.models import Status
from receiver.offer import offered
from receiver.openapi import openapi_document
from receiver.routes import ENDPOINTS
from receiver.routes import OPERATIONS
from receiver.routes import url_path
from receiver.tasks import image_path
from receiver.tokens import Tokens
from tests.harness import FAST
from tests.harness import Receiver

PUBLIC = "https://receiver.example.org"
TASK = "tsk_5f0c6a1e9b2d4c7a8e3f1b2c"
PARAMS: dict[str, dict[str, Any]] = {
    "callback": {"provider": "kie", "token": "abc.def"},
    "callback_suffixed": {"provider": "kie", "token": "abc.def"},
    "get_task": {"id": TASK},
    "task_events": {"id": TASK},
    "cancel_task": {"id": TASK},
    "delete_task": {"id": TASK},
    "task_image": {"id": TASK, "index": 2},
    "get_upload": {"name": "ab12.png"},
    "change_key": {"key_id": "key_0123456789abcdef"},
    "delete_key": {"key_id": "key_0123456789abcdef"},
}


def test_urls_we_hand_out_keep_their_exact_shape() -> None:
    """Providers hold callback URLs and apps hold links: built from route names, they stay byte-for-byte."""
    tokens = Tokens("k" * 32, PUBLIC, 3600)
    token = tokens.callback_token("kie", TASK, 1)
    assert tokens.callback_url("kie", TASK, 1) == f"{PUBLIC}/callbacks/kie/{token}"
    assert tokens.callback_of("kie", token) is not None
    assert image_path(TASK, 2) == f"/v1/tasks/{TASK}/images/2"
    assert url_path("get_upload", name="ab12.png") == "/uploads/ab12.png"
    assert url_path("get_task", id=TASK) == f"/v1/tasks/{TASK}"
    assert UPLOADS == "/uploads/"
    link = tokens.signed_link(url_path("get_upload", name="ab12.png"))
    assert link.startswith(f"{PUBLIC}/uploads/ab12.png?expires=")
    expires = link.split("expires=")[1].split("&")[0]
    signature = link.split("signature=")[1]
    assert tokens.link_valid("/uploads/ab12.png", expires, signature)


def app_routes(tmp_path: Path, role: str = "all") -> list[Route]:
    env = {**FAST, "RECEIVER_DATA_DIR": str(tmp_path / "data"), "RECEIVER_PUBLIC_URL": PUBLIC}
    app = create_app(load_settings(env), role=role)
    return [route for route in app.routes if isinstance(route, Route)]


def test_the_app_serves_the_table_by_name(tmp_path: Path) -> None:
    served = {route.name: route for route in app_routes(tmp_path)}
    for endpoint in ENDPOINTS:
        route = served[endpoint.name]
        assert route.path == endpoint.path and endpoint.method in (route.methods or ())
        params = PARAMS.get(endpoint.name, {})
        assert route.url_path_for(endpoint.name, **params) == url_path(endpoint.name, **params)
    worker = {route.name for route in app_routes(tmp_path, "worker")}
    assert worker == {"healthz", "readyz", "metrics"}


def test_the_document_is_walked_from_the_served_routes(tmp_path: Path) -> None:
    routes = app_routes(tmp_path)
    whole = openapi_document(PUBLIC, routes)
    assert whole == openapi_document(PUBLIC)
    documented = {(path, method) for path, item in whole["paths"].items() for method in item}
    assert len(documented) == len(OPERATIONS)
    # A route left out of the served table is left out of the document: nothing is typed twice.
    without = openapi_document(PUBLIC, [route for route in routes if route.name != "task_events"])
    assert "/v1/tasks/{id}/events" in whole["paths"]
    assert "/v1/tasks/{id}/events" not in without["paths"]
    # The converter is the parameter's type: `{index:int}` is an integer, documented as `{index}`.
    [index] = [
        p
        for p in whole["paths"]["/v1/tasks/{id}/images/{index}"]["get"]["parameters"]
        if p["name"] == "index"
    ]
    assert index == {"name": "index", "in": "path", "required": True, "schema": {"type": "integer"}}


def test_cursors_name_their_list() -> None:
    cursor = schema.encode_cursor(schema.ListQuery.CURSOR, 41)
    assert schema.decode_cursor(schema.ListQuery.CURSOR, cursor) == 41
    assert schema.decode_cursor(schema.EventsQuery.CURSOR, cursor) is None
    for junk in ("x", "%%%", schema.encode_cursor("seq", 0)[:-1] + "!", "c2VxOi0x"):  # the last: seq:-1
        assert schema.decode_cursor(schema.ListQuery.CURSOR, junk) is None


def test_the_providers_answer_is_its_schema_struct(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver()
    response = receiver.alice.get("/v1/providers")
    assert response.status_code == 200, response.text
    answer = msgspec.json.decode(response.content, type=schema.ProviderList, strict=True)
    assert answer == offered(receiver.settings)
    assert [info.name for info in answer.items] == [schema.ProviderName.SANDBOX]
    assert receiver.anon.get("/v1/providers").status_code == 401


def test_lists_page_by_their_query_structs(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver()
    created = receiver.alice.post("/v1/tasks", json={"provider": "sandbox", "prompt": "a fox"})
    assert created.headers["location"] == url_path("get_task", id=created.json()["id"])
    second = receiver.submit(provider="sandbox", prompt="a hare")
    first_page = receiver.alice.get("/v1/tasks", params={"limit": 1}).json()
    assert [task["id"] for task in first_page["items"]] == [second["id"]]
    after = receiver.alice.get("/v1/tasks", params={"limit": 1, "cursor": first_page["next_cursor"]}).json()
    assert [task["id"] for task in after["items"]] == [created.json()["id"]]
    events_cursor = schema.encode_cursor(schema.EventsQuery.CURSOR, 1)
    for query, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": events_cursor}, "cursor"),
        ({"status": "lost"}, "status"),
    ):
        refused = receiver.alice.get("/v1/tasks", params=query)
        assert refused.status_code == 422, query
        assert set(refused.json()["error"]["fields"]) == {field}, query
        if field == "limit":  # the words of before: the range, whatever was wrong
            assert refused.json()["error"]["fields"]["limit"] == "a whole number from 1 to 200", query
    task_cursor = schema.encode_cursor(schema.ListQuery.CURSOR, 1)
    refused = receiver.alice.get(f"/v1/tasks/{second['id']}/events", params={"cursor": task_cursor})
    assert refused.status_code == 422 and set(refused.json()["error"]["fields"]) == {"cursor"}
    refused = receiver.alice.get(f"/v1/tasks/{second['id']}/events", params={"limit": 501})
    assert refused.json()["error"]["fields"] == {"limit": "a whole number from 1 to 500"}


def test_the_cli_flags_follow_the_request_schema() -> None:
    parser = build_parser()
    commands = next(action for action in parser._actions if action.choices and "submit" in action.choices)
    assert isinstance(commands.choices, dict)
    submit, tasks = commands.choices["submit"], commands.choices["tasks"]
    flags = {option for action in submit._actions for option in action.option_strings}
    # Each request field has its flag (a list field's flag is singular and repeated).
    plural = {"images": "--image", "options": "--option"}
    for field in msgspec.structs.fields(schema.TaskCreate):
        assert plural.get(field.name, "--" + field.name.replace("_", "-")) in flags, field.name
    # The values the help lines name are the schema's enums, all of them.
    for command, dest, values in (
        (submit, "provider", schema.ProviderName),
        (tasks, "provider", schema.ProviderName),
        (tasks, "status", Status),
    ):
        [text] = [action.help or "" for action in command._actions if action.dest == dest]
        for value in values:
            assert value.value in text, (command.prog, dest, value)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_parametrised_route_round_trips(name: str) -> None:
    """A built path is matched back by its route to the same parameters."""
    path = url_path(name, **PARAMS[name])
    [endpoint] = [e for e in ENDPOINTS if e.name == name]
    route = Route(endpoint.path, lambda request: None, methods=[endpoint.method])
    matched, child = route.matches({"type": "http", "path": path, "method": endpoint.method})
    assert matched is Match.FULL and child["path_params"] == PARAMS[name]


def test_the_clients_paths_are_the_servers() -> None:
    """The client builds its own paths (it runs where the server's code does not): the same ones."""
    from receiver import client

    assert client.task_path(TASK) == url_path("get_task", id=TASK)
    assert f"{client.task_path(TASK)}/events" == url_path("task_events", id=TASK)
    assert client.image_path(TASK, 3) == url_path("task_image", id=TASK, index=3)
    # The largest page it asks for is the one ListQuery allows.
    assert client.PAGE_LIMIT == schema.MAX_PAGE_LIMIT
