"""A typed Python client for the receiver's HTTP API, synchronous (`Client`) and asynchronous
(`AsyncClient`), on httpx.

    from receiver.client import Client

    with Client("http://127.0.0.1:8000", api_key) as receiver:
        task = receiver.create("sandbox", "a red fox in the snow", images=[Path("fox.png")])
        task = receiver.wait(task["id"], timeout=120)
        receiver.download_images(task, "images/")

Each operation is written once, as a generator of HTTP calls (`_Call`) that receives each call's
JSON answer; the two clients only differ in how they send a call. Failures are exceptions:
`ApiError` (the service answered 4xx/5xx; `status`, `code`, `fields`), `ServiceUnreachable` (no answer
at all), `WaitTimeout` (the task had not ended in time; the last `task` is attached).
`verify_notification` checks a notification the receiver POSTed to an app's `notify_url`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Generator
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Literal
from typing import NotRequired
from typing import TypedDict
from typing import TypeVar
from typing import Unpack
from typing import cast
from urllib.parse import quote
from urllib.parse import urlsplit

import anyio
import httpx

from receiver import __version__
from receiver import imageinfo
from receiver.webhooks import NotificationError
from receiver.webhooks import verify_notification

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "Event",
    "LocalFileError",
    "NotificationError",
    "Page",
    "ReceiverError",
    "ServiceUnreachable",
    "Task",
    "TaskError",
    "TaskImage",
    "Upload",
    "WaitTimeout",
    "verify_notification",
]

DEFAULT_URL = "http://127.0.0.1:8000"
ENDED = ("succeeded", "failed")
MAX_SERVER_WAIT = 60.0  # the API's own cap on ?wait
PAGE_LIMIT = 200  # the API's own cap on ?limit
# With a progress callback, the long-poll windows start short and grow, so the intermediate changes
# (queued → submitted → downloading), which do not end a long-poll, are seen soon after they happen.
FIRST_PROGRESS_WINDOW = 0.25
PROGRESS_WINDOW = 2.0

Status = Literal["queued", "submitted", "downloading", "succeeded", "failed"]
ImageInput = str | os.PathLike[str]
T = TypeVar("T")


class TaskImage(TypedDict):
    index: int
    url: str
    content_type: str
    size: int
    sha256: str
    width: int | None
    height: int | None
    source_url: str | None


class TaskError(TypedDict):
    code: str
    message: str
    provider_code: NotRequired[str | None]


class Task(TypedDict):
    id: str
    status: Status
    provider: str
    model: str
    prompt: str
    provider_task_id: str | None
    images: list[TaskImage]
    error: TaskError | None
    metadata: dict[str, Any]
    created_at: str
    updated_at: str
    completed_at: str | None
    attempts: NotRequired[list[dict[str, Any]]]


class TaskFields(TypedDict, total=False):
    """The optional request fields of POST /v1/tasks (which ones a provider honours: GET /v1/providers)."""

    model: str
    aspect_ratio: str
    output_format: str
    seed: int
    safety_tolerance: int
    prompt_upsampling: bool
    resolution: str
    num_images: int
    options: dict[str, Any]
    notify_url: str
    metadata: dict[str, Any]
    fallback: list[str]


class Page(TypedDict):
    items: list[Task]
    next_cursor: str | None


class Event(TypedDict):
    id: int
    at: str
    kind: str
    verified: bool
    summary: str
    change: str | None
    detail: str | None
    repeats: int


class Upload(TypedDict):
    url: str
    sha256: str


# -- errors -----------------------------------------------------------------------------------------


class ReceiverError(Exception):
    """Anything that kept an operation from completing."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LocalFileError(ReceiverError):
    """A local image that cannot be read, or is not a PNG, JPEG or WebP file."""


class ServiceUnreachable(ReceiverError):
    """No HTTP answer: refused connection, DNS failure, timeout."""


class ApiError(ReceiverError):
    """The service answered with an error: `status`, and from its JSON body `code` and `fields`."""

    def __init__(self, status: int, code: str, message: str, fields: Mapping[str, str]) -> None:
        detail = "; ".join(f"{name}: {problem}" for name, problem in fields.items())
        super().__init__(f"{message}: {detail}" if detail else message)
        self.status = status
        self.code = code
        self.fields = dict(fields)


class WaitTimeout(ReceiverError):
    """`wait` ran out of time before the task ended; `task` is how it last looked."""

    def __init__(self, task: Task, waited: float) -> None:
        super().__init__(f"task {task['id']} is still {task['status']} after {waited:.0f} s")
        self.task = task


# -- one description of each operation, for both clients ------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One HTTP call; its answer (the JSON body) is sent back into the operation's generator."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    wait: float = 0.0  # seconds the service may hold the answer (long-poll), added to the timeout

    def arguments(self, timeout: float) -> dict[str, Any]:
        """httpx's request() arguments for this call."""
        return {
            "method": self.method,
            "url": self.path,
            "params": self.params,
            "json": self.json,
            "content": self.content,
            "headers": self.headers,
            "timeout": timeout + self.wait,
        }


@dataclass(frozen=True)
class _ReadFile:
    """Read a local file (in a worker thread for the async client); its bytes are sent back."""

    path: Path


_Step = _Call | _ReadFile
_Operation = Generator[_Step, Any, T]


def task_path(task_id: str) -> str:
    return f"/v1/tasks/{quote(task_id, safe='')}"


def image_path(task_id: str, index: int) -> str:
    return f"{task_path(task_id)}/images/{int(index)}"


def _local_image(path: Path) -> _Operation[tuple[bytes, str]]:
    data = yield _ReadFile(path)
    content_type = imageinfo.sniff(data[: imageinfo.SNIFF_BYTES])
    if content_type is None:
        raise LocalFileError(f"{path}: not a PNG, JPEG or WebP image")
    return data, content_type


def _upload(path: Path) -> _Operation[Upload]:
    data, content_type = yield from _local_image(path)
    answer: Upload = yield _Call("POST", "/v1/uploads", content=data, headers={"Content-Type": content_type})
    return answer


def _create(
    body: Mapping[str, Any], images: Sequence[ImageInput], idempotency_key: str | None
) -> _Operation[Task]:
    if images:
        refs: list[str] = []
        for image in images:
            if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
                refs.append(image)
                continue
            # A local file goes inline as a data URI, which the service stores like an upload: the body
            # is then the same on every retry, so an Idempotency-Key finds the first task again (an
            # upload link would differ each time, its expiry being part of it).
            data, content_type = yield from _local_image(Path(image))
            refs.append(f"data:{content_type};base64,{base64.b64encode(data).decode()}")
        body = {**body, "images": refs}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    task: Task = yield _Call("POST", "/v1/tasks", json=body, headers=headers)
    return task


def _get(task_id: str, wait: float | None = None) -> _Operation[Task]:
    params = None if wait is None else {"wait": f"{max(0.0, min(wait, MAX_SERVER_WAIT)):.2f}"}
    task: Task = yield _Call("GET", task_path(task_id), params=params, wait=wait or 0.0)
    return task


def _wait(
    task_id: str, timeout: float | None, on_progress: Callable[[Task, float], None] | None
) -> _Operation[Task]:
    started = time.monotonic()
    window = MAX_SERVER_WAIT if on_progress is None else FIRST_PROGRESS_WINDOW
    task = yield from _get(task_id)
    while True:
        elapsed = time.monotonic() - started
        if on_progress is not None:
            on_progress(task, elapsed)
        if task["status"] in ENDED:
            return task
        left = None if timeout is None else timeout - elapsed
        if left is not None and left <= 0:
            raise WaitTimeout(task, elapsed)
        task = yield from _get(task_id, window if left is None else min(window, left))
        if on_progress is not None:
            window = min(window * 2, PROGRESS_WINDOW)


def _page(
    status: str | None, provider: str | None, limit: int | None, cursor: str | None
) -> _Operation[Page]:
    params = {"status": status, "provider": provider, "cursor": cursor}
    query = {name: value for name, value in params.items() if value}
    if limit is not None:
        query["limit"] = str(limit)
    page: Page = yield _Call("GET", "/v1/tasks", params=query)
    return page


def _events(task_id: str) -> _Operation[list[Event]]:
    """Every event of the task, page after page."""
    events: list[Event] = []
    cursor: str | None = None
    while True:
        params = {"limit": "500", **({"cursor": cursor} if cursor else {})}
        answer = yield _Call("GET", f"{task_path(task_id)}/events", params=params)
        events += cast(list[Event], answer["items"])
        cursor = answer.get("next_cursor")
        if not cursor:
            return events


def _page_size(limit: int | None, seen: int, page_size: int) -> int:
    return min(page_size, PAGE_LIMIT) if limit is None else min(page_size, PAGE_LIMIT, limit - seen)


def image_name(task: Task, image: TaskImage) -> str:
    """`<task id>-<index>.<ext>`: the file name download_images gives an image."""
    return f"{task['id']}-{image['index']}.{imageinfo.EXTENSIONS.get(image['content_type'], 'bin')}"


def _task_id(task: str | Mapping[str, Any]) -> str:
    return task if isinstance(task, str) else str(task["id"])


# -- answers and failures ---------------------------------------------------------------------------


def base_url(url: str) -> str:
    """The service's root URL (ValueError if it is none). A URL ending in /v1, the API's prefix, is
    taken as the root it belongs to."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"takes no query or fragment, got {url!r}")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def _check(response: httpx.Response) -> None:
    """Raise ApiError for an error answer, with the API's code, message and fields when it gave them."""
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        fields = error.get("fields") or {}
        if not isinstance(fields, dict):
            fields = {}
    except (ValueError, KeyError, TypeError):
        code, message, fields = "http_error", f"HTTP {response.status_code}", {}
    if response.status_code == 404 and message in ("HTTP 404", "Not Found"):
        # No such route (not: no such task), usually a base URL with a path of its own.
        where = f"{response.request.method} {response.request.url.copy_with(query=None)}"
        message = f"HTTP 404 for {where}: no such route (is the URL the receiver's root?)"
    raise ApiError(response.status_code, code, message, {str(k): str(v) for k, v in fields.items()})


def _json(response: httpx.Response) -> Any:
    _check(response)
    try:
        return response.json()
    except ValueError:
        raise ReceiverError(f"the answer to {response.request.url.path} is not JSON") from None


@contextlib.contextmanager
def _reaching(url: str) -> Iterator[None]:
    """Transport failures as ServiceUnreachable naming the service."""
    try:
        yield
    except httpx.TimeoutException:
        raise ServiceUnreachable(f"the service at {url} did not answer in time") from None
    except httpx.HTTPError as exc:
        raise ServiceUnreachable(f"cannot reach the service at {url}: {exc or type(exc).__name__}") from None


def _read_file(path: Path) -> bytes:
    try:
        return path.expanduser().read_bytes()
    except OSError as exc:
        raise LocalFileError(f"{path}: {exc.strerror or exc}") from None


def _settings(url: str | None, api_key: str | None, timeout: float) -> tuple[str, dict[str, Any]]:
    """The service's root URL, and the httpx client options (base URL, bearer key, timeout) for it."""
    try:
        url = base_url(url or os.environ.get("RECEIVER_URL") or DEFAULT_URL)
    except ValueError as exc:
        raise ReceiverError(f"the receiver's URL {exc}") from None
    api_key = (api_key if api_key is not None else os.environ.get("RECEIVER_API_KEY", "")).strip()
    if not api_key:
        raise ReceiverError("no API key: pass api_key or set RECEIVER_API_KEY (receiver serve prints one)")
    headers = {"Authorization": f"Bearer {api_key}", "User-Agent": f"receiver-client/{__version__}"}
    return url, {"base_url": url, "headers": headers, "timeout": httpx.Timeout(timeout)}


def _temp(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part")


# -- the clients ------------------------------------------------------------------------------------


class Client:
    """The receiver's API, synchronously. `url` and `api_key` default to RECEIVER_URL and
    RECEIVER_API_KEY; `timeout` is per call (long-polls get their waiting time on top)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url, options = _settings(url, api_key, timeout)
        self.timeout = timeout
        self.http = httpx.Client(**options, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _run(self, operation: _Operation[T]) -> T:
        answer: Any = None
        try:
            while True:
                step = operation.send(answer)
                if isinstance(step, _ReadFile):
                    answer = _read_file(step.path)
                    continue
                with _reaching(self.url):
                    response = self.http.request(**step.arguments(self.timeout))
                answer = _json(response)
        except StopIteration as done:
            return cast(T, done.value)

    def create(
        self,
        provider: str,
        prompt: str,
        *,
        images: Sequence[ImageInput] = (),
        idempotency_key: str | None = None,
        **fields: Unpack[TaskFields],
    ) -> Task:
        """Create a task. `images` are URLs or data: URIs (as given) or local PNG, JPEG or WebP files
        (a `Path`, or any other string), sent inline and stored by the service. The same
        `idempotency_key` and body return the same task (a retry is safe); the same key with
        another body is an ApiError with status 409."""
        body = {"provider": provider, "prompt": prompt, **fields}
        return self._run(_create(body, images, idempotency_key))

    def upload(self, path: str | os.PathLike[str]) -> Upload:
        """Upload a local PNG, JPEG or WebP file: a signed link for `images`."""
        return self._run(_upload(Path(path)))

    def get(self, task_id: str, *, wait: float | None = None) -> Task:
        """The task; with `wait` (≤ 60 s) the service holds the answer until it ends or that time passes."""
        return self._run(_get(task_id, wait))

    def wait(
        self,
        task: str | Mapping[str, Any],
        *,
        timeout: float | None = None,
        on_progress: Callable[[Task, float], None] | None = None,
    ) -> Task:
        """The task once it has ended, by long-polling; WaitTimeout after `timeout` seconds.
        `on_progress(task, elapsed)` is called after every answer (changes show within about 2 s)."""
        return self._run(_wait(_task_id(task), timeout, on_progress))

    def list_page(
        self,
        *,
        status: str | None = None,
        provider: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of tasks, newest first; pass its `next_cursor` as `cursor` for the next."""
        return self._run(_page(status, provider, limit, cursor))

    def list_tasks(
        self,
        *,
        status: str | None = None,
        provider: str | None = None,
        limit: int | None = None,
        page_size: int = 100,
    ) -> Iterator[Task]:
        """Every task (or the first `limit`), newest first, fetching pages as the iteration goes."""
        seen, cursor = 0, None
        while limit is None or seen < limit:
            page = self.list_page(
                status=status, provider=provider, limit=_page_size(limit, seen, page_size), cursor=cursor
            )
            for task in page["items"]:
                seen += 1
                yield task
            cursor = page["next_cursor"]
            if not cursor:
                return

    def events(self, task_id: str) -> list[Event]:
        """Everything that happened to the task: callbacks, polls, downloads, notifications."""
        return self._run(_events(task_id))

    def download(self, task: str | Mapping[str, Any], index: int, dest: str | os.PathLike[str]) -> int:
        """Stream image `index` of the task into the file `dest` (replaced whole, never left half
        written); returns its size in bytes."""
        dest, size = Path(dest), 0
        temp = _temp(dest)
        try:
            with _reaching(self.url), self.http.stream("GET", image_path(_task_id(task), index)) as response:
                if response.status_code >= 400:
                    response.read()
                    _check(response)
                with open(temp, "wb") as handle:
                    for chunk in response.iter_bytes():
                        size += handle.write(chunk)
            temp.replace(dest)
        finally:
            temp.unlink(missing_ok=True)
        return size

    def download_images(self, task: Task, directory: str | os.PathLike[str]) -> list[Path]:
        """Every image of an ended task as `directory/<task id>-<index>.<ext>`; the paths written."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / image_name(task, image) for image in task["images"]]
        for image, path in zip(task["images"], paths, strict=True):
            self.download(task, image["index"], path)
        return paths


class AsyncClient:
    """The receiver's API for asyncio (or trio) apps: the same operations as `Client`, awaited."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, options = _settings(url, api_key, timeout)
        self.timeout = timeout
        self.http = httpx.AsyncClient(**options, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _run(self, operation: _Operation[T]) -> T:
        answer: Any = None
        try:
            while True:
                step = operation.send(answer)
                if isinstance(step, _ReadFile):
                    answer = await anyio.to_thread.run_sync(_read_file, step.path)
                    continue
                with _reaching(self.url):
                    response = await self.http.request(**step.arguments(self.timeout))
                answer = _json(response)
        except StopIteration as done:
            return cast(T, done.value)

    async def create(
        self,
        provider: str,
        prompt: str,
        *,
        images: Sequence[ImageInput] = (),
        idempotency_key: str | None = None,
        **fields: Unpack[TaskFields],
    ) -> Task:
        body = {"provider": provider, "prompt": prompt, **fields}
        return await self._run(_create(body, images, idempotency_key))

    async def upload(self, path: str | os.PathLike[str]) -> Upload:
        return await self._run(_upload(Path(path)))

    async def get(self, task_id: str, *, wait: float | None = None) -> Task:
        return await self._run(_get(task_id, wait))

    async def wait(
        self,
        task: str | Mapping[str, Any],
        *,
        timeout: float | None = None,
        on_progress: Callable[[Task, float], None] | None = None,
    ) -> Task:
        return await self._run(_wait(_task_id(task), timeout, on_progress))

    async def list_page(
        self,
        *,
        status: str | None = None,
        provider: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        return await self._run(_page(status, provider, limit, cursor))

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        provider: str | None = None,
        limit: int | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Task]:
        seen, cursor = 0, None
        while limit is None or seen < limit:
            page = await self.list_page(
                status=status, provider=provider, limit=_page_size(limit, seen, page_size), cursor=cursor
            )
            for task in page["items"]:
                seen += 1
                yield task
            cursor = page["next_cursor"]
            if not cursor:
                return

    async def events(self, task_id: str) -> list[Event]:
        return await self._run(_events(task_id))

    async def download(self, task: str | Mapping[str, Any], index: int, dest: str | os.PathLike[str]) -> int:
        dest, size = Path(dest), 0
        temp = _temp(dest)
        try:
            with _reaching(self.url):
                async with self.http.stream("GET", image_path(_task_id(task), index)) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _check(response)
                    async with await anyio.open_file(temp, "wb") as handle:
                        async for chunk in response.aiter_bytes():
                            size += await handle.write(chunk)
            await anyio.Path(temp).replace(dest)
        finally:
            await anyio.Path(temp).unlink(missing_ok=True)
        return size

    async def download_images(self, task: Task, directory: str | os.PathLike[str]) -> list[Path]:
        folder = Path(directory)
        await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
        paths = [folder / image_name(task, image) for image in task["images"]]
        for image, path in zip(task["images"], paths, strict=True):
            await self.download(task, image["index"], path)
        return paths
