"""The browser console at /ui: its headers and provider list over plain HTTP, and the whole page driven
in a real browser (Debian's chromium through Playwright; skipped, saying why, when it is absent)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.common import png
from tests.harness import ALICE
from tests.harness import Receiver

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TASK_URL = re.compile(r"#/tasks/(tsk_[0-9a-f]{24})$")
TERMINAL = ("succeeded", "failed")


# -- plain HTTP -----------------------------------------------------------------------------------


def test_console_page_is_served_with_a_strict_policy(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver()
    page = receiver.anon.get("/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    # No inline script at all: every <script> loads a file of ours, nothing from elsewhere.
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page.text, flags=re.S)
    assert scripts and all('src="ui/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert "http://" not in page.text and "https://" not in page.text
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        asset = receiver.anon.get(f"/ui/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.headers["x-content-type-options"] == "nosniff"
        again = receiver.anon.get(f"/ui/static/{name}", headers={"If-None-Match": asset.headers["etag"]})
        assert again.status_code == 304
    script = receiver.anon.get("/ui/static/console.js").text
    assert not re.search(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write|\beval\(", script)
    for missing in ("/ui/static/nope.js", "/ui/static/..%2Fconsole.py", "/ui/static/console.html"):
        assert receiver.anon.get(missing).status_code == 404


def test_providers_lists_what_this_deployment_offers(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(KIE_API_KEY="kie-test-key")
    refused = receiver.anon.get("/v1/providers")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert receiver.anon.get("/v1/providers", headers={"Authorization": "Bearer nope"}).status_code == 401
    items = {item["name"]: item for item in receiver.alice.get("/v1/providers").json()["items"]}
    # kie is offered (its key is set); the others sharing no set key are not.
    assert "kie" in items and "apimart" not in items and "fal" not in items
    assert items["sandbox"] == {
        "name": "sandbox",
        "models": ["sandbox"],
        "native_models": [],
        "other_models": None,
        "default_model": "sandbox",
        "accepts_any_model": False,
        "model_inputs": {
            "sandbox": {"min_images": 0, "max_images": 1, "text_to_image": "sandbox", "edit": "sandbox"}
        },
        "takes": {
            "sandbox": {
                "fields": [
                    "aspect_ratio",
                    "images",
                    "model",
                    "num_images",
                    "options",
                    "output_format",
                    "seed",
                ],
                "aspect_ratios": None,  # any W:H from 1:4 to 4:1
                "edit_aspect_ratios": [],
                "resolutions": None,
                "output_formats": ["png"],
                "safety_tolerance": None,
                "edit_safety_tolerance": None,
                "num_images": {"min": 1, "max": 4, "whole": True},
                "options": {},
            }
        },
        "fields": ["aspect_ratio", "images", "model", "num_images", "options", "output_format", "seed"],
        "min_images": 0,
        "max_images": 1,
        "data_uris": "sent as signed links",
        "synchronous": False,
        "limits": {
            "max_concurrent": None,
            "max_concurrent_by_model": {},
            "new_tasks_per_window": None,
            "window_seconds": None,
            "shared_with": [],
        },
        # Its price (built in: the sandbox costs nothing) and no cooldown (docs/keys.md).
        "prices": {
            "sandbox": {"per_image": 0.0, "source": "built in", "taken": "2026-12-08", "verified": True}
        },
        "cooldown_until": None,
    }
    assert items["kie"]["default_model"] == "flux-kontext-pro"
    assert "flux-kontext-max" in items["kie"]["models"]


def test_providers_without_keys_offers_only_the_sandbox(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver()
    names = [item["name"] for item in receiver.bob.get("/v1/providers").json()["items"]]
    assert names == ["sandbox"]


# -- in a real browser ----------------------------------------------------------------------------


@pytest.fixture
def browser_page(start_receiver: Callable[..., Receiver]) -> Iterator[tuple[Any, Receiver, list[str]]]:
    receiver = start_receiver(RECEIVER_SANDBOX_DELAY="0.3")
    with browser() as (page, problems):
        yield page, receiver, problems


@contextmanager
def browser() -> Iterator[tuple[Any, list[str]]]:
    """A page in headless chromium (the test is skipped, saying why, without it), and the script errors
    and refused policies it met, which a test asserts are none."""
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not found ({CHROMIUM}): install Debian's chromium package to run it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15_000)
            # Script errors and refused policies (an inline script, a foreign URL) fail the test.
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: note_console(message, problems))
            yield page, problems
        finally:
            browser.close()


def note_console(message: Any, problems: list[str]) -> None:
    # The browser logs every 4xx answer as an error; those the test provokes on purpose are not problems.
    if message.type == "error" and not message.text.startswith("Failed to load resource"):
        problems.append(f"console: {message.text}")


def rendered_image(page: Any, selector: str) -> list[Any]:
    """Wait until the image is decoded and drawn (naturalWidth > 0); its natural size and src."""
    element = page.wait_for_selector(selector)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=element)
    result: list[Any] = element.evaluate(
        "img => [img.naturalWidth, img.naturalHeight, img.getAttribute('src')]"
    )
    return result


def sign_in(page: Any, receiver: Receiver) -> None:
    page.goto(f"{receiver.url}/ui")
    page.fill("#api-key", "wrong-key-0123456789")
    page.click("#key-form button")
    page.wait_for_selector("#key-error:not([hidden])")
    assert "not valid" in page.text_content("#key-error")
    page.fill("#api-key", ALICE)
    page.click("#key-form button")
    page.wait_for_selector("#nav:not([hidden])")


def test_console_submits_a_sandbox_task_and_shows_its_image(
    browser_page: tuple[Any, Receiver, list[str]], artifacts: Path
) -> None:
    page, receiver, problems = browser_page
    api_requests: list[tuple[str, str, str | None]] = []
    page.on(
        "request",
        lambda request: (
            api_requests.append((request.resource_type, request.url, request.headers.get("authorization")))
            if "/v1/" in request.url
            else None
        ),
    )
    loads: list[str] = []
    page.on("load", lambda _page: loads.append(page.url))

    sign_in(page, receiver)
    assert page.evaluate("sessionStorage.getItem('receiver.apiKey')") == ALICE
    page.wait_for_selector(".empty:not([hidden])")  # a new tenant is told how to start

    page.click("a[data-nav=new]")
    page.wait_for_selector("#task-form")
    assert page.input_value("#provider") == "sandbox"
    prompt = 'A <b>red</b> fox & "friends" <img src=x onerror=alert(1)>'
    page.fill("#prompt", prompt)
    page.select_option("#aspect-ratio", "16:9")
    page.fill("#seed", "7")
    started = time.monotonic()
    page.click("#submit-task")

    page.wait_for_url(TASK_URL)
    match = TASK_URL.search(page.url)
    assert match is not None
    task_id = match.group(1)
    page.wait_for_selector("#task-status[data-status=succeeded]")
    assert time.monotonic() - started < 15
    natural = rendered_image(page, "#task-images img")
    task = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert task["status"] == "succeeded" and task["prompt"] == prompt and task["model"] == "sandbox"
    assert natural[:2] == [task["images"][0]["width"], task["images"][0]["height"]] == [768, 432]
    assert f"/v1/tasks/{task_id}/images/0?expires=" in natural[2]  # the signed link, not the bearer key
    # The prompt is text, never markup.
    assert page.text_content("#task-prompt") == prompt
    assert page.locator("#task-prompt b, #task-prompt img").count() == 0
    timeline = page.text_content("#task-events")
    assert "callback" in timeline and "verified" in timeline
    assert "768 \u00d7 432" in page.text_content("#task-images")
    page.screenshot(path=str(artifacts / "console.png"), full_page=True)

    # Updated in place by long-polling: one page load, no short-interval polling of the task.
    assert len(loads) == 1
    task_gets = [url for _, url, _ in api_requests if re.search(rf"/v1/tasks/{task_id}(\?|$)", url)]
    assert any("wait=25" in url for url in task_gets), task_gets
    assert len(task_gets) <= 4, task_gets
    # Calls to the API carry the key (after the one wrong try); images load by signed link, keyless.
    calls = [auth for kind, _, auth in api_requests if kind == "fetch"]
    assert calls[0] == "Bearer wrong-key-0123456789"
    assert calls[1:] and all(auth == f"Bearer {ALICE}" for auth in calls[1:])
    images = [(url, auth) for kind, url, auth in api_requests if kind == "image"]
    assert images and all("signature=" in url and auth is None for url, auth in images)

    # The list shows it with its thumbnail, and filters the way the list API does.
    page.click("a[data-nav=tasks]")
    row = f"tr[data-task-id={task_id}]"
    page.wait_for_selector(row)
    assert rendered_image(page, f"{row} img.thumb")[0] > 0
    assert page.text_content(f"{row} .status") == "succeeded"
    assert page.text_content(f"{row} .prompt") == prompt
    page.screenshot(path=str(artifacts / "console-list.png"), full_page=True)
    page.select_option("#filter-status", "failed")
    page.wait_for_function("() => location.hash === '#/?status=failed'")
    page.wait_for_selector(".empty:not([hidden])")
    assert page.locator(row).count() == 0
    assert any(url.endswith("/v1/tasks?limit=25&status=failed") for _, url, _ in api_requests)
    page.select_option("#filter-status", "succeeded")
    page.wait_for_selector(row)
    assert problems == []


def test_console_uploads_a_file_and_shows_field_errors(
    browser_page: tuple[Any, Receiver, list[str]], tmp_path: Path, artifacts: Path
) -> None:
    page, receiver, problems = browser_page
    sign_in(page, receiver)
    page.goto(f"{receiver.url}/ui#/new")
    page.wait_for_selector("#task-form")
    # A field the provider refuses comes back as a 422 and is shown beside that field.
    page.fill("#prompt", "too wide")
    page.select_option("#aspect-ratio", "21:9")
    page.fill("#model", "flux-kontext-max")
    page.click("#submit-task")
    page.wait_for_selector("[data-field=model] .field-error:not([hidden])")
    assert "sandbox sells sandbox" in page.text_content("[data-field=model] .field-error")
    page.screenshot(path=str(artifacts / "console-form.png"), full_page=True)
    page.fill("#model", "sandbox")

    picture = tmp_path / "input.png"
    picture.write_bytes(png(40, 30))
    page.set_input_files("#image-file", str(picture))
    page.select_option("#aspect-ratio", "1:1")
    with page.expect_response(lambda response: response.url.endswith("/v1/uploads")) as upload:
        page.click("#submit-task")
    assert upload.value.status == 201
    page.wait_for_url(TASK_URL)
    page.wait_for_selector("#task-status[data-status=succeeded]")
    match = TASK_URL.search(page.url)
    assert match is not None
    tasks = receiver.alice.get("/v1/tasks").json()["items"]
    assert [task["id"] for task in tasks] == [match.group(1)]  # the refused try made no task
    page.click("#forget-key")
    page.wait_for_selector("#key-view:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('receiver.apiKey')") is None
    assert problems == []


def test_console_follows_a_running_task_in_the_list_and_shows_errors(
    browser_page: tuple[Any, Receiver, list[str]], artifacts: Path
) -> None:
    page, receiver, problems = browser_page
    failed = receiver.submit(provider="sandbox", prompt="refused", options={"outcome": "content_moderated"})
    receiver.wait(failed["id"])
    for number in range(25):  # enough for a second page
        receiver.submit(
            provider="sandbox", prompt=f"filler {number}", options={"outcome": "generation_failed"}
        )
    slow = receiver.submit(provider="sandbox", prompt="slow one", options={"delay": 2})
    loads: list[str] = []
    page.on("load", lambda _page: loads.append(page.url))
    sign_in(page, receiver)
    row = f"tr[data-task-id={slow['id']}]"
    page.wait_for_selector(row)
    assert page.get_attribute(f"{row} .status", "data-status") not in TERMINAL
    assert page.locator(f"{row} img.thumb").count() == 0
    # No reload: the list long-polls the running task and redraws its row when it ends.
    page.wait_for_selector(f"{row} .status[data-status=succeeded]", timeout=15_000)
    assert rendered_image(page, f"{row} img.thumb")[0] > 0
    assert len(loads) == 1
    failed_row = f"tr[data-task-id={failed['id']}]"
    assert page.locator("table.tasks tbody tr").count() == 25 and page.locator(failed_row).count() == 0
    page.click("#load-more")
    page.wait_for_selector(failed_row)
    assert page.locator("table.tasks tbody tr").count() == 27
    assert page.locator("#load-more").is_hidden()
    assert "content_moderated" in page.text_content(f"{failed_row} .error-line")

    page.click(f"{failed_row} a.prompt")
    page.wait_for_selector("#task-status[data-status=failed]")
    assert "content_moderated" in page.text_content("#task-error")
    assert page.text_content("#task-images") == "This task has no images."
    assert "null" not in page.text_content(".toolbar")
    page.screenshot(path=str(artifacts / "console-failed.png"), full_page=True)
    assert problems == []


def test_the_task_page_shows_the_fallback_hops(start_fake: Callable[..., Any], tmp_path: Any) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not found ({CHROMIUM}): install Debian's chromium package to run it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from tests.fakes.kie import GENERATE
    from tests.fakes.kie import KieFake
    from tests.harness import served_receiver

    kie = start_fake(KieFake)
    kie.script(GENERATE, 200, {"code": 402, "msg": "Insufficient credits"})
    with served_receiver(
        tmp_path / "hops", {**kie.receiver_env(), "RECEIVER_SANDBOX_DELAY": "0.05"}
    ) as receiver:
        task = receiver.submit(provider="kie", prompt="a quiet harbour", fallback=["sandbox"])
        assert receiver.wait(str(task["id"]))["provider"] == "sandbox"
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(15_000)
                sign_in(page, receiver)
                page.goto(f"{receiver.url}/ui#/tasks/{task['id']}")
                page.wait_for_selector("#task-attempts")
                tried = page.text_content("#task-attempts")
                assert "kie" in tried and "provider_rejected: Insufficient credits" in tried
                assert "moved from kie to sandbox" in page.text_content("#task-events")
            finally:
                browser.close()
