"""A typed Python client for the receiver's HTTP API, synchronous (`Client`) and asynchronous
(`AsyncClient`), on httpx and the standard library alone (an app can vendor it: see docs/client.md).

    from receiver.client import Client

    with Client("http://127.0.0.1:8000", api_key) as receiver:
        task = receiver.generate("sandbox", "a red fox in the snow", out="images/")

Each operation is written once, as a generator of steps (`_Call`, `_ReadFile`) that receives each
step's answer; the two clients only differ in how they carry a step out. Transient failures (no
connection, a dropped answer, 502/503/504) are retried with backoff where a call is safe to repeat: a
read, or a create that carries an Idempotency-Key. Failures are exceptions: `ApiError` (the service
answered 4xx/5xx; `status`, `code`, `fields`), `ServiceUnreachable` (no answer at all), `WaitTimeout`
(the task had not ended in time; the last `task` is attached), `TaskFailed` (`generate` saw the task
fail). `verify_notification` checks a notification the receiver POSTed to an app's `notify_url`.
"""

from __future__ import annotations

import base64
import os
import random
import time
import uuid
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
    "AdminClient",
    "ApiError",
    "ApiKey",
    "AsyncClient",
    "Attempt",
    "Client",
    "Event",
    "LocalFileError",
    "ModelInputs",
    "ModelTakes",
    "NewApiKey",
    "NotificationError",
    "NumberRange",
    "Page",
    "ProviderInfo",
    "ProviderLimits",
    "ReceiverError",
    "ServiceUnreachable",
    "Task",
    "TaskCancelled",
    "TaskError",
    "TaskFailed",
    "TaskImage",
    "Upload",
    "Usage",
    "UsageGroup",
    "WaitTimeout",
    "verify_notification",
]

DEFAULT_URL = "http://127.0.0.1:8000"
ENDED = ("succeeded", "failed", "cancelled")
MAX_SERVER_WAIT = 60.0  # the API's own cap on ?wait
PAGE_LIMIT = 200  # the API's own cap on ?limit
# With a progress callback, the long-poll windows start short and grow, so the intermediate changes
# (queued → submitted → downloading), which do not end a long-poll, are seen soon after they happen.
FIRST_PROGRESS_WINDOW = 0.25
PROGRESS_WINDOW = 2.0
# Transient failures: tries after the first, the first pause (doubling each time, ±25 %), the longest.
RETRIES = 4
BACKOFF = 0.5
MAX_RETRY_DELAY = 30.0
RETRY_STATUSES = frozenset({502, 503, 504})  # a proxy or the service saying "not now"

Status = Literal["queued", "submitted", "downloading", "succeeded", "failed", "cancelled"]
ImageInput = str | os.PathLike[str]
TaskRef = str | Mapping[str, Any]  # a task as the API gave it, or its id
T = TypeVar("T")


class TaskImage(TypedDict):
    index: int
    url: str | None  # None once the image has expired (RECEIVER_RETAIN_IMAGES): its bytes are gone
    content_type: str
    size: int
    sha256: str
    width: int | None
    height: int | None
    source_url: str
    expired: bool


class TaskError(TypedDict):
    code: str
    message: str
    provider_code: str | None


class Attempt(TypedDict):
    """A provider the task left for the next one in its fallback chain, with the error it ended with."""

    provider: str
    model: str
    provider_task_id: str | None
    error: TaskError
    at: str


class Cost(TypedDict):
    """What an ended task cost: `source` "provider" (its own report) or "price" (the price table)."""

    usd: float
    source: str


class Task(TypedDict):
    id: str
    status: Status
    provider: str
    model: str
    prompt: str
    provider_task_id: str | None
    images: list[TaskImage]
    error: TaskError | None
    fallback: list[str]
    attempts: list[Attempt]
    metadata: dict[str, Any]
    created_at: str
    updated_at: str
    completed_at: str | None
    cost: Cost | None


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
    content_type: str
    size: int


class ModelInputs(TypedDict):
    min_images: int
    max_images: int
    text_to_image: str | None
    edit: str | None


class NumberRange(TypedDict):
    min: float
    max: float
    whole: bool


class ModelTakes(TypedDict):
    """What one model takes at a provider: the table the service checks each request against."""

    fields: list[str]
    aspect_ratios: list[str] | None
    edit_aspect_ratios: list[str]
    resolutions: list[str] | None
    output_formats: list[str] | None
    safety_tolerance: NumberRange | None
    edit_safety_tolerance: NumberRange | None
    num_images: NumberRange
    options: dict[str, NumberRange]


class ProviderLimits(TypedDict):
    max_concurrent: int | None
    max_concurrent_by_model: dict[str, int]
    new_tasks_per_window: int | None
    window_seconds: float | None
    shared_with: list[str]


class ModelPrice(TypedDict, total=False):
    """One model's price at a provider, in USD: per image, per megapixel or per resolution."""

    source: str | None
    taken: str | None
    verified: bool
    per_image: float
    per_megapixel: float
    first_megapixel: float
    per_resolution: dict[str, float]


class ProviderInfo(TypedDict):
    name: str
    models: list[str]
    default_model: str
    accepts_any_model: bool
    fields: list[str]
    min_images: int
    max_images: int
    native_models: list[str]
    other_models: str | None
    model_inputs: dict[str, ModelInputs]
    takes: dict[str, ModelTakes]
    data_uris: str
    synchronous: bool
    limits: ProviderLimits
    prices: dict[str, ModelPrice]
    cooldown_until: str | None


class UsageGroup(TypedDict):
    group: str
    tasks: int
    usd: float


# Tasks created in [from, to) and what they cost (`from` is a Python keyword: hence this spelling).
Usage = TypedDict("Usage", {"from": str, "to": str, "tasks": int, "usd": float, "groups": list[UsageGroup]})


class ApiKey(TypedDict):
    id: str
    tenant: str
    name: str
    budget_usd: float | None
    budget_period: Literal["day", "month"] | None
    rate_per_minute: int | None
    disabled: bool
    created_at: str
    updated_at: str


class NewApiKey(ApiKey):
    key: str  # the secret, shown this once


# -- errors -----------------------------------------------------------------------------------------


class ReceiverError(Exception):
    """Anything that kept an operation from completing."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LocalFileError(ReceiverError):
    """A local image that cannot be read, or is not a PNG, JPEG or WebP file."""


class ServiceUnreachable(ReceiverError):
    """No HTTP answer (refused connection, DNS failure, timeout, a dropped connection), after the retries."""


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


class TaskFailed(ReceiverError):
    """`generate` saw the task end `failed`; `task` is the task, with its `error`."""

    def __init__(self, task: Task) -> None:
        error = task["error"]
        why = f"{error['code']}: {error['message']}" if error else "no reason given"
        super().__init__(f"task {task['id']} failed: {why}")
        self.task = task


class TaskCancelled(TaskFailed):
    """`generate` saw the task end `cancelled` (someone cancelled it): it has no images."""

    def __init__(self, task: Task) -> None:
        ReceiverError.__init__(self, f"task {task['id']} was cancelled")
        self.task = task


# -- one description of each operation, for both clients ------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One HTTP call; its answer (the JSON body, or with `into` the bytes written) is sent back into the
    operation's generator."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    wait: float = 0.0  # seconds the service may hold the answer (long-poll), added to the timeout
    into: Path | None = None  # stream the body into this file (replaced whole, never left half written)

    @property
    def repeatable(self) -> bool:
        """Whether sending it again after a lost answer is harmless: a read, or a create that the
        service recognises by its Idempotency-Key."""
        return self.method == "GET" or "Idempotency-Key" in (self.headers or {})

    def arguments(self, timeout: float) -> dict[str, Any]:
        """httpx's request() (and stream()) arguments for this call."""
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


@dataclass(frozen=True)
class _Send:
    """Send a call once; an `_Answer` or the httpx error is sent back."""

    call: _Call


@dataclass(frozen=True)
class _Sleep:
    """Pause before trying again."""

    seconds: float


@dataclass(frozen=True)
class _Answer:
    response: httpx.Response
    written: int = 0  # bytes streamed into the call's `into` file


_Step = _Call | _ReadFile  # what an operation asks for
_Operation = Generator[_Step, Any, T]
_Primitive = _Send | _Sleep | _ReadFile  # what a client carries out
_Program = Generator[_Primitive, Any, T]

# The request never left: sending it again cannot do anything twice, whatever the call.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Failures that pass: the service restarting, a proxy dropping a long-poll, a slow network.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class _Retries:
    url: str
    retries: int
    backoff: float

    def delay(self, call: _Call, attempt: int, outcome: _Answer | httpx.HTTPError) -> float | None:
        """Seconds to pause before sending `call` again after its `attempt`-th try, or None to stop."""
        if attempt > self.retries:
            return None
        asked = 0.0
        if isinstance(outcome, httpx.HTTPError):
            if not (isinstance(outcome, _UNSENT) or (call.repeatable and isinstance(outcome, _TRANSIENT))):
                return None
        elif outcome.response.status_code in RETRY_STATUSES and call.repeatable:
            asked = _retry_after(outcome.response)
        else:
            return None
        step = self.backoff * 2.0 ** (attempt - 1) * random.uniform(0.75, 1.25)
        return min(max(step, asked), MAX_RETRY_DELAY)


def _retry_after(response: httpx.Response) -> float:
    """The seconds of a Retry-After header (an HTTP date is not worth parsing here), else 0."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return 0.0


def _exchange(call: _Call, retries: _Retries) -> _Program[Any]:
    """`call` sent, and sent again while its failure is transient and it is safe to repeat; then its JSON
    (or, with `into`, the bytes written)."""
    attempt = 1
    outcome = yield _Send(call)
    while (delay := retries.delay(call, attempt, outcome)) is not None:
        yield _Sleep(delay)
        attempt += 1
        outcome = yield _Send(call)
    if isinstance(outcome, httpx.HTTPError):
        raise _unreachable(retries.url, outcome)
    if call.into is not None:
        _check(outcome.response)
        return outcome.written
    if outcome.response.status_code == 204:
        return None  # done, with nothing to say (a delete)
    return _json(outcome.response)


def _program(operation: _Operation[T], retries: _Retries) -> _Program[T]:
    """The operation with each of its calls carried out by `_exchange`: what a client runs."""
    answer: Any = None
    while True:
        try:
            step = operation.send(answer)
        except StopIteration as done:
            return cast(T, done.value)
        if isinstance(step, _Call):
            answer = yield from _exchange(step, retries)
        else:
            answer = yield step


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


def _cancel(task_id: str) -> _Operation[Task]:
    task: Task = yield _Call("POST", f"{task_path(task_id)}/cancel")
    return task


def _delete(task_id: str) -> _Operation[None]:
    yield _Call("DELETE", task_path(task_id))


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


def _providers() -> _Operation[list[ProviderInfo]]:
    answer = yield _Call("GET", "/v1/providers")
    return cast(list[ProviderInfo], answer["items"])


def _usage(path: str, **query: str | None) -> _Operation[Usage]:
    params = {
        ("from" if name == "since" else name): value for name, value in query.items() if value is not None
    }
    answer = yield _Call("GET", path, params=params)
    return cast(Usage, answer)


def _admin(method: str, path: str, body: Any = None) -> _Operation[Any]:
    answer = yield _Call(method, f"/v1/admin/{path}", json=body)
    return answer


def _download(task_id: str, index: int, dest: Path) -> _Operation[int]:
    size: int = yield _Call("GET", image_path(task_id, index), into=dest)
    return size


def _download_images(task: TaskRef, folder: Path) -> _Operation[list[Path]]:
    ended = cast(Task, task) if not isinstance(task, str) else (yield from _get(task))
    kept = [image for image in ended["images"] if not image.get("expired")]  # expired: no bytes to fetch
    paths = [folder / image_name(ended, image) for image in kept]
    for image, path in zip(kept, paths, strict=True):
        yield from _download(ended["id"], image["index"], path)
    return paths


def _generate(
    body: Mapping[str, Any],
    images: Sequence[ImageInput],
    idempotency_key: str | None,
    out: Path,
    timeout: float | None,
    on_progress: Callable[[Task, float], None] | None,
) -> _Operation[Task]:
    # Always with a key: a create whose answer was lost is sent again and finds its first task.
    task = yield from _create(body, images, idempotency_key or f"generate-{uuid.uuid4().hex}")
    task = yield from _wait(task["id"], timeout, on_progress)
    if task["status"] == "cancelled":
        raise TaskCancelled(task)
    if task["status"] != "succeeded":
        raise TaskFailed(task)
    yield from _download_images(task, out)
    return task


def _page_size(limit: int | None, seen: int, page_size: int) -> int:
    return min(page_size, PAGE_LIMIT) if limit is None else min(page_size, PAGE_LIMIT, limit - seen)


def image_name(task: Task, image: TaskImage) -> str:
    """`<task id>-<index>.<ext>`: the file name download_images gives an image."""
    return f"{task['id']}-{image['index']}.{imageinfo.EXTENSIONS.get(image['content_type'], 'bin')}"


def _task_id(task: TaskRef) -> str:
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
    if response.status_code == 204:
        return None
    try:
        return response.json()
    except ValueError:
        raise ReceiverError(f"the answer to {response.request.url.path} is not JSON") from None


def _unreachable(url: str, exc: httpx.HTTPError) -> ServiceUnreachable:
    """A transport failure as ServiceUnreachable naming the service."""
    if isinstance(exc, httpx.TimeoutException):
        return ServiceUnreachable(f"the service at {url} did not answer in time")
    return ServiceUnreachable(f"cannot reach the service at {url}: {exc or type(exc).__name__}")


def _read_file(path: Path) -> bytes:
    try:
        return path.expanduser().read_bytes()
    except OSError as exc:
        raise LocalFileError(f"{path}: {exc.strerror or exc}") from None


def _settings(
    url: str | None, api_key: str | None, timeout: float, retries: int, backoff: float
) -> tuple[_Retries, dict[str, Any]]:
    """The retry policy for the service's root URL, and the httpx client options (base URL, bearer key,
    timeout) for it."""
    try:
        url = base_url(url or os.environ.get("RECEIVER_URL") or DEFAULT_URL)
    except ValueError as exc:
        raise ReceiverError(f"the receiver's URL {exc}") from None
    api_key = (api_key if api_key is not None else os.environ.get("RECEIVER_API_KEY", "")).strip()
    if not api_key:
        raise ReceiverError("no API key: pass api_key or set RECEIVER_API_KEY (receiver serve prints one)")
    if retries < 0 or not backoff >= 0:
        raise ReceiverError("retries and backoff must not be negative")
    headers = {"Authorization": f"Bearer {api_key}", "User-Agent": f"receiver-client/{__version__}"}
    options = {"base_url": url, "headers": headers, "timeout": httpx.Timeout(timeout)}
    return _Retries(url, retries, backoff), options


def _temp(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part")


def _save(chunks: Iterator[bytes], dest: Path) -> int:
    """The chunks written to `dest` through a temporary file; the bytes written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp, size = _temp(dest), 0
    try:
        with open(temp, "wb") as handle:
            for chunk in chunks:
                size += handle.write(chunk)
        temp.replace(dest)
    finally:
        temp.unlink(missing_ok=True)
    return size


async def _save_async(chunks: AsyncIterator[bytes], dest: Path) -> int:
    """`_save` for the async client: the file work in worker threads."""
    await anyio.Path(dest.parent).mkdir(parents=True, exist_ok=True)
    temp, size = anyio.Path(_temp(dest)), 0
    try:
        async with await anyio.open_file(temp, "wb") as handle:
            async for chunk in chunks:
                size += await handle.write(chunk)
        await temp.replace(dest)
    finally:
        await temp.unlink(missing_ok=True)
    return size


# -- the clients ------------------------------------------------------------------------------------


class Client:
    """The receiver's API, synchronously. `url` and `api_key` default to RECEIVER_URL and
    RECEIVER_API_KEY; `timeout` is per call (long-polls get their waiting time on top). A call that is
    safe to repeat is tried up to `retries` more times after a transient failure, pausing `backoff`
    seconds, then twice that, and so on."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._retries, options = _settings(url, api_key, timeout, retries, backoff)
        self.url = self._retries.url
        self.timeout = timeout
        self.http = httpx.Client(**options, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    def _run(self, operation: _Operation[T]) -> T:
        program = _program(operation, self._retries)
        answer: Any = None
        try:
            while True:
                step = program.send(answer)
                if isinstance(step, _Send):
                    answer = self._send(step.call)
                elif isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                    answer = None
                else:
                    answer = _read_file(step.path)
        except StopIteration as done:
            return cast(T, done.value)

    def _send(self, call: _Call) -> _Answer | httpx.HTTPError:
        try:
            if call.into is None:
                return _Answer(self.http.request(**call.arguments(self.timeout)))
            with self.http.stream(**call.arguments(self.timeout)) as response:
                if response.status_code >= 400:
                    response.read()
                    return _Answer(response)
                return _Answer(response, _save(response.iter_bytes(), call.into))
        except httpx.HTTPError as exc:
            return exc

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
        `idempotency_key` and body return the same task (a retry is safe, and only a create with a
        key is retried after a lost answer); the same key with another body is an ApiError, status 409."""
        body = {"provider": provider, "prompt": prompt, **fields}
        return self._run(_create(body, images, idempotency_key))

    def generate(
        self,
        provider: str,
        prompt: str,
        *,
        images: Sequence[ImageInput] = (),
        out: str | os.PathLike[str] = ".",
        timeout: float | None = None,
        idempotency_key: str | None = None,
        on_progress: Callable[[Task, float], None] | None = None,
        **fields: Unpack[TaskFields],
    ) -> Task:
        """Create a task, wait for it, save its images as `out/<task id>-<index>.<ext>`, and return it.
        Always sent with an Idempotency-Key (a new one unless given), so a lost answer is retried
        safely. TaskFailed if the task fails, WaitTimeout after `timeout` seconds."""
        body = {"provider": provider, "prompt": prompt, **fields}
        return self._run(_generate(body, images, idempotency_key, Path(out), timeout, on_progress))

    def upload(self, path: str | os.PathLike[str]) -> Upload:
        """Upload a local PNG, JPEG or WebP file: a signed link for `images`."""
        return self._run(_upload(Path(path)))

    def get(self, task: TaskRef, *, wait: float | None = None) -> Task:
        """The task (given as a task or its id); with `wait` (≤ 60 s) the service holds the answer until
        it ends or that time passes."""
        return self._run(_get(_task_id(task), wait))

    def cancel(self, task: TaskRef) -> Task:
        """Cancel the task (given as a task or its id): it ends `cancelled` at once. ApiError 409
        `task_ended` if it had ended already."""
        return self._run(_cancel(_task_id(task)))

    def delete(self, task: TaskRef) -> None:
        """Delete an ended task with its images and events. ApiError 409 `task_active` if it has not
        ended (cancel it first)."""
        self._run(_delete(_task_id(task)))

    def wait(
        self,
        task: TaskRef,
        *,
        timeout: float | None = None,
        on_progress: Callable[[Task, float], None] | None = None,
    ) -> Task:
        """The task once it has ended, by long-polling (a dropped long-poll is asked again); WaitTimeout
        after `timeout` seconds. `on_progress(task, elapsed)` is called after every answer (changes
        show within about 2 s)."""
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

    def events(self, task: TaskRef) -> list[Event]:
        """Everything that happened to the task: callbacks, polls, downloads, notifications."""
        return self._run(_events(_task_id(task)))

    def providers(self) -> list[ProviderInfo]:
        """The providers this deployment offers: their models, the fields they honour, their limits."""
        return self._run(_providers())

    def usage(self, *, since: str | None = None, to: str | None = None, group_by: str | None = None) -> Usage:
        """This tenant's tasks and spend created in [since, to) (dates or RFC 3339 times; by default this
        month so far), grouped by "provider", "model" or "day" if asked."""
        return self._run(_usage("/v1/usage", since=since, to=to, group_by=group_by))

    def download(self, task: TaskRef, index: int, dest: str | os.PathLike[str]) -> int:
        """Stream image `index` of the task into the file `dest` (replaced whole, never left half
        written); returns its size in bytes."""
        return self._run(_download(_task_id(task), index, Path(dest)))

    def download_images(self, task: TaskRef, directory: str | os.PathLike[str]) -> list[Path]:
        """Every image of the task (given as a task or its id) as `directory/<task id>-<index>.<ext>`;
        the paths written."""
        return self._run(_download_images(task, Path(directory)))


class AsyncClient:
    """The receiver's API for asyncio (or trio) apps: the same operations as `Client`, awaited."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._retries, options = _settings(url, api_key, timeout, retries, backoff)
        self.url = self._retries.url
        self.timeout = timeout
        self.http = httpx.AsyncClient(**options, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    async def _run(self, operation: _Operation[T]) -> T:
        program = _program(operation, self._retries)
        answer: Any = None
        try:
            while True:
                step = program.send(answer)
                if isinstance(step, _Send):
                    answer = await self._send(step.call)
                elif isinstance(step, _Sleep):
                    await anyio.sleep(step.seconds)
                    answer = None
                else:
                    answer = await anyio.to_thread.run_sync(_read_file, step.path)
        except StopIteration as done:
            return cast(T, done.value)

    async def _send(self, call: _Call) -> _Answer | httpx.HTTPError:
        try:
            if call.into is None:
                return _Answer(await self.http.request(**call.arguments(self.timeout)))
            async with self.http.stream(**call.arguments(self.timeout)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    return _Answer(response)
                return _Answer(response, await _save_async(response.aiter_bytes(), call.into))
        except httpx.HTTPError as exc:
            return exc

    async def create(
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
        `idempotency_key` and body return the same task (a retry is safe, and only a create with a
        key is retried after a lost answer); the same key with another body is an ApiError, status 409."""
        body = {"provider": provider, "prompt": prompt, **fields}
        return await self._run(_create(body, images, idempotency_key))

    async def generate(
        self,
        provider: str,
        prompt: str,
        *,
        images: Sequence[ImageInput] = (),
        out: str | os.PathLike[str] = ".",
        timeout: float | None = None,
        idempotency_key: str | None = None,
        on_progress: Callable[[Task, float], None] | None = None,
        **fields: Unpack[TaskFields],
    ) -> Task:
        """Create a task, wait for it, save its images as `out/<task id>-<index>.<ext>`, and return it.
        Always sent with an Idempotency-Key (a new one unless given), so a lost answer is retried
        safely. TaskFailed if the task fails, WaitTimeout after `timeout` seconds."""
        body = {"provider": provider, "prompt": prompt, **fields}
        return await self._run(_generate(body, images, idempotency_key, Path(out), timeout, on_progress))

    async def upload(self, path: str | os.PathLike[str]) -> Upload:
        """Upload a local PNG, JPEG or WebP file: a signed link for `images`."""
        return await self._run(_upload(Path(path)))

    async def get(self, task: TaskRef, *, wait: float | None = None) -> Task:
        """The task (given as a task or its id); with `wait` (≤ 60 s) the service holds the answer until
        it ends or that time passes."""
        return await self._run(_get(_task_id(task), wait))

    async def cancel(self, task: TaskRef) -> Task:
        """Cancel the task (given as a task or its id): it ends `cancelled` at once. ApiError 409
        `task_ended` if it had ended already."""
        return await self._run(_cancel(_task_id(task)))

    async def delete(self, task: TaskRef) -> None:
        """Delete an ended task with its images and events. ApiError 409 `task_active` if it has not
        ended (cancel it first)."""
        await self._run(_delete(_task_id(task)))

    async def wait(
        self,
        task: TaskRef,
        *,
        timeout: float | None = None,
        on_progress: Callable[[Task, float], None] | None = None,
    ) -> Task:
        """The task once it has ended, by long-polling (a dropped long-poll is asked again); WaitTimeout
        after `timeout` seconds. `on_progress(task, elapsed)` is called after every answer (changes
        show within about 2 s)."""
        return await self._run(_wait(_task_id(task), timeout, on_progress))

    async def list_page(
        self,
        *,
        status: str | None = None,
        provider: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of tasks, newest first; pass its `next_cursor` as `cursor` for the next."""
        return await self._run(_page(status, provider, limit, cursor))

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        provider: str | None = None,
        limit: int | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Task]:
        """Every task (or the first `limit`), newest first, fetching pages as the iteration goes."""
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

    async def events(self, task: TaskRef) -> list[Event]:
        """Everything that happened to the task: callbacks, polls, downloads, notifications."""
        return await self._run(_events(_task_id(task)))

    async def providers(self) -> list[ProviderInfo]:
        """The providers this deployment offers: their models, the fields they honour, their limits."""
        return await self._run(_providers())

    async def usage(
        self, *, since: str | None = None, to: str | None = None, group_by: str | None = None
    ) -> Usage:
        """This tenant's tasks and spend created in [since, to) (dates or RFC 3339 times; by default this
        month so far), grouped by "provider", "model" or "day" if asked."""
        return await self._run(_usage("/v1/usage", since=since, to=to, group_by=group_by))

    async def download(self, task: TaskRef, index: int, dest: str | os.PathLike[str]) -> int:
        """Stream image `index` of the task into the file `dest` (replaced whole, never left half
        written); returns its size in bytes."""
        return await self._run(_download(_task_id(task), index, Path(dest)))

    async def download_images(self, task: TaskRef, directory: str | os.PathLike[str]) -> list[Path]:
        """Every image of the task (given as a task or its id) as `directory/<task id>-<index>.<ext>`;
        the paths written."""
        return await self._run(_download_images(task, Path(directory)))


class AdminClient:
    """The admin API (keys in the database, every tenant's usage), with RECEIVER_ADMIN_KEY: `admin_key`
    defaults to that variable, `url` to RECEIVER_URL. Calls are retried as `Client`'s are."""

    def __init__(
        self,
        url: str | None = None,
        admin_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        key = (admin_key if admin_key is not None else os.environ.get("RECEIVER_ADMIN_KEY", "")).strip()
        if not key:
            raise ReceiverError("no admin key: pass admin_key or set RECEIVER_ADMIN_KEY")
        self._client = Client(
            url, key, timeout=timeout, retries=retries, backoff=backoff, transport=transport
        )
        self.url = self._client.url

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def create_key(
        self,
        tenant: str,
        *,
        name: str = "",
        budget_usd: float | None = None,
        budget_period: Literal["day", "month"] | None = None,
        rate_per_minute: int | None = None,
    ) -> NewApiKey:
        """A new key for `tenant`; its secret (`key`) is in this answer only."""
        body = {
            "tenant": tenant,
            "name": name,
            "budget_usd": budget_usd,
            "budget_period": budget_period,
            "rate_per_minute": rate_per_minute,
        }
        return cast(NewApiKey, self._client._run(_admin("POST", "keys", body)))

    def list_keys(self) -> list[ApiKey]:
        """Every key kept in the database (never a secret)."""
        return cast(list[ApiKey], self._client._run(_admin("GET", "keys"))["keys"])

    def change_key(self, key_id: str, **changes: Any) -> ApiKey:
        """Change `name`, `budget_usd`, `budget_period`, `rate_per_minute` or `disabled` (None clears)."""
        return cast(ApiKey, self._client._run(_admin("PATCH", f"keys/{quote(key_id, safe='')}", changes)))

    def revoke_key(self, key_id: str) -> None:
        """Revoke a key for good: refused on every replica within a second."""
        self._client._run(_admin("DELETE", f"keys/{quote(key_id, safe='')}"))

    def usage(
        self,
        *,
        tenant: str | None = None,
        since: str | None = None,
        to: str | None = None,
        group_by: str | None = None,
    ) -> Usage:
        """One tenant's usage, or every tenant's (group_by="tenant" splits it)."""
        return self._client._run(
            _usage("/v1/admin/usage", tenant=tenant, since=since, to=to, group_by=group_by)
        )
