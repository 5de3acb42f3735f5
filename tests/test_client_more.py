"""receiver.client finishing the job, over real HTTP to the served receiver: generate(), a task or an id
everywhere, providers(), retries through a proxy that drops and refuses calls, sync/async parity, the
types against the server's schema, and the client running with nothing but httpx and the standard
library (vendored as docs/client.md says)."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import inspect
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from packaging.requirements import Requirement

from receiver import client as client_module
from receiver import schema
from receiver.client import ApiError
from receiver.client import AsyncClient
from receiver.client import Client
from receiver.client import ServiceUnreachable
from receiver.client import TaskFailed
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import bound_socket

ROOT = Path(__file__).resolve().parent.parent
Fault = str | int  # "drop": closed before it reaches the service; "lose": the answer is lost; or a status


@pytest.fixture
def receiver(start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver()


class FlakyProxy:
    """A TCP proxy in front of the receiver that spoils chosen requests, one request a connection.

    `fail(method, pattern, fault)` spoils the next request whose method matches and whose target
    matches the regex: "drop" closes the connection before the service sees it, "lose" lets the
    service act and then closes without its answer (a long-poll cut by a proxy), a number answers that
    status itself. `seen` lists (method, target, what happened) for every request.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream_port = int(upstream.rsplit(":", 1)[1])
        self.sock = bound_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.faults: list[tuple[str, re.Pattern[str], Fault]] = []
        self.seen: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._serve(),), daemon=True
        )

    def fail(self, method: str, pattern: str, fault: Fault) -> None:
        with self.lock:
            self.faults.append((method, re.compile(pattern), fault))

    def happened(self, method: str, pattern: str) -> list[str]:
        with self.lock:
            return [what for m, target, what in self.seen if m == method and re.search(pattern, target)]

    def start(self) -> FlakyProxy:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)
        self.sock.close()

    async def _serve(self) -> None:
        self.stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, sock=self.sock)
        self.ready.set()
        async with server:
            await self.stopping.wait()

    def _take(self, method: str, target: str) -> Fault | None:
        with self.lock:
            for n, (m, pattern, fault) in enumerate(self.faults):
                if m == method and pattern.search(target):
                    del self.faults[n]
                    return fault
            return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = sum(
                int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
            )
            body = await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()
            return
        fault = self._take(method, target)
        with self.lock:
            self.seen.append((method, target, "passed" if fault is None else str(fault)))
        try:
            if isinstance(fault, int):
                writer.write(
                    f"HTTP/1.1 {fault} Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
                )
                await writer.drain()
            elif fault != "drop":
                kept = [line for line in lines[1:] if line and not line.lower().startswith("connection:")]
                request = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode() + body
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                up_writer.write(request)
                await up_writer.drain()
                answer = await up_reader.read()  # the whole answer: the service closes after it
                up_writer.close()
                if fault != "lose":
                    writer.write(answer)
                    await writer.drain()
        finally:
            writer.close()


@pytest.fixture
def proxy(receiver: Receiver) -> Iterator[FlakyProxy]:
    flaky = FlakyProxy(receiver.url).start()
    yield flaky
    flaky.stop()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generate_creates_waits_saves_and_returns_the_task(receiver: Receiver, tmp_path: Path) -> None:
    seen: list[str] = []
    with Client(receiver.url, ALICE) as client:
        task = client.generate(
            "sandbox",
            "a red fox in the snow",
            out=tmp_path / "out",
            num_images=2,
            metadata={"order": 7},
            on_progress=lambda t, _: seen.append(t["status"]),
        )
        assert task["status"] == "succeeded" and task["metadata"] == {"order": 7} and seen[-1] == "succeeded"
        saved = sorted((tmp_path / "out").iterdir())
        assert [p.name for p in saved] == [f"{task['id']}-0.png", f"{task['id']}-1.png"]
        assert [sha256(p) for p in saved] == [image["sha256"] for image in task["images"]]

        with pytest.raises(TaskFailed) as failed:
            client.generate(
                "sandbox", "doomed", out=tmp_path / "none", options={"outcome": "generation_failed"}
            )
        assert failed.value.task["status"] == "failed"
        assert failed.value.task["error"] is not None
        assert "generation_failed" in str(failed.value)
        assert not (tmp_path / "none").exists()


def test_every_method_takes_a_task_or_an_id(receiver: Receiver, tmp_path: Path) -> None:
    with Client(receiver.url, ALICE) as client:
        created = client.create("sandbox", "a kite")
        task_id = created["id"]
        assert client.wait(task_id, timeout=30)["status"] == "succeeded"
        done = client.get(created)
        assert client.get(task_id)["id"] == done["id"] == task_id and done["status"] == "succeeded"
        assert [e["kind"] for e in client.events(done)] == [e["kind"] for e in client.events(task_id)]
        [by_id] = client.download_images(task_id, tmp_path / "by-id")
        [by_task] = client.download_images(done, tmp_path / "by-task")
        assert sha256(by_id) == sha256(by_task) == done["images"][0]["sha256"]
        assert client.download(task_id, 0, tmp_path / "one.png") == done["images"][0]["size"]


def test_providers_lists_what_the_deployment_offers(receiver: Receiver) -> None:
    with Client(receiver.url, ALICE) as client:
        offered = client.providers()
    sandbox = next(p for p in offered if p["name"] == "sandbox")
    assert sandbox["default_model"] in sandbox["models"] and sandbox["max_images"] >= 1
    assert "kie" not in [p["name"] for p in offered]  # no key set, not offered


def test_wait_and_downloads_ride_out_dropped_calls_and_502_503_504(
    receiver: Receiver, proxy: FlakyProxy, tmp_path: Path
) -> None:
    task = receiver.submit(provider="sandbox", prompt="a slow boat", options={"delay": 1})
    task_path = rf"^/v1/tasks/{task['id']}(\?|$)"
    proxy.fail("GET", task_path, "drop")
    proxy.fail("GET", task_path, 503)
    proxy.fail("GET", r"wait=", "lose")  # a long-poll cut off mid-wait
    proxy.fail("GET", task_path, 502)
    proxy.fail("GET", r"/images/0$", 504)
    proxy.fail("GET", r"/images/0$", "lose")
    with Client(proxy.url, ALICE, backoff=0.01) as client:
        done = client.wait(task["id"], timeout=60)
        assert done["status"] == "succeeded"
        [path] = client.download_images(done, tmp_path)
    assert sha256(path) == done["images"][0]["sha256"]
    assert proxy.happened("GET", task_path)[:2] == ["drop", "503"]
    assert "lose" in proxy.happened("GET", r"wait=") and "502" in proxy.happened("GET", task_path)
    assert proxy.happened("GET", r"/images/0$") == ["504", "lose", "passed"]


def test_a_create_is_repeated_only_with_an_idempotency_key(receiver: Receiver, proxy: FlakyProxy) -> None:
    with Client(proxy.url, ALICE, backoff=0.01) as client:
        proxy.fail("POST", r"^/v1/tasks$", "lose")
        with pytest.raises(ServiceUnreachable):
            client.create("sandbox", "no key: sent once")
        assert proxy.happened("POST", r"^/v1/tasks$") == ["lose"]

        proxy.fail("POST", r"^/v1/tasks$", "lose")
        proxy.fail("POST", r"^/v1/tasks$", 503)
        task = client.create("sandbox", "with a key: sent again", idempotency_key="k-1")
        assert proxy.happened("POST", r"^/v1/tasks$")[1:] == ["lose", "503", "passed"]
        # The service made it once (the lost answer's task), and the key found it again.
        prompts = [t["prompt"] for t in client.list_tasks()]
        assert prompts.count("with a key: sent again") == 1 and task["prompt"] == "with a key: sent again"


def test_generate_always_sends_a_key_so_a_lost_answer_makes_one_task(
    receiver: Receiver, proxy: FlakyProxy, tmp_path: Path
) -> None:
    proxy.fail("POST", r"^/v1/tasks$", "lose")
    proxy.fail("GET", r"wait=", "lose")

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(proxy.url, ALICE, backoff=0.01) as client:
            task = await client.generate("sandbox", "exactly one lighthouse", out=tmp_path)
            listed = [t async for t in client.list_tasks()]
            assert [t["id"] for t in listed] == [task["id"]]
            return dict(task)

    task = asyncio.run(scenario())
    assert proxy.happened("POST", r"^/v1/tasks$") == ["lose", "passed"]
    assert sha256(tmp_path / f"{task['id']}-0.png") == task["images"][0]["sha256"]


def test_a_service_that_stays_away_is_reported_after_the_retries(
    receiver: Receiver, proxy: FlakyProxy
) -> None:
    for _ in range(3):
        proxy.fail("GET", r"^/v1/tasks(\?|$)", 503)
    with Client(proxy.url, ALICE, retries=2, backoff=0.01) as client, pytest.raises(ApiError) as refused:
        client.list_page()
    assert refused.value.status == 503
    assert proxy.happened("GET", r"^/v1/tasks(\?|$)") == ["503", "503", "503"]


def _normalised(signature: inspect.Signature) -> str:
    return str(signature).replace("Async", "")


def test_the_sync_and_async_clients_have_the_same_methods_signatures_and_docstrings() -> None:
    renamed = {"close": "aclose"}

    def public(cls: type) -> dict[str, Any]:
        return {name: member for name, member in vars(cls).items() if not name.startswith("_")}

    sync, awaited = public(Client), public(AsyncClient)
    assert {renamed.get(name, name) for name in sync} == set(awaited)
    for name, method in sync.items():
        twin = awaited[renamed.get(name, name)]
        assert inspect.iscoroutinefunction(twin) or inspect.isasyncgenfunction(twin), name
        assert _normalised(inspect.signature(method)) == _normalised(inspect.signature(twin)), name
        assert method.__doc__ and method.__doc__ == twin.__doc__, name
    assert _normalised(inspect.signature(Client.__init__)) == _normalised(
        inspect.signature(AsyncClient.__init__)
    )
    assert Client.__doc__ and AsyncClient.__doc__


# The client's types and the server's Structs they mirror.
MIRRORS: dict[type, type[msgspec.Struct]] = {
    client_module.Task: schema.Task,
    client_module.TaskImage: schema.Image,
    client_module.TaskError: schema.TaskFailure,
    client_module.Attempt: schema.Attempt,
    client_module.Page: schema.TaskPage,
    client_module.Event: schema.Event,
    client_module.Upload: schema.Upload,
    client_module.ProviderInfo: schema.ProviderInfo,
    client_module.ProviderLimits: schema.ProviderLimits,
    client_module.ModelInputs: schema.ModelInputs,
    client_module.ModelTakes: schema.ModelTakes,
    client_module.NumberRange: schema.NumberRange,
}


def _shape(node: dict[str, Any], defs: dict[str, Any], names: dict[str, str], nullable: bool = True) -> Any:
    """What a JSON Schema node allows, reduced to what both sides can say alike: JSON types, with a
    reference named by the server's Struct and any enum or literal as a string."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        return "string" if "enum" in defs[name] else ("ref", names.get(name, name))
    if "anyOf" in node:
        shapes = {_shape(option, defs, names) for option in node["anyOf"]}
        if not nullable:
            shapes.discard("null")
        return next(iter(shapes)) if len(shapes) == 1 else frozenset(shapes)
    if "enum" in node or "const" in node:
        return "string"
    kind = node.get("type")
    if kind == "array":
        return ("array", _shape(node["items"], defs, names))
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return ("object", _shape(node["additionalProperties"], defs, names))
    return kind


def _fields(name: str, defs: dict[str, Any], names: dict[str, str], nullable: bool = True) -> dict[str, Any]:
    model = defs[name]
    return {
        field: (field in model.get("required", ()), _shape(node, defs, names, nullable))
        for field, node in model["properties"].items()
    }


def test_the_clients_types_match_the_servers_schema() -> None:
    names = {mine.__name__: theirs.__name__ for mine, theirs in MIRRORS.items()}
    _, mine = msgspec.json.schema_components(list(MIRRORS))
    _, theirs = msgspec.json.schema_components(list(MIRRORS.values()))
    for client_type, struct in MIRRORS.items():
        assert _fields(client_type.__name__, mine, names) == _fields(struct.__name__, theirs, names), struct
    # The optional request fields: what TaskCreate takes besides provider, prompt and images.
    _, mine = msgspec.json.schema_components([client_module.TaskFields])
    _, theirs = msgspec.json.schema_components([schema.TaskCreate])
    optional = _fields("TaskCreate", theirs, names, nullable=False)
    expected = {field: (False, shape) for field, (_, shape) in optional.items()}
    for field in ("provider", "prompt", "images"):
        del expected[field]
    assert _fields("TaskFields", mine, names) == expected


def test_real_answers_decode_as_the_clients_types(receiver: Receiver, tmp_path: Path) -> None:
    picture = tmp_path / "in.png"
    with Client(receiver.url, ALICE) as client:
        task = client.generate("sandbox", "a pear", out=tmp_path)
        shutil.copy(tmp_path / f"{task['id']}-0.png", picture)
        msgspec.convert(task, client_module.Task, strict=True)
        msgspec.convert(client.upload(picture), client_module.Upload, strict=True)
        msgspec.convert(client.list_page(), client_module.Page, strict=True)
        msgspec.convert(client.events(task), list[client_module.Event], strict=True)
        msgspec.convert(client.providers(), list[client_module.ProviderInfo], strict=True)


# What docs/client.md tells an app to copy when it vendors the client.
VENDORED = ("__init__.py", "client.py", "imageinfo.py", "webhooks.py")
ONLY_HTTPX = """
import importlib.abc, json, sys

vendor, allowed, url, key, out = sys.argv[1], set(json.loads(sys.argv[2])), *sys.argv[3:]
allowed |= set(sys.stdlib_module_names) | {"receiver"}


class OnlyThese(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in allowed:
            raise ModuleNotFoundError(f"receiver.client needed {name}")
        return None


sys.meta_path.insert(0, OnlyThese())
sys.path.insert(0, vendor)
from receiver.client import Client, verify_notification
import receiver

assert receiver.__file__.startswith(vendor), receiver.__file__
with Client(url, key) as client:
    task = client.generate("sandbox", "a vendored fox", out=out)
print(json.dumps({"status": task["status"], "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _httpx_closure() -> set[str]:
    """The import names of httpx and of everything installing httpx brings (its required dependencies)."""
    dists, todo = set(), ["httpx"]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in dists:
            continue
        dists.add(name)
        for line in importlib.metadata.requires(name) or ():
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return {
        module
        for module, owners in importlib.metadata.packages_distributions().items()
        if any(owner.lower().replace("_", "-") in dists for owner in owners)
    }


def test_the_client_runs_with_only_httpx_and_the_standard_library(receiver: Receiver, tmp_path: Path) -> None:
    vendor = tmp_path / "vendor"
    (vendor / "receiver").mkdir(parents=True)
    for name in VENDORED:
        shutil.copy(ROOT / "receiver" / name, vendor / "receiver" / name)
    allowed = _httpx_closure()
    assert {"httpx", "anyio", "httpcore"} <= allowed and "starlette" not in allowed
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            ONLY_HTTPX,
            str(vendor),
            json.dumps(sorted(allowed)),
            receiver.url,
            ALICE,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    said = json.loads(run.stdout)
    assert said["status"] == "succeeded"
    assert not {"starlette", "msgspec", "uvicorn", "aiosqlite", "obstore", "aiohttp"} & set(said["modules"])
    assert len(list(tmp_path.glob("tsk_*-0.png"))) == 1
    docs = (ROOT / "docs" / "client.md").read_text()
    assert all(f"receiver/{name}" in docs for name in VENDORED)
