"""Small things a user notices, on the served receiver: `/` leads to the console, a favicon, the
OpenAPI version, a log's `host=` that is a host, and a failed task's log line saying why."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import pytest

from receiver import __version__
from receiver.logs import FIELDS
from tests.harness import Receiver


@pytest.fixture
def receiver(start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver()


def test_the_root_sends_a_browser_to_the_console(receiver: Receiver) -> None:
    answer = receiver.anon.get("/", follow_redirects=False)
    assert answer.status_code == 307
    assert urljoin(f"{receiver.url}/", answer.headers["location"]) == f"{receiver.url}/ui"
    page = receiver.anon.get("/", follow_redirects=True)
    assert page.status_code == 200 and page.url == f"{receiver.url}/ui"
    assert "<title>receiver console</title>" in page.text


def test_a_favicon_is_served_and_linked_from_the_console(receiver: Receiver) -> None:
    icon = receiver.anon.get("/favicon.ico")
    assert icon.status_code == 200
    assert icon.headers["content-type"] == "image/vnd.microsoft.icon"
    reserved, kind, count = struct.unpack("<HHH", icon.content[:6])
    assert (reserved, kind, count) == (0, 1, 1)  # an ICO with one image
    width, height, _, _, _, _, size, offset = struct.unpack("<BBBBHHII", icon.content[6:22])
    assert (width, height) == (32, 32)
    assert icon.content[offset : offset + size].startswith(b"\x89PNG") and offset + size == len(icon.content)
    again = receiver.anon.get("/favicon.ico", headers={"If-None-Match": icon.headers["etag"]})
    assert again.status_code == 304

    page = receiver.anon.get("/ui").text
    assert '<link rel="icon" href="favicon.ico"' in page
    assert urljoin(f"{receiver.url}/ui", "favicon.ico") == f"{receiver.url}/favicon.ico"


def test_the_openapi_version_is_the_package_version(receiver: Receiver) -> None:
    assert receiver.anon.get("/openapi.json").json()["info"]["version"] == __version__ != "1"


def fields_of(records: list[logging.LogRecord], message: str) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS) for r in records if r.getMessage() == message and hasattr(r, FIELDS)]


def test_logs_name_hosts_and_say_why_a_task_failed(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="receiver")
    done = receiver.wait(receiver.submit(provider="sandbox", prompt="a pear")["id"])
    failed = receiver.wait(
        receiver.submit(provider="sandbox", prompt="no", options={"outcome": "generation_failed"})["id"]
    )
    assert (done["status"], failed["status"]) == ("succeeded", "failed")
    # The sandbox's image is fetched from this service itself: its host, and nothing of its path.
    [stored] = [f for f in fields_of(caplog.records, "image stored") if f["task_id"] == done["id"]]
    assert stored["host"] == f"127.0.0.1:{receiver.settings.port}"
    [ended] = [f for f in fields_of(caplog.records, "task failed") if f["task_id"] == failed["id"]]
    assert failed["error"] is not None
    assert ended["error"] == "generation_failed" and ended["reason"] == failed["error"]["message"]
