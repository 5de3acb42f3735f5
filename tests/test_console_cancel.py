"""The console's Cancel and Delete buttons, in a real browser (Debian's chromium through Playwright;
skipped, saying why, when it is absent): each asks first in a modal dialog, and does nothing unless
the answer is yes."""

from __future__ import annotations

from typing import Any

from tests.harness import Receiver
from tests.test_console import browser_page  # noqa: F401  (the fixture)
from tests.test_console import sign_in


def open_running_task(page: Any, receiver: Receiver) -> str:
    """Sign in and open the page of a new sandbox task that runs all through the test (the sandbox
    answers after options.delay seconds); its id."""
    task_id = str(receiver.submit(provider="sandbox", prompt="a red fox", options={"delay": 600})["id"])
    sign_in(page, receiver)
    page.goto(f"{receiver.url}/ui#/tasks/{task_id}")
    page.wait_for_selector("#task-status:not([data-status=succeeded]):not([data-status=failed])")
    page.wait_for_selector("#cancel-task")
    return task_id


def test_console_cancels_a_running_task_then_deletes_it(
    browser_page: tuple[Any, Receiver, list[str]],  # noqa: F811
) -> None:
    page, receiver, problems = browser_page
    task_id = open_running_task(page, receiver)
    assert page.locator("#delete-task").count() == 0  # a running task cannot be deleted

    # Asked, and answered no: nothing changes.
    page.click("#cancel-task")
    page.wait_for_selector("#confirm-dialog[open]")
    assert "Cancel this task?" in page.text_content("#confirm-dialog")
    page.click("#confirm-no")
    page.wait_for_selector("#confirm-dialog", state="detached")
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] != "cancelled"

    # Asked, and answered yes: cancelled, shown at once, and now it can be deleted.
    page.click("#cancel-task")
    page.click("#confirm-yes")
    page.wait_for_selector("#task-status[data-status=cancelled]")
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "cancelled"
    page.wait_for_selector("#delete-task")
    assert page.locator("#cancel-task").count() == 0

    page.click("#delete-task")
    page.wait_for_selector("#confirm-dialog[open]")
    assert "cannot be undone" in page.text_content("#confirm-dialog")
    page.click("#confirm-yes")
    page.wait_for_function("() => location.hash === '#/'")
    assert receiver.alice.get(f"/v1/tasks/{task_id}").status_code == 404
    page.wait_for_selector(f"tr[data-task-id={task_id}]", state="detached")
    assert problems == []


def test_console_shows_why_a_cancel_was_refused(
    browser_page: tuple[Any, Receiver, list[str]],  # noqa: F811
) -> None:
    page, receiver, problems = browser_page
    task_id = open_running_task(page, receiver)
    page.click("#cancel-task")
    page.wait_for_selector("#confirm-dialog[open]")
    # Cancelled elsewhere meanwhile (the CLI, another tab): the console's own cancel is a 409.
    assert receiver.alice.post(f"/v1/tasks/{task_id}/cancel").status_code == 200
    page.click("#confirm-yes")
    page.wait_for_selector("#task-error strong:text('task_ended')")
    assert "already ended" in page.text_content("#task-error")
    page.wait_for_selector("#task-status[data-status=cancelled]")
    page.wait_for_selector("#delete-task")
    assert problems == []
