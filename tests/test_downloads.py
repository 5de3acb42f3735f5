"""Downloads end to end: refusals, retries, the size cap (with flat memory), and the address guard."""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from receiver.downloads import DownloadError
from receiver.downloads import fetch_image
from receiver.downloads import is_public
from receiver.media import LocalMedia
from receiver.transport import outside_client
from tests.fakes.common import big_png
from tests.fakes.common import png
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import ReceiverProcess


def run_task(receiver: Receiver, kie: KieFake, url: str) -> dict[str, object]:
    task = receiver.submit(provider="kie", prompt="p")
    receiver.wait_status(str(task["id"]), "submitted")
    assert kie.succeed(kie.last_task_id(), url).status_code == 200
    return receiver.wait(str(task["id"]))


def test_a_link_that_is_not_an_image_fails_the_task(kie: KieFake, kie_receiver: Receiver) -> None:
    done = run_task(kie_receiver, kie, kie.host("page.html", b"<html>hello, not an image</html>" * 10))
    assert done["status"] == "failed"
    assert done["error"] == {
        "code": "download_failed",
        "message": "image 0: the link did not give a PNG, JPEG or WebP image",
        "provider_code": None,
    }


def test_a_missing_image_fails_without_retries(kie: KieFake, kie_receiver: Receiver) -> None:
    done = run_task(kie_receiver, kie, f"{kie.url}/files/never-there.png")
    assert done["error"]["code"] == "download_failed"  # type: ignore[index]
    assert "HTTP 404" in done["error"]["message"]  # type: ignore[index]


def test_three_failures_then_success(kie: KieFake, kie_receiver: Receiver) -> None:
    url = kie.host("flaky.png", failures=deque([503, 429, 500]))
    done = run_task(kie_receiver, kie, url)
    assert done["status"] == "succeeded"
    assert kie.files["flaky.png"].fetches == 4
    tries = [e["summary"] for e in kie_receiver.events(str(done["id"])) if e["kind"] == "download"]
    assert [s.split(":")[0] for s in tries[:3]] == [
        "image 0 try 1 failed",
        "image 0 try 2 failed",
        "image 0 try 3 failed",
    ]


@pytest.mark.parametrize(
    "url",
    ["http://[::1", "http://example.com:99999/a.png", "http://" + "a" * 70_000 + "/a.png", "ftp://x/a.png"],
    ids=["bracket", "port", "long-host", "ftp"],
)
def test_a_result_link_that_cannot_be_parsed_fails_the_task_at_once(
    kie: KieFake, kie_receiver: Receiver, url: str
) -> None:
    done = run_task(kie_receiver, kie, url)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "download_failed"  # type: ignore[index]
    tries = [e for e in kie_receiver.events(str(done["id"])) if e["kind"] == "download"]
    assert len(tries) == 1, tries  # failed on the first try, never retried


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gopher://example.com/", "http://[::1/x"])
def test_a_redirect_off_http_is_a_refusal_not_a_retry(
    kie: KieFake, kie_receiver: Receiver, location: str
) -> None:
    done = run_task(kie_receiver, kie, kie.host("moved.png", redirect=location))
    assert done["status"] == "failed"
    assert done["error"]["code"] == "download_failed"  # type: ignore[index]
    assert "refused" in done["error"]["message"]  # type: ignore[index]
    assert kie.files["moved.png"].fetches == 1


def test_transient_failures_give_up_after_the_schedule(kie: KieFake, kie_receiver: Receiver) -> None:
    url = kie.host("down.png", failures=deque([503] * 10))
    done = run_task(kie_receiver, kie, url)
    assert done["error"]["code"] == "download_failed"  # type: ignore[index]
    assert "after 5 tries" in done["error"]["message"]  # type: ignore[index]
    assert kie.files["down.png"].fetches == 5  # RECEIVER_DOWNLOAD_RETRY_DELAYS has four steps in tests


def test_result_links_on_private_addresses_are_refused(
    kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, RECEIVER_ALLOW_PRIVATE_URLS=0)
    url = kie.host("internal.png")
    done = run_task(receiver, kie, url)
    assert done["error"]["code"] == "download_failed"  # type: ignore[index]
    assert "refused: 127.0.0.1 resolves to the non-public address 127.0.0.1" in done["error"]["message"]  # type: ignore[index]
    assert kie.files["internal.png"].fetches == 0  # not even one connection was made


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("224.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("64:ff9b:1::a00:1", False),  # local-use NAT64 of 10.0.0.1
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::10.0.0.1", False),
        ("::8.8.8.8", True),
        ("::ffff:0:127.0.0.1", False),  # IPv4-translated (SIIT)
        ("::ffff:0:a9fe:a9fe", False),
        ("fec0::1", False),  # site-local
        ("fee0::1", False),
        ("::", False),
    ],
)
def test_the_address_rule(address: str, public: bool) -> None:
    assert is_public(address) is public


def _peak_rss_kib(pid: int) -> dict[int, int]:
    """The peak RSS of the service and of each process under it (the download process)."""
    pids = [pid]
    for each in pids:
        for task in Path(f"/proc/{each}/task").iterdir():
            pids += [int(child) for child in (task / "children").read_text().split()]
    peaks = {}
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks[each] = int(line.split()[1])
    return peaks


def test_memory_stays_flat_for_big_and_oversized_images(
    kie: KieFake, tmp_path: Path, media_env: dict[str, str]
) -> None:
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, "RECEIVER_MAX_IMAGE_BYTES": str(40 * 1024 * 1024)}
    process = ReceiverProcess(tmp_path / "data", {**env, **media_env}).start()
    try:
        assert process.process is not None
        client = httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
        client.get("/v1/tasks")  # warm up
        cases = {
            "warm.png": (png(), "succeeded"),  # starts the download process before the baseline
            "fits.png": (big_png(35 * 1024 * 1024), "succeeded"),
            "declared.png": (big_png(60 * 1024 * 1024), "failed"),  # refused on Content-Length
            "streamed.png": (big_png(60 * 1024 * 1024), "failed"),  # no length: capped while streaming
        }
        for name, (body, expected) in cases.items():
            url = kie.host(name, body)
            if name == "streamed.png":
                kie.files[name].chunk_delay = 0.000001  # forces a streamed answer without Content-Length
            task = client.post("/v1/tasks", json={"provider": "kie", "prompt": name}).json()
            deadline = time.monotonic() + 10
            while client.get(f"/v1/tasks/{task['id']}").json()["status"] != "submitted":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            kie.succeed(kie.last_task_id(), url)
            done = client.get(f"/v1/tasks/{task['id']}", params={"wait": 30}).json()
            assert done["status"] == expected, (name, done)
            if expected == "failed":
                assert "cap" in done["error"]["message"]
            if name == "warm.png":
                before = _peak_rss_kib(process.process.pid)
        after = _peak_rss_kib(process.process.pid)
        growth_mib = sum(after[pid] - before.get(pid, 0) for pid in after) / 1024
        assert growth_mib < 30, f"peak RSS grew {growth_mib:.1f} MiB"
        stored = client.get(f"/v1/tasks/{task['id']}")
        assert stored.status_code == 200
        assert not list((tmp_path / "data" / "media").rglob("*.part"))
        client.close()
    finally:
        process.kill()


def _open_under(root: Path) -> list[str]:
    """The files under `root` this process holds open."""
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            targets.append(os.readlink(fd))
        except FileNotFoundError:
            pass  # closed meanwhile (the listing's own descriptor)
    return [target for target in targets if target.startswith(str(root))]


def test_a_stream_cut_midway_stores_nothing_and_closes_its_file(kie: KieFake, tmp_path: Path) -> None:
    """Cut while earlier chunks are still being hashed and written in their threads."""
    url = kie.host("cut.png", big_png(24 * 1024 * 1024), cut_after=17 * 1024 * 1024 + 5)
    media = LocalMedia(tmp_path / "media")

    async def fetch() -> DownloadError:
        async with outside_client(allow_private=True, timeout=30) as client:
            with pytest.raises(DownloadError) as cut:
                await fetch_image(client, url, media, "tsk_cut/0", 64 * 1024 * 1024)
            return cut.value

    error = asyncio.run(fetch())
    assert (error.kind, error.permanent) == ("network", False)  # tried again later
    assert [p for p in (tmp_path / "media").rglob("*") if p.is_file()] == []  # neither image nor temp
    assert _open_under(tmp_path) == []


def test_a_download_cancelled_midway_stores_nothing_and_closes_its_file(kie: KieFake, tmp_path: Path) -> None:
    """A worker that stops cancels its downloads: the write in flight ends first, then the temp goes."""
    url = kie.host("slow.png", big_png(16 * 1024 * 1024), chunk_delay=0.002)
    media = LocalMedia(tmp_path / "media")

    async def cancel_midway() -> None:
        async with outside_client(allow_private=True, timeout=30) as client:
            task = asyncio.create_task(fetch_image(client, url, media, "tsk_slow/0", 64 * 1024 * 1024))
            deadline = time.monotonic() + 30
            while not any(part.stat().st_size for part in (tmp_path / "media").rglob("*.part")):
                assert not task.done() and time.monotonic() < deadline
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(cancel_midway())
    assert [p for p in (tmp_path / "media").rglob("*") if p.is_file()] == []
    assert _open_under(tmp_path) == []
