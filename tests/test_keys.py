"""Keys kept in the database (issue 21): the admin API, revocation on every replica, rate per key.

Over real HTTP on SQLite and on PostgreSQL; "replicas" are two served receivers on one PostgreSQL
database, each with its own store, cache and notice listener, as two processes would have.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from receiver.cli import main
from receiver.client import AdminClient
from receiver.client import ApiError as ClientApiError
from receiver.client import Client
from receiver.openapi import openapi_document
from tests.conftest import database_settings
from tests.harness import ALICE
from tests.harness import Receiver
from tests.test_console import browser

ADMIN = "admin-key-0123456789abcdef0123456789"
SANDBOX = {"provider": "sandbox", "prompt": "a lighthouse at dusk"}


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return database_settings(request, request.param)


def admin(receiver: Receiver) -> httpx.Client:
    return httpx.Client(base_url=receiver.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)


def as_key(receiver: Receiver, key: str) -> httpx.Client:
    return httpx.Client(base_url=receiver.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def new_key(receiver: Receiver, **fields: Any) -> dict[str, Any]:
    with admin(receiver) as client:
        answer = client.post("/v1/admin/keys", json={"tenant": "acme", **fields})
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


def poll(condition: Callable[[], bool], seconds: float) -> float:
    """Seconds until `condition` held, polled without a fixed sleep as the assertion; fails past `seconds`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_key_lives_is_changed_and_is_revoked(
    start_receiver: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN)
    created = new_key(receiver, name="acme's app", budget_usd=5, budget_period="month", rate_per_minute=100)
    secret = created["key"]
    assert secret.startswith("rk_") and len(secret) > 40
    assert created["id"].startswith("key_") and created["tenant"] == "acme"
    assert (created["budget_usd"], created["budget_period"], created["rate_per_minute"]) == (5, "month", 100)
    assert created["disabled"] is False

    with as_key(receiver, secret) as app, admin(receiver) as operator:
        task = app.post("/v1/tasks", json=SANDBOX)
        assert task.status_code == 202, task.text
        assert [t["id"] for t in app.get("/v1/tasks").json()["items"]] == [task.json()["id"]]
        assert receiver.alice.get(f"/v1/tasks/{task.json()['id']}").status_code == 404  # acme's, not alice's

        listed = operator.get("/v1/admin/keys")
        assert listed.status_code == 200
        [shown] = listed.json()["keys"]
        assert shown["id"] == created["id"] and "key" not in shown and secret not in listed.text

        changed = operator.patch(
            f"/v1/admin/keys/{created['id']}", json={"disabled": True, "budget_usd": None}
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["disabled"] is True and changed.json()["budget_usd"] is None
        assert changed.json()["budget_period"] == "month"  # what was not given stays
        refused = app.get("/v1/tasks")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert operator.patch(f"/v1/admin/keys/{created['id']}", json={"disabled": False}).status_code == 200
        assert app.get("/v1/tasks").status_code == 200

        assert operator.delete(f"/v1/admin/keys/{created['id']}").status_code == 204
        assert app.get("/v1/tasks").status_code == 401
        assert app.post("/v1/tasks", json=SANDBOX).status_code == 401
        assert operator.delete(f"/v1/admin/keys/{created['id']}").status_code == 404
        assert operator.patch(f"/v1/admin/keys/{created['id']}", json={"name": "x"}).status_code == 404
        assert operator.get("/v1/admin/keys").json() == {"keys": []}
    # The environment's keys work as before, and neither secret ever reached a log line.
    assert receiver.alice.post("/v1/tasks", json=SANDBOX).status_code == 202
    assert any("key created" in record.getMessage() for record in caplog.records)
    assert secret not in caplog.text and ADMIN not in caplog.text


@pytest.mark.parametrize("database_env", ["sqlite"], indirect=True)
def test_the_admin_api_takes_only_the_admin_key(start_receiver: Callable[..., Receiver]) -> None:
    off = start_receiver("off")
    assert off.alice.get("/v1/admin/keys").status_code == 404  # no admin key: no admin API
    with admin(off) as client:
        assert client.post("/v1/admin/keys", json={"tenant": "acme"}).status_code == 404
    on = start_receiver("on", RECEIVER_ADMIN_KEY=ADMIN)
    secret = new_key(on)["key"]
    for client in (on.alice, on.anon, as_key(on, secret), as_key(on, ADMIN + "x")):
        for method, path in (
            ("GET", "/v1/admin/keys"),
            ("POST", "/v1/admin/keys"),
            ("GET", "/v1/admin/usage"),
        ):
            answer = client.request(method, path, json={"tenant": "evil"})
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "unauthorized"
    # The admin key is not an app's key either.
    with admin(on) as client:
        assert client.get("/v1/tasks").status_code == 401
        assert len(client.get("/v1/admin/keys").json()["keys"]) == 1  # the refused creates made nothing


@pytest.mark.parametrize("database_env", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tenant": "acme", "budget_usd": -1}, "budget_usd"),
        ({"tenant": "acme", "budget_usd": "5"}, "budget_usd"),
        ({"tenant": "acme", "budget_period": "week"}, "budget_period"),
        ({"tenant": "acme", "rate_per_minute": 0}, "rate_per_minute"),
        ({"tenant": "acme", "rate_per_minute": 1.5}, "rate_per_minute"),
        ({"tenant": "no spaces allowed"}, "tenant"),
        ({"tenant": ""}, "tenant"),
        ({}, "tenant"),
        ({"tenant": "acme", "max_budget": 3}, "max_budget"),
    ],
)
def test_a_bad_key_is_a_422_naming_the_field(
    start_receiver: Callable[..., Receiver], body: dict[str, Any], field: str
) -> None:
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN)
    with admin(receiver) as client:
        answer = client.post("/v1/admin/keys", json=body)
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["error"]["fields"]
        assert client.get("/v1/admin/keys").json() == {"keys": []}
        key = new_key(receiver)
        changed = client.patch(
            f"/v1/admin/keys/{key['id']}", json={k: v for k, v in body.items() if k != "tenant"}
        )
        if field != "tenant":
            assert changed.status_code == 422 and field in changed.json()["error"]["fields"], changed.text
        assert client.get("/v1/admin/keys").json()["keys"][0]["budget_usd"] is None  # unchanged


@pytest.mark.parametrize("database_env", ["postgres"], indirect=True)
def test_a_revoked_key_is_refused_on_the_other_replica_within_2_s(
    start_receiver: Callable[..., Receiver],
) -> None:
    first = start_receiver("one", RECEIVER_ADMIN_KEY=ADMIN)
    second = start_receiver("two", RECEIVER_ADMIN_KEY=ADMIN)
    for change in ("disable", "delete"):
        created = new_key(first)
        with as_key(second, created["key"]) as app, admin(first) as operator:
            assert app.get("/v1/tasks").status_code == 200  # the other replica knows (and caches) it
            if change == "disable":
                answer = operator.patch(f"/v1/admin/keys/{created['id']}", json={"disabled": True})
                assert answer.status_code == 200
            else:
                assert operator.delete(f"/v1/admin/keys/{created['id']}").status_code == 204
            took = poll(lambda: app.get("/v1/tasks").status_code == 401, 2.0)
            print(f"{change}d on one replica, refused on the other after {took:.3f} s")


@pytest.mark.parametrize("database_env", ["postgres"], indirect=True)
def test_the_rate_per_key_holds_across_replicas(start_receiver: Callable[..., Receiver]) -> None:
    first = start_receiver("one", RECEIVER_ADMIN_KEY=ADMIN)
    second = start_receiver("two", RECEIVER_ADMIN_KEY=ADMIN)
    for _ in range(3):  # windows are calendar minutes: a run that straddles two is run again
        secret = new_key(first, rate_per_minute=4)["key"]
        began = time.time()
        with as_key(first, secret) as one, as_key(second, secret) as two:
            answers = [(one if n % 2 else two).post("/v1/tasks", json=SANDBOX) for n in range(6)]
            reads = two.get("/v1/tasks")
        if math.floor(began / 60) == math.floor(time.time() / 60):
            break
    assert [answer.status_code for answer in answers] == [202, 202, 202, 202, 429, 429]
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert reads.status_code == 200  # reads do not count
    # Another key of the same tenant, and the environment's keys, have rates of their own (none).
    assert first.alice.post("/v1/tasks", json=SANDBOX).status_code == 202
    other = new_key(first)["key"]
    with as_key(second, other) as client:
        assert client.post("/v1/tasks", json=SANDBOX).status_code == 202


def test_the_rate_per_key_on_one_replica(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN)
    for _ in range(3):
        secret = new_key(receiver, rate_per_minute=2)["key"]
        began = time.time()
        with as_key(receiver, secret) as app:
            codes = [app.post("/v1/tasks", json=SANDBOX).status_code for _ in range(3)]
        if math.floor(began / 60) == math.floor(time.time() / 60):
            break
    assert codes == [202, 202, 429]


@pytest.mark.parametrize("database_env", ["sqlite"], indirect=True)
def test_a_key_in_the_environment_is_untouched(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN)
    codes = {receiver.alice.post("/v1/tasks", json=SANDBOX).status_code for _ in range(5)}
    assert codes == {202}
    assert ALICE not in receiver.alice.get("/v1/tasks").text


@pytest.mark.parametrize("database_env", ["sqlite"], indirect=True)
def test_the_admin_client_and_the_usage_call(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN)
    with AdminClient(receiver.url, ADMIN) as operator:
        created = operator.create_key("acme", name="web", budget_usd=2.5, budget_period="day")
        assert created["key"].startswith("rk_") and created["budget_period"] == "day"
        assert [key["id"] for key in operator.list_keys()] == [created["id"]]
        changed = operator.change_key(created["id"], rate_per_minute=30, budget_period=None)
        assert (changed["rate_per_minute"], changed["budget_period"], changed["budget_usd"]) == (
            30,
            None,
            2.5,
        )
        with Client(receiver.url, created["key"]) as app:
            app.create("sandbox", "a lighthouse at dusk")
            mine = app.usage(group_by="provider")
            assert (mine["tasks"], mine["groups"][0]["group"]) == (1, "sandbox")
        everyone = operator.usage(group_by="tenant")
        assert {group["group"]: group["tasks"] for group in everyone["groups"]} == {"acme": 1}
        assert operator.usage(tenant="alice")["tasks"] == 0
        operator.revoke_key(created["id"])
        assert operator.list_keys() == []
        with pytest.raises(ClientApiError) as refused:
            operator.change_key(created["id"], name="gone")
        assert refused.value.status == 404
    with AdminClient(receiver.url, ALICE) as impostor, pytest.raises(ClientApiError) as wrong:
        impostor.list_keys()
    assert wrong.value.status == 401


@pytest.mark.parametrize("database_env", ["sqlite"], indirect=True)
def test_the_keys_and_usage_commands(
    start_receiver: Callable[..., Receiver],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN)
    monkeypatch.setenv("RECEIVER_URL", receiver.url)
    monkeypatch.delenv("RECEIVER_ADMIN_KEY", raising=False)
    assert main(["keys", "list"]) == 3  # no admin key anywhere
    capsys.readouterr()
    admin_flags = ["keys", "--admin-key", ADMIN]
    assert main([*admin_flags, "create", "acme", "--budget", "5", "--period", "month", "--name", "web"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["key"].startswith("rk_") and created["budget_usd"] == 5
    assert main([*admin_flags, "change", created["id"], "--rate", "12", "--period", "none", "--disable"]) == 0
    changed = json.loads(capsys.readouterr().out)
    assert (changed["rate_per_minute"], changed["budget_period"], changed["disabled"]) == (12, None, True)
    assert changed["budget_usd"] == 5 and changed["name"] == "web"  # the flags not given stay
    assert main([*admin_flags, "change", created["id"], "--period", "week"]) == 2
    assert "budget_period" in capsys.readouterr().err
    assert main([*admin_flags, "list"]) == 0
    listed = capsys.readouterr().out
    assert created["id"] in listed and "disabled" in listed and created["key"] not in listed
    monkeypatch.setenv("RECEIVER_API_KEY", ALICE)
    receiver.alice.post("/v1/tasks", json=SANDBOX)
    assert main(["usage", "--group-by", "provider", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"][0]["group"] == "sandbox"
    assert main(["usage", "--from", "someday"]) == 2
    assert "from" in capsys.readouterr().err
    assert main([*admin_flags, "usage", "--group-by", "tenant"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split("\t")[:2] == ["alice", "1"]
    assert main([*admin_flags, "revoke", created["id"]]) == 0
    assert main([*admin_flags, "revoke", created["id"]]) == 2  # no such key now
    assert main(["keys", "--admin-key", "not-the-admin-key-0123456789abcdef", "list"]) == 3


@pytest.mark.parametrize("database_env", ["sqlite"], indirect=True)
def test_the_console_keys_page_for_the_admin_key(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN)
    with browser() as (page, problems):
        # An app's key: its tasks and its spend, and no keys page.
        receiver.alice.post("/v1/tasks", json=SANDBOX)
        page.goto(f"{receiver.url}/ui")
        page.fill("#api-key", ALICE)
        page.click("#key-form button")
        page.wait_for_selector("#usage-panel:has-text('This month: 1 task')")
        assert page.locator("a[data-nav=keys]").is_hidden()
        page.click("#forget-key")
        # The admin key: the keys page, a key created and its secret shown once, then revoked.
        page.check("#admin-mode")
        page.fill("#api-key", ADMIN)
        page.click("#key-form button")
        page.wait_for_selector("#keys-table, .empty")
        assert page.locator("a[data-nav=tasks]").is_hidden() and page.locator("a[data-nav=keys]").is_visible()
        assert "alice" in page.text_content("#spend-table")
        page.fill("#key-tenant", "acme")
        page.fill("#key-budget", "5")
        page.fill("#key-rate", "2000000")  # past what the service takes: its 422, named in the form
        page.click("#create-key")
        page.wait_for_selector("#key-form-error:not([hidden])")
        assert "rate_per_minute" in page.text_content("#key-form-error")
        page.fill("#key-rate", "30")
        page.click("#create-key")
        secret = page.text_content("#new-secret-value", timeout=15_000) or ""
        assert secret.startswith("rk_")
        with as_key(receiver, secret) as app:
            assert app.get("/v1/tasks").status_code == 200
        [shown] = receiver_keys(receiver)
        assert (shown["budget_usd"], shown["budget_period"], shown["rate_per_minute"]) == (5, "month", 30)
        row = f"tr[data-key-id={shown['id']}]"
        assert secret not in page.text_content("#keys-table")
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click(f"{row} .revoke")
        assert len(receiver_keys(receiver)) == 1  # dismissed: nothing revoked
        page.once("dialog", lambda dialog: dialog.accept())
        page.click(f"{row} .revoke")
        page.wait_for_selector(row, state="detached")
        assert receiver_keys(receiver) == []
        with as_key(receiver, secret) as app:
            assert app.get("/v1/tasks").status_code == 401
    assert problems == []


def receiver_keys(receiver: Receiver) -> list[dict[str, Any]]:
    with admin(receiver) as client:
        keys: list[dict[str, Any]] = client.get("/v1/admin/keys").json()["keys"]
    return keys


def test_the_openapi_document_has_every_new_operation() -> None:
    document = openapi_document("http://127.0.0.1:8000")
    operations = {
        (path, method): operation["operationId"]
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    assert {
        ("/v1/usage", "get"): "getUsage",
        ("/v1/admin/keys", "post"): "createKey",
        ("/v1/admin/keys", "get"): "listKeys",
        ("/v1/admin/keys/{key_id}", "patch"): "changeKey",
        ("/v1/admin/keys/{key_id}", "delete"): "deleteKey",
        ("/v1/admin/usage", "get"): "getAdminUsage",
    }.items() <= operations.items()
    create = document["paths"]["/v1/tasks"]["post"]["responses"]
    assert {"402", "429"} <= set(create) and "Retry-After" in create["429"]["headers"]
    query = {p["name"] for p in document["paths"]["/v1/usage"]["get"]["parameters"]}
    assert query == {"from", "to", "group_by"}
    assert "remaining_usd" in document["components"]["schemas"]["ErrorDetail"]["properties"]
