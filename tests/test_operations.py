"""Operations: structured logs without secrets, metrics, and graceful shutdown of a real process."""

from __future__ import annotations

import base64
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver import __version__
from receiver import metrics
from receiver.logs import url_host
from receiver.metrics import HttpMetrics
from tests.fakes.common import png
from tests.fakes.kie import HMAC_KEY
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import ALICE
from tests.harness import BOB
from tests.harness import Receiver
from tests.harness import ReceiverProcess
from tests.harness import Served
from tests.test_notify import AppHook
from tests.test_notify import hook  # noqa: F401 - the fixture

SECRET_KEY = "s3cr3t-key-for-tokens-and-links-0123456789"
NOTIFY_SECRET = "whsec_" + base64.b64encode(b"notify-secret-bytes-0123456789ab").decode()


def client_for(process: ReceiverProcess) -> httpx.Client:
    return httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)


def wait_until(predicate: Callable[[], object], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_full_task_logs_one_json_line_per_event_and_no_secret(
    tmp_path: Path,
    hook: Callable[..., AppHook],  # noqa: F811
) -> None:
    kie = KieFake().start()
    app = hook()
    env = {
        **kie.receiver_env(),
        "RECEIVER_SECRET_KEY": SECRET_KEY,
        "RECEIVER_NOTIFY_SECRET": NOTIFY_SECRET,
        "RECEIVER_LOG_FORMAT": "json",
        "RECEIVER_LOG_LEVEL": "DEBUG",
    }
    process = ReceiverProcess(tmp_path / "data", env).start()
    try:
        picture = png(16, 16)
        data_uri = "data:image/png;base64," + base64.b64encode(picture).decode()
        with client_for(process) as client:
            task = client.post(
                "/v1/tasks",
                json={"provider": "kie", "prompt": "log me", "images": [data_uri], "notify_url": app.url},
            ).json()
            wait_until(lambda: client.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted")
            kie_id = kie.last_task_id()
            assert kie.succeed(kie_id, kie.host("logged.png")).status_code == 200
            done = client.get(f"/v1/tasks/{task['id']}", params={"wait": 20}).json()
            assert done["status"] == "succeeded"
            app.wait_for(1)
            httpx.post(kie.callback_urls[kie_id][:-3] + "xyz", content=b"{}")  # a refused one, logged too
            upload = client.post("/v1/uploads", content=picture, headers={"Content-Type": "image/png"}).json()
        assert process.terminate() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    finally:
        kie.stop()

    lines = [line for line in process.log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    mine = [r for r in records if r.get("task_id") == task["id"]]
    messages = [r["message"] for r in mine]
    for expected in (
        "task created",
        "task submitted",
        "callback accepted",
        "image stored",
        "notification delivered",
    ):
        assert expected in messages, (expected, messages)
    assert all(
        r.get("provider") == "kie" for r in mine if r["message"] in ("task submitted", "callback accepted")
    )
    assert any(r["message"] == "callback rejected_bad_token" for r in records)
    assert [r["message"] for r in records if r["logger"] == "receiver"][-2:] == ["shutting down", "stopped"]

    token = urlsplit(kie.callback_urls[kie_id]).path.rsplit("/", 1)[1]
    link_signatures = [
        parse_qs(urlsplit(url).query)["signature"][0]
        for url in (
            done["images"][0]["url"],
            upload["url"],
            kie.calls("/api/v1/flux/kontext/generate")[0].json()["inputImage"],
        )
    ]
    secrets = [
        SECRET_KEY,
        NOTIFY_SECRET,
        NOTIFY_SECRET.removeprefix("whsec_"),
        ALICE,
        BOB,
        KEY,
        HMAC_KEY,
        token,
        token.split(".")[-1],
        *link_signatures,
    ]
    text = process.log.read_text()
    for secret in secrets:
        assert secret not in text, f"a secret reached the log: {secret[:6]}…"


def test_text_logs_on_request(tmp_path: Path) -> None:
    process = ReceiverProcess(tmp_path / "data", {"RECEIVER_LOG_FORMAT": "text"}).start()
    with client_for(process) as client:
        client.post("/v1/tasks", json={"provider": "sandbox", "prompt": "hello"})
    process.terminate()
    line = next(line for line in process.log.read_text().splitlines() if "task created" in line)
    assert "task_id=tsk_" in line and "provider=sandbox" in line
    assert not line.startswith("{")


def test_a_logged_host_is_a_host() -> None:
    assert url_host("https://user:pw@cdn.example:8443/a/b.png?signature=xyz&exp=1") == "cdn.example:8443"
    assert url_host("https://cdn.example/a/b.png?signature=xyz") == "cdn.example"
    assert url_host("http://[::1]:9000/hook") == "[::1]:9000"


def test_metrics_after_real_traffic(kie: KieFake, kie_receiver: Receiver) -> None:
    def scrape() -> str:
        return kie_receiver.anon.get("/metrics").text

    def value(text: str, line_start: str) -> float:
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = scrape()
    task = kie_receiver.submit(provider="kie", prompt="count me")
    kie_receiver.wait_status(task["id"], "submitted")
    kie_id = kie.last_task_id()
    kie.succeed(kie_id, kie.host("m.png"))
    assert kie_receiver.wait(task["id"])["status"] == "succeeded"
    httpx.post(kie.callback_urls[kie_id][:-3] + "xyz", content=b"{}")
    failing = kie_receiver.submit(provider="kie", prompt="missing image")
    kie_receiver.wait_status(failing["id"], "submitted")
    kie.succeed(kie.last_task_id(), f"{kie.url}/files/nothing.png")
    assert kie_receiver.wait(failing["id"])["status"] == "failed"
    after = scrape()
    for series in (
        'receiver_callbacks_total{provider="kie",result="accepted"}',
        'receiver_callbacks_total{provider="kie",result="rejected_bad_token"}',
        'receiver_callbacks_applied_total{provider="kie",result="changed"}',
        'receiver_downloads_total{result="stored"}',
        'receiver_downloads_total{result="http_404"}',
        'receiver_provider_requests_total{endpoint="submit",provider="kie",status="200"}',
        "receiver_download_bytes_total",
        'receiver_callback_seconds_count{provider="kie"}',
    ):
        assert value(after, series) > value(before, series), series
    assert 'receiver_tasks{provider="kie",status="succeeded"} 1.0' in after
    assert 'receiver_tasks{provider="kie",status="failed"} 1.0' in after
    assert "receiver_oldest_due_job_seconds" in after and "receiver_jobs_due" in after


def _slow_download_task(kie: KieFake, process: ReceiverProcess, name: str, seconds: float) -> str:
    image = png(100, 100) + bytes(640 * 1024)
    url = kie.host(name, image)
    kie.files[name].chunk_delay = seconds / 10  # ten chunks of 64 KiB
    with client_for(process) as client:
        task = client.post("/v1/tasks", json={"provider": "kie", "prompt": name}).json()
        wait_until(lambda: client.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted")
    kie.succeed(kie.last_task_id(), url)
    wait_until(lambda: kie.files[name].fetches == 1)
    return str(task["id"])


def test_sigterm_lets_a_running_download_finish_within_the_grace(kie: KieFake, tmp_path: Path) -> None:
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, "RECEIVER_SHUTDOWN_GRACE": "15"}
    process = ReceiverProcess(tmp_path / "data", env).start()
    task_id = _slow_download_task(kie, process, "grace.png", seconds=2.0)
    assert process.process is not None
    started = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(20) in (0, -signal.SIGTERM)
    assert 0.5 < time.monotonic() - started < 12  # it waited for the download, not for the whole grace
    assert '"jobs_left_for_next_start": 0' in process.log.read_text()
    process = ReceiverProcess(tmp_path / "data", env, port=process.port).start()
    with client_for(process) as client:
        assert client.get(f"/v1/tasks/{task_id}").json()["status"] == "succeeded"
    assert kie.files["grace.png"].fetches == 1  # finished before the exit: not fetched again
    process.terminate()


def test_sigterm_after_the_grace_leaves_the_rest_for_the_next_start(kie: KieFake, tmp_path: Path) -> None:
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, "RECEIVER_SHUTDOWN_GRACE": "0.5"}
    process = ReceiverProcess(tmp_path / "data", env).start()
    task_id = _slow_download_task(kie, process, "cut.png", seconds=30.0)
    assert process.process is not None
    started = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(20) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 6
    assert '"jobs_left_for_next_start": 1' in process.log.read_text()
    kie.files["cut.png"].chunk_delay = 0.0
    process = ReceiverProcess(tmp_path / "data", env, port=process.port).start()
    with client_for(process) as client:
        done = client.get(f"/v1/tasks/{task_id}", params={"wait": 20}).json()
        assert done["status"] == "succeeded"
    assert kie.files["cut.png"].fetches == 2
    assert not list((tmp_path / "data" / "media").rglob("*.part"))
    process.terminate()


def test_http_requests_by_route_template_build_info_and_process_collectors(
    start_receiver: Callable[..., Receiver],
) -> None:
    receiver = start_receiver()
    task = receiver.submit(provider="sandbox", prompt="count my requests")
    assert receiver.wait(task["id"])["status"] == "succeeded"
    assert receiver.alice.get(f"/v1/tasks/{task['id']}/images/0").status_code == 200
    assert receiver.anon.get(f"/v1/tasks/{task['id']}").status_code == 401
    assert receiver.alice.get("/no/such/route/tsk_123").status_code == 404
    text = receiver.anon.get("/metrics").text
    for series in (
        'receiver_http_requests_total{method="POST",route="/v1/tasks",status="202"}',
        'receiver_http_requests_total{method="GET",route="/v1/tasks/{id}",status="200"}',
        'receiver_http_requests_total{method="GET",route="/v1/tasks/{id}",status="401"}',
        'receiver_http_requests_total{method="GET",route="/v1/tasks/{id}/images/{index}",status="200"}',
        'receiver_http_requests_total{method="POST",route="/callbacks/{provider}/{token}",status="200"}',
        'receiver_http_requests_total{method="GET",route="unmatched",status="404"}',
        'receiver_http_request_seconds_count{method="GET",route="/v1/tasks/{id}"}',
        'receiver_http_request_seconds_bucket{le="0.1",method="POST",route="/v1/tasks"}',
    ):
        assert any(line.startswith(series + " ") for line in text.splitlines()), series
    # Labels carry templates only: no task id, no callback token, no stray path.
    assert task["id"] not in text and "tsk_123" not in text
    # The process and Python collectors, the build info, and no `_created` series.
    for name in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "python_info",
    ):
        assert f"\n{name}" in text, name
    assert "python_gc_collections_total" in text
    assert f'receiver_build_info{{python="{platform.python_version()}",version="{__version__}"}} 1.0' in text
    assert "_created" not in text


def test_an_unhandled_exception_counts_as_a_500() -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    app = Starlette(routes=[Route("/broken/{thing}", broken)], middleware=[Middleware(HttpMetrics)])
    served = Served(app).start()
    series = 'receiver_http_requests_total{method="GET",route="/broken/{thing}",status="500"}'

    def count() -> float:
        lines = [line for line in metrics.render().decode().splitlines() if line.startswith(series + " ")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    try:
        before = count()
        assert httpx.get(f"{served.url}/broken/x1", timeout=10).status_code == 500
        assert count() == before + 1
    finally:
        served.stop()


def test_a_second_serve_on_a_port_in_use_fails_before_it_says_anything_else(tmp_path: Path) -> None:
    first = ReceiverProcess(tmp_path / "first", {}).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
        second = subprocess.run(
            [sys.executable, "-m", "receiver", "serve", "--port", str(first.port)],
            env={**env, "RECEIVER_DATA_DIR": str(tmp_path / "second"), "RECEIVER_LOG_FORMAT": "json"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr == f"receiver: cannot listen on 127.0.0.1:{first.port}: Address already in use\n"
    finally:
        first.terminate()


def test_every_task_end_is_one_info_line_whatever_the_path(tmp_path: Path) -> None:
    kie = KieFake(hmac_key=None).start()
    env = {**kie.receiver_env(), "RECEIVER_LOG_FORMAT": "json"}
    process = ReceiverProcess(tmp_path / "data", env).start()
    late_process = ReceiverProcess(tmp_path / "late", {**env, "RECEIVER_TASK_DEADLINE": "1"})
    expected: dict[str, str | None] = {}
    try:
        with client_for(process) as client:

            def create(**body: Any) -> str:
                response = client.post("/v1/tasks", json={"prompt": "one line", **body})
                assert response.status_code == 202, response.text
                return str(response.json()["id"])

            expected[create(provider="sandbox")] = None  # succeeded: stored by the download
            expected[create(provider="sandbox", options={"outcome": "generation_failed"})] = (
                "generation_failed"
            )
            kie.script(kie.submit_path, 200, {"code": 402, "msg": "Credits insufficient"})
            expected[create(provider="kie")] = "provider_rejected"  # failed at submit
            missing = create(provider="kie")
            wait_until(lambda: client.get(f"/v1/tasks/{missing}").json()["status"] == "submitted")
            kie.succeed(kie.last_task_id(), f"{kie.url}/files/nothing.png")
            expected[missing] = "download_failed"
            for task_id in expected:
                task = client.get(f"/v1/tasks/{task_id}", params={"wait": "30"}).json()
                assert task["status"] in ("succeeded", "failed"), task
        late_process.start()
        with client_for(late_process) as client:
            late = client.post(
                "/v1/tasks",
                json={"provider": "sandbox", "prompt": "never", "options": {"outcome": "no_callback"}},
            ).json()["id"]
            assert client.get(f"/v1/tasks/{late}", params={"wait": "30"}).json()["status"] == "failed"
            expected[late] = "timed_out"  # failed by the deadline
    finally:
        process.terminate()
        if late_process.process is not None:
            late_process.terminate()
        kie.stop()
    lines = [
        json.loads(line) for log in (process.log, late_process.log) for line in log.read_text().splitlines()
    ]
    ends = [line for line in lines if line.get("message") in ("task succeeded", "task failed")]
    assert sorted(line["task_id"] for line in ends) == sorted(expected)  # each task once, and only once
    for line in ends:
        assert line["level"] == "info", line
        code = expected[line["task_id"]]
        assert line["message"] == ("task succeeded" if code is None else "task failed"), line
        assert line.get("error") == code, line
        assert line["provider"] in ("sandbox", "kie") and line["seconds"] >= 0
