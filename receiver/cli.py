"""The `receiver` command: `serve` runs the service; submit, get, tasks and events talk to a running one.

The client commands speak only the public HTTP API (RECEIVER_URL, RECEIVER_API_KEY), so they work the
same against a local or a remote service. Every failure is one line on stderr and an exit code, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from typing import NoReturn
from urllib.parse import quote
from urllib.parse import urlsplit

import httpx

from receiver import imageinfo
from receiver import logs
from receiver.config import ConfigError
from receiver.config import Settings
from receiver.config import load_settings
from receiver.models import OPTIONAL_FIELDS

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_STILL_RUNNING = 4
EXIT_INTERRUPTED = 130
DEFAULT_URL = "http://127.0.0.1:8000"
ENDED = ("succeeded", "failed")
# The API's long-poll returns at once when the task ends, but not on the intermediate changes
# (queued → submitted → downloading) that --wait shows: its windows start short and grow to 2 s.
FIRST_POLL_WINDOW = 0.25
POLL_WINDOW = 2.0
MAX_SERVER_WAIT = 60.0

EPILOG = """\
environment:
  RECEIVER_URL       the service the client commands talk to (default http://127.0.0.1:8000)
  RECEIVER_API_KEY   the bearer key for it (serve prints a development key on first start)

exit status:
  0  the command worked (for submit --wait and get: the task succeeded or has not ended)
  1  the task failed
  2  usage or validation error (the message names the field)
  3  the service cannot be reached, answered with a server error, or refused the API key
  4  --wait or --timeout ran out before the task ended
  130  interrupted (Ctrl-C); a submitted task goes on
"""


class CliError(Exception):
    """A failure for one line on stderr, with the exit status it calls for."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}")
    return seconds


def _positive(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {value!r}")
    return int(value)


def _pair(value: str) -> tuple[str, Any]:
    """KEY=VALUE; VALUE is read as JSON when it is JSON (3, true, {"a": 1}), else kept as text."""
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="receiver",
        description="Verified callbacks and stored results for the FLUX image APIs of kie.ai, apimart, "
        "apicore and fal.ai.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the HTTP API, the callback endpoints and the worker",
        description="Run the service. Configuration comes from RECEIVER_* and provider variables "
        "(see the README).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")

    submit = commands.add_parser(
        "submit",
        help="submit a task; optionally wait for it and save its images",
        description="Submit a generation or editing task and print its id. Fields a provider cannot "
        "honour are refused with the field named.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    request = submit.add_argument_group("request fields")
    request.add_argument(
        "--provider", required=True, help="kie, kie-market, apimart, apicore, fal or sandbox"
    )
    request.add_argument("--prompt", required=True, help="what to make, or how to edit the input image")
    request.add_argument("--model", help="the provider's model (default: the provider's default)")
    request.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="URL_OR_FILE",
        help="an input image: an http(s) URL, a data: URI, or a local PNG/JPEG/WebP file (uploaded "
        "first); repeat for several",
    )
    request.add_argument("--aspect-ratio", metavar="W:H", help="e.g. 16:9")
    request.add_argument("--output-format", metavar="FORMAT", help="e.g. png or jpeg")
    request.add_argument("--seed", type=int, help="a whole number, for repeatable results")
    request.add_argument("--safety-tolerance", type=int, metavar="N", help="the provider's moderation level")
    request.add_argument(
        "--prompt-upsampling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the provider rewrite the prompt",
    )
    request.add_argument("--resolution", help="e.g. 1K or 2K (kie-market)")
    request.add_argument("--num-images", type=int, metavar="N", help="how many images to make")
    request.add_argument(
        "--option",
        type=_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a provider-native field passed through (VALUE is JSON when it parses, else text); repeat",
    )
    request.add_argument(
        "--notify-url", metavar="URL", help="where to POST a signed notification when it ends"
    )
    request.add_argument(
        "--metadata",
        type=_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="echoed back with the task (VALUE is JSON when it parses, else text); repeat",
    )
    request.add_argument(
        "--idempotency-key", metavar="KEY", help="the same key and body return the same task"
    )
    after = submit.add_argument_group("after submitting")
    after.add_argument(
        "--wait", action="store_true", help="wait until the task ends, showing its progress on stderr"
    )
    after.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="with --wait: give up waiting after this long (exit 4)",
    )
    after.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="save the images as DIR/<task id>-<index>.<ext> (implies --wait)",
    )
    after.add_argument("--json", action="store_true", help="print the task JSON instead of its id")

    get = commands.add_parser(
        "get",
        help="show a task as JSON",
        description="Print a task as JSON. Exit 1 if it failed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    get.add_argument("task_id", metavar="ID", help="the task id (tsk_…)")
    get.add_argument(
        "--wait",
        type=_seconds,
        metavar="N",
        help="wait up to N seconds for the task to end (exit 4 if it has not)",
    )

    tasks = commands.add_parser(
        "tasks",
        help="list tasks, newest first, as a table",
        description="List your tasks, newest first.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks.add_argument(
        "--status", help="only tasks in this status (queued, submitted, downloading, succeeded, failed)"
    )
    tasks.add_argument("--provider", help="only tasks for this provider")
    tasks.add_argument("--limit", type=_positive, default=20, help="at most this many (default 20)")
    tasks.add_argument("--json", action="store_true", help="print the tasks as JSON lines instead")

    events = commands.add_parser(
        "events",
        help="list a task's events: callbacks, polls, downloads, notifications",
        description="List everything that happened to a task: when, what, whether it verified, what it "
        "changed, and for notifications the start of the app's answer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    events.add_argument("task_id", metavar="ID", help="the task id (tsk_…)")
    events.add_argument("--json", action="store_true", help="print the events as JSON lines instead")
    return parser


# -- serve ------------------------------------------------------------------------------------------


def welcome(settings: Settings) -> str:
    key = next(iter(settings.api_keys))
    return (
        f"receiver listening on http://{settings.host}:{settings.port} (public URL {settings.public_url})\n"
        f"development API key (set RECEIVER_API_KEYS to use your own): {key}\n"
        "try the sandbox:\n"
        f"  curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"provider": "sandbox", "prompt": "a red fox"}}\' http://{settings.host}:{settings.port}/v1/tasks\n'
        f"  curl -s -H 'Authorization: Bearer {key}' "
        f"'http://{settings.host}:{settings.port}/v1/tasks/<id>?wait=30'\n"
        f"or open the console at http://{settings.host}:{settings.port}/ui\n"
    )


def serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(os.environ, host=args.host, port=args.port)
    except ConfigError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from receiver.app import create_app

    logs.configure(settings.log_level, settings.log_format)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    if settings.dev_api_key_created:
        print(welcome(settings), file=sys.stderr, flush=True)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=None,  # uvicorn's own lines go through our formatter too
        access_log=False,  # an access log would print callback tokens and signed links
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace)),
    )
    return 0


# -- the HTTP API, as the client commands use it -------------------------------------------------


class Service:
    """A running receiver's API: answers as JSON, every failure as a CliError with its exit status."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url
        self.http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "receiver-cli/0.1"},
            timeout=httpx.Timeout(30.0, connect=5.0),
        )

    @classmethod
    def from_env(cls) -> Service:
        url = os.environ.get("RECEIVER_URL") or DEFAULT_URL
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(f"RECEIVER_URL must be an http(s) URL, got {url!r}", EXIT_USAGE)
        api_key = os.environ.get("RECEIVER_API_KEY", "").strip()
        if not api_key:
            raise CliError(
                "RECEIVER_API_KEY is not set (receiver serve prints a development key)", EXIT_UNREACHABLE
            )
        return cls(url.rstrip("/"), api_key)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise CliError(f"the service at {self.url} did not answer in time", EXIT_UNREACHABLE) from None
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise CliError(f"cannot reach the service at {self.url}: {reason}", EXIT_UNREACHABLE) from None
        check(response, self.url)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.call(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise CliError(f"the service at {self.url} gave an answer that is not JSON", EXIT_UNREACHABLE)
        return body

    def save(self, path: str, dest: Path) -> int:
        """Stream `path` into `dest` (by way of a temp file beside it); returns the bytes written."""
        temp = dest.with_name(f".{dest.name}.part")
        size = 0
        try:
            with self.http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                check(response, self.url)
                with open(temp, "wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
                        size += len(chunk)
            temp.replace(dest)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot fetch {path} from {self.url}: {exc}", EXIT_UNREACHABLE) from None
        except OSError as exc:
            raise CliError(f"cannot write {dest}: {exc.strerror or exc}", EXIT_USAGE) from None
        finally:
            temp.unlink(missing_ok=True)
        return size


def check(response: httpx.Response, url: str) -> None:
    """Raise the CliError a refused or failed answer calls for."""
    status = response.status_code
    if status < 400:
        return
    if status == 401:
        raise CliError(f"the service at {url} refused the API key (RECEIVER_API_KEY)", EXIT_UNREACHABLE)
    if status >= 500:
        raise CliError(f"the service at {url} answered HTTP {status}", EXIT_UNREACHABLE)
    raise CliError(api_error(response), EXIT_USAGE)


def api_error(response: httpx.Response) -> str:
    """`message: field: problem; field: problem` from the API's error JSON."""
    try:
        error = response.json()["error"]
        message = str(error["message"])
        fields = error.get("fields") or {}
    except (ValueError, KeyError, TypeError):
        return f"the service answered HTTP {response.status_code}"
    if isinstance(fields, dict) and fields:
        message += ": " + "; ".join(f"{name}: {problem}" for name, problem in fields.items())
    return message


# -- submit, get, tasks, events -----------------------------------------------------------------


def request_body(args: argparse.Namespace, upload: Callable[[Path], str]) -> dict[str, Any]:
    """The POST /v1/tasks body from the flags; local image files go through `upload`."""
    body: dict[str, Any] = {"provider": args.provider, "prompt": args.prompt}
    for name in (*OPTIONAL_FIELDS, "notify_url"):
        if name in ("images", "options"):  # repeated flags, gathered below
            continue
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.image:
        body["images"] = [
            value if value.startswith(("http://", "https://", "data:")) else upload(Path(value))
            for value in args.image
        ]
    if args.option:
        body["options"] = dict(args.option)
    if args.metadata:
        body["metadata"] = dict(args.metadata)
    return body


def upload_file(service: Service, path: Path) -> str:
    """Upload a local image through /v1/uploads; its signed link stands in for it in `images`."""
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise CliError(f"--image {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    content_type = imageinfo.sniff(data[: imageinfo.SNIFF_BYTES])
    if content_type is None:
        raise CliError(f"--image {path}: not a PNG, JPEG or WebP image", EXIT_USAGE)
    answer = service.json("POST", "/v1/uploads", content=data, headers={"Content-Type": content_type})
    return str(answer["url"])


def wait_for_end(
    service: Service, task: dict[str, Any], timeout: float | None, progress: bool
) -> dict[str, Any]:
    """Long-poll the task until it ends or `timeout` passes; with `progress`, each change on stderr."""
    started = time.monotonic()
    shown = None
    window = FIRST_POLL_WINDOW if progress else MAX_SERVER_WAIT
    while True:
        elapsed = time.monotonic() - started
        if progress and task["status"] != shown:
            shown = task["status"]
            print(f"{task['id']}: {shown} ({elapsed:.1f} s)", file=sys.stderr, flush=True)
        left = None if timeout is None else timeout - elapsed
        if task["status"] in ENDED or (left is not None and left <= 0):
            return task
        wait = window if left is None else min(window, left)
        task = service.json("GET", task_path(task["id"]), params={"wait": f"{wait:.2f}"}, timeout=wait + 30)
        if progress:
            window = min(window * 2, POLL_WINDOW)


def task_path(task_id: str) -> str:
    return f"/v1/tasks/{quote(task_id, safe='')}"


def outcome(task: dict[str, Any]) -> int:
    """The exit status for a task that was waited for, with a line on stderr when it did not succeed."""
    if task["status"] == "succeeded":
        return EXIT_SUCCEEDED
    if task["status"] == "failed":
        error = task.get("error") or {}
        print(
            f"receiver: task {task['id']} failed: {error.get('code', 'failed')}: {error.get('message', '')}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"receiver: task {task['id']} is still {task['status']}", file=sys.stderr)
    return EXIT_STILL_RUNNING


def save_images(service: Service, task: dict[str, Any], out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out {out}: {exc.strerror or exc}", EXIT_USAGE) from None
    for image in task["images"]:
        extension = imageinfo.EXTENSIONS.get(image["content_type"], "bin")
        dest = out / f"{task['id']}-{image['index']}.{extension}"
        service.save(f"/v1/tasks/{task['id']}/images/{image['index']}", dest)
        print(f"saved {dest}", file=sys.stderr)


def submit(service: Service, args: argparse.Namespace) -> int:
    body = request_body(args, lambda path: upload_file(service, path))
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    task = service.json("POST", "/v1/tasks", json=body, headers=headers)
    status = EXIT_SUCCEEDED
    if args.wait or args.out is not None:
        try:
            task = wait_for_end(service, task, args.timeout, progress=True)
        except KeyboardInterrupt:
            print(f"receiver: stopped waiting; task {task['id']} goes on", file=sys.stderr)
            print(task["id"])
            return EXIT_INTERRUPTED
        status = outcome(task)
        if args.out is not None and task["status"] == "succeeded":
            save_images(service, task, args.out)
    print(json.dumps(task, indent=2) if args.json else task["id"])
    return status


def get(service: Service, args: argparse.Namespace) -> int:
    task = service.json("GET", task_path(args.task_id))
    if args.wait is not None:
        task = wait_for_end(service, task, args.wait, progress=False)
    print(json.dumps(task, indent=2))
    if args.wait is None and task["status"] not in ENDED:
        return EXIT_SUCCEEDED
    return outcome(task)


def list_tasks(service: Service, args: argparse.Namespace) -> int:
    found: list[dict[str, Any]] = []
    params: dict[str, str] = {}
    if args.status:
        params["status"] = args.status
    if args.provider:
        params["provider"] = args.provider
    cursor = None
    while len(found) < args.limit:
        page_params = {**params, "limit": str(min(200, args.limit - len(found)))}
        if cursor:
            page_params["cursor"] = cursor
        page = service.json("GET", "/v1/tasks", params=page_params)
        found.extend(page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    if args.json:
        for task in found:
            print(json.dumps(task))
        return EXIT_SUCCEEDED
    rows = [
        [
            task["id"],
            task["status"],
            task["provider"],
            task["model"],
            str(len(task["images"])),
            _when(task["created_at"]),
            _short(task["prompt"], 40),
        ]
        for task in found
    ]
    print(table(["ID", "STATUS", "PROVIDER", "MODEL", "IMAGES", "CREATED", "PROMPT"], rows))
    return EXIT_SUCCEEDED


def list_events(service: Service, args: argparse.Namespace) -> int:
    items = service.json("GET", task_path(args.task_id) + "/events")["items"]
    if args.json:
        for event in items:
            print(json.dumps(event))
        return EXIT_SUCCEEDED
    lines = table(
        ["AT", "KIND", "VERIFIED", "CHANGE", "SUMMARY"],
        [
            [
                _when(event["at"]),
                event["kind"],
                "yes" if event["verified"] else "NO",
                event.get("change") or "",
                event["summary"],
            ]
            for event in items
        ],
    ).splitlines()
    out = [lines[0]]
    for line, event in zip(lines[1:], items, strict=True):
        out.append(line)
        if event.get("detail"):
            out.append(f"    answer: {_short(event['detail'], 200)}")
    print("\n".join(out))
    return EXIT_SUCCEEDED


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in [header, *rows]
    )


def _when(iso: str | None) -> str:
    return (iso or "").replace("T", " ")[:19]


def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


CLIENT_COMMANDS: dict[str, Callable[[Service, argparse.Namespace], int]] = {
    "submit": submit,
    "get": get,
    "tasks": list_tasks,
    "events": list_events,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2), as a return value for callers
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "serve":
        return serve(args)
    command = CLIENT_COMMANDS.get(args.command or "")
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    service: Service | None = None
    try:
        service = Service.from_env()
        return command(service, args)
    except CliError as exc:
        print(f"receiver: {exc.message}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("receiver: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if service is not None:
            service.close()


if __name__ == "__main__":
    sys.exit(main())
