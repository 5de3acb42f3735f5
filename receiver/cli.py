"""The `receiver` command: `serve` runs the service; submit, get, download, tasks, events and providers
talk to a running one.

The client commands speak only the public HTTP API (--url and --api-key, or RECEIVER_URL and
RECEIVER_API_KEY), so they work the same against a local or a remote service. Lists are a table on a
terminal and tab-separated lines, untruncated and without a header, for a pipe. Every failure is one
line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from typing import NoReturn
from typing import TextIO

from receiver import __version__
from receiver import logs
from receiver.client import DEFAULT_URL
from receiver.client import ENDED
from receiver.client import AdminClient
from receiver.client import ApiError
from receiver.client import Client
from receiver.client import LocalFileError
from receiver.client import ProviderInfo
from receiver.client import ReceiverError
from receiver.client import ServiceUnreachable
from receiver.client import Task
from receiver.client import Usage
from receiver.client import WaitTimeout
from receiver.client import base_url
from receiver.client import image_name
from receiver.config import ConfigError
from receiver.config import Settings
from receiver.config import effective
from receiver.config import prepare_settings
from receiver.models import OPTIONAL_FIELDS
from receiver.models import Status
from receiver.schema import ProviderChoice
from receiver.schema import ProviderName

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_STILL_RUNNING = 4
EXIT_INTERRUPTED = 130

ADMIN_EPILOG = """\
environment (the --url and --admin-key flags win over them):
  RECEIVER_URL        the service (default http://127.0.0.1:8000)
  RECEIVER_ADMIN_KEY  its admin key

exit status: 0 done, 2 bad usage or refused request, 3 service unreachable or key refused
"""
EPILOG = """\
environment (the --url and --api-key flags win over them):
  RECEIVER_URL       the service the client commands talk to (default http://127.0.0.1:8000)
  RECEIVER_API_KEY   the bearer key for it (serve prints a development key on first start)

output: a table on a terminal; piped, tab-separated lines without a header, nothing cut short.
Times are UTC.

exit status:
  0  the command worked (for submit --wait and get: the task succeeded or has not ended;
     for download: it succeeded and its images are saved)
  1  the task failed
  2  usage or validation error (the message names the field)
  3  the service cannot be reached, answered with a server error, or refused the API key
  4  --wait or --timeout ran out before the task ended (download: the task has not ended)
  130  interrupted (Ctrl-C); a submitted task goes on
"""


ROLES = ("all", "api", "worker")


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


def connection_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """--url and --api-key, before the command or after it (a subcommand's `default` is SUPPRESS, so
    one given before the command is not reset by the subcommand's parser)."""
    parser.add_argument(
        "--url", default=default, help="the service's URL (default: RECEIVER_URL, else http://127.0.0.1:8000)"
    )
    parser.add_argument(
        "--api-key",
        default=default,
        metavar="KEY",
        help="its bearer key (default: RECEIVER_API_KEY, which keeps the key out of the process list)",
    )


def client_command(
    commands: argparse._SubParsersAction[Parser], name: str, summary: str, description: str
) -> argparse.ArgumentParser:
    """A command that talks to a running service: --url and --api-key, and the help ending with the
    environment, the output and the exit statuses."""
    command = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    connection_flags(command, argparse.SUPPRESS)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="receiver",
        description="Verified callbacks and stored results for the FLUX image APIs of kie.ai, apimart, "
        "apicore and fal.ai.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"receiver {__version__}")
    connection_flags(parser, None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the HTTP API, the callback endpoints and the worker",
        description="Run the service. Configuration comes from RECEIVER_* and provider variables "
        "(`receiver config` shows them all, and where each value came from).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    serve.add_argument(
        "--http",
        choices=("auto", "h11", "httptools"),
        default="auto",
        help="HTTP parser (default auto: httptools when the `fast` extra is installed, else h11)",
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (default auto: uvloop when the `fast` extra is installed, else asyncio)",
    )
    serve.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="api: the HTTP API, callbacks and console; worker: the jobs; all: both (default)",
    )

    backup = commands.add_parser(
        "backup",
        help="write a backup of the data dir (SQLite and media) while the service runs",
        description="Write RECEIVER_DATA_DIR's database (a consistent snapshot, taken with SQLite's "
        "online-backup API while the service runs), its media and its kept secrets into one tar file, "
        "gzipped when FILE ends in .gz or .tgz; readable by its owner only. Under PostgreSQL or S3 "
        "media it names the tools that do this job there and exits 2.",
    )
    backup.add_argument("file", type=Path, metavar="FILE", help="the backup file to write")
    restore = commands.add_parser(
        "restore",
        help="put a backup back into an empty data dir",
        description="Unpack a backup written by `receiver backup` into RECEIVER_DATA_DIR, which must be "
        "empty or absent (a non-empty one is refused, exit 2). Start `receiver serve` on it after.",
    )
    restore.add_argument("file", type=Path, metavar="FILE", help="the backup file to read")
    config = commands.add_parser(
        "config",
        help="print the configuration serve would use, secrets masked",
        description="Print every setting the service reads, the value `receiver serve` would use here "
        "and where it came from (environment, default, data dir), secrets masked. Writes nothing; a bad "
        "value is one line and exit 2, as for serve.",
    )
    config.add_argument("--json", action="store_true", help="print the settings as JSON lines instead")

    submit = client_command(
        commands,
        "submit",
        "submit a task; optionally wait for it and save its images",
        "Submit a generation or editing task and print its id. Fields a provider cannot "
        "honour are refused with the field named.",
    )
    request = submit.add_argument_group("request fields")
    request.add_argument("--provider", required=True, help=_one_of(ProviderChoice))
    request.add_argument("--prompt", required=True, help="what to make, or how to edit the input image")
    request.add_argument("--model", help="the provider's model (default: the provider's default)")
    request.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="URL_OR_FILE",
        help="an input image: an http(s) URL, a data: URI, or a local PNG/JPEG/WebP file (sent inline "
        "and stored by the service); repeat for several",
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
        "--fallback",
        action="append",
        default=[],
        metavar="PROVIDER",
        help="a provider to move the task to when the current one refuses it for a reason not the "
        "request's fault (no credits, bad key, down) or fails the generation; repeat, in order (at most 4)",
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
        help="with --wait or --out: give up waiting after this long (exit 4)",
    )
    after.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="save the images as DIR/<task id>-<index>.<ext> (implies --wait; DIR is checked for "
        "writing before the task is submitted)",
    )
    after.add_argument("--json", action="store_true", help="print the task JSON instead of its id")

    get = client_command(
        commands,
        "get",
        "show a task as JSON",
        "Print a task as JSON. Exit 1 if it failed.",
    )
    get.add_argument("task_id", metavar="ID", help="the task id (tsk_…)")
    get.add_argument(
        "--wait",
        type=_seconds,
        metavar="N",
        help="wait up to N seconds for the task to end (exit 4 if it has not)",
    )

    download = client_command(
        commands,
        "download",
        "save the images of a task",
        "Save the images of a task as DIR/<task id>-<index>.<ext> and print each path. "
        "Exit 1 if the task failed, 4 if it has not ended (or not within --wait).",
    )
    download.add_argument("task_id", metavar="ID", help="the task id (tsk_…)")
    download.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="where to save them (default: here)"
    )
    download.add_argument(
        "--wait", type=_seconds, metavar="N", help="wait up to N seconds for the task to end first"
    )

    tasks = client_command(
        commands,
        "tasks",
        "list tasks, newest first",
        "List your tasks, newest first.",
    )
    tasks.add_argument("--status", help=f"only tasks in this status ({', '.join(Status)})")
    tasks.add_argument("--provider", help=f"only tasks for this provider ({', '.join(ProviderName)})")
    tasks.add_argument("--limit", type=_positive, default=20, help="at most this many (default 20)")
    tasks.add_argument("--json", action="store_true", help="print the tasks as JSON lines instead")

    events = client_command(
        commands,
        "events",
        "list a task's events: callbacks, polls, downloads, notifications",
        "List everything that happened to a task: when, what, whether it verified, what it "
        "changed, and for notifications the start of the app's answer.",
    )
    events.add_argument("task_id", metavar="ID", help="the task id (tsk_…)")
    events.add_argument("--json", action="store_true", help="print the events as JSON lines instead")

    providers = client_command(
        commands,
        "providers",
        "list the providers this service offers",
        "List the providers this service offers: models, default model, input images, "
        "the optional fields each honours.",
    )
    providers.add_argument("--json", action="store_true", help="print the providers as JSON lines instead")

    usage = client_command(
        commands,
        "usage",
        "show your tasks and spend",
        "Print the tasks you created in [--from, --to) and what they cost (a task still running counts "
        "by its estimate); by default this month so far (UTC).",
    )
    usage_flags(usage, ("provider", "model", "day"))
    keys_parser(commands)
    return parser


def usage_flags(parser: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    parser.add_argument("--from", dest="since", metavar="DATE", help="from this date or RFC 3339 time")
    parser.add_argument("--to", metavar="DATE", help="up to (not including) this date or time")
    parser.add_argument("--group-by", choices=groups, help="one line per group")
    parser.add_argument("--json", action="store_true", help="print the usage as JSON instead")


def keys_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    """`receiver keys …`: the admin API, with RECEIVER_ADMIN_KEY (or --admin-key)."""
    keys = commands.add_parser(
        "keys",
        help="create, list, change and revoke keys kept in the database (admin)",
        description="Keys kept in the service's database, each for a tenant with an optional budget "
        "and rate, through the admin API (RECEIVER_ADMIN_KEY). The secret of a new key is printed once.",
        epilog=ADMIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys.add_argument("--url", help="the service's URL (default: RECEIVER_URL, else http://127.0.0.1:8000)")
    keys.add_argument(
        "--admin-key",
        metavar="KEY",
        help="the admin key (default: RECEIVER_ADMIN_KEY, out of the process list)",
    )
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key for TENANT and print its secret, once")
    create.add_argument("tenant", metavar="TENANT")
    key_fields(create, None)
    listed = actions.add_parser("list", help="list the keys (never a secret)")
    listed.add_argument("--json", action="store_true", help="print the keys as JSON lines instead")
    change = actions.add_parser("change", help="change a key's name, budget, period, rate or state")
    change.add_argument("key_id", metavar="ID", help="the key's id (key_…)")
    key_fields(change, argparse.SUPPRESS)
    state = change.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="disabled", action="store_const", const=True, help="refuse it")
    state.add_argument("--enable", dest="disabled", action="store_const", const=False, help="take it again")
    revoke = actions.add_parser("revoke", help="revoke a key for good")
    revoke.add_argument("key_id", metavar="ID", help="the key's id (key_…)")
    usage = actions.add_parser("usage", help="any tenant's usage, or every tenant's")
    usage.add_argument("--tenant", help="this tenant's only")
    usage_flags(usage, ("provider", "model", "day", "tenant"))


def _cleared(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A flag's value, or `none` to clear it (None)."""

    def read(value: str) -> Any:
        return None if value == "none" else kind(value)

    read.__name__ = kind.__name__
    return read


def key_fields(parser: argparse.ArgumentParser, default: Any) -> None:
    """A key's fields as flags; `none` clears one (for `change`, a flag left out stays as it is)."""
    parser.add_argument("--name", default=default, help="what the key is for")
    parser.add_argument(
        "--budget", type=_cleared(float), default=default, metavar="USD", help="its budget (none: no budget)"
    )
    parser.add_argument(
        "--period", type=_cleared(str), default=default, metavar="day|month|none", help="none: lifetime"
    )
    parser.add_argument(
        "--rate", type=_cleared(int), default=default, metavar="N", help="creates a minute (none: no limit)"
    )


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


def http_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's bounds on what one client may hold: idle keep-alive, open connections (more are
    answered 503 at once), and the bytes of an unfinished request head (h11)."""
    return {
        "timeout_keep_alive": settings.keep_alive,
        "limit_concurrency": settings.max_connections,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }


def serve(args: argparse.Namespace) -> int:
    os.umask(0o077)  # every file the service makes (database, media, kept secrets) is its user's only
    try:
        settings = prepare_settings(os.environ, host=args.host, port=args.port)
    except ConfigError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 2
    for chosen in (args.http, args.loop):
        if chosen in ("httptools", "uvloop") and importlib.util.find_spec(chosen) is None:
            print(f"receiver: {chosen} is not installed (pip install 'receiver[fast]')", file=sys.stderr)
            return EXIT_USAGE
    import uvicorn

    from receiver.app import create_app
    from receiver.server import DrainingServer
    from receiver.store import RoleTaken
    from receiver.store.sqlite import lock_worker

    if args.role != "api" and settings.database_url is None:
        try:
            lock_worker(settings.data_dir)  # before anything starts: a refused worker says so in one line
        except RoleTaken as exc:
            print(f"receiver: {exc}", file=sys.stderr)
            return 2

    if settings.database_url is not None:
        from receiver.store.postgres import unusable_because

        # Down, wrong password, no such database: one line now, not a traceback from the app's start.
        reason = asyncio.run(unusable_because(settings.database_url))
        if reason is not None:
            print(f"receiver: cannot use the database in RECEIVER_DATABASE_URL: {reason}", file=sys.stderr)
            return EXIT_UNREACHABLE

    logs.configure(settings.log_level, settings.log_format)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        # Bound before anything is printed or started: a port in use is one line, not a false start.
        sock = listen(args.host, args.port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"receiver: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    if settings.dev_api_key_created:
        print(welcome(settings), file=sys.stderr, flush=True)
    app = create_app(settings, role=args.role)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            http=args.http,
            loop=args.loop,
            log_config=None,  # uvicorn's own lines go through our formatter too
            access_log=False,  # an access log would print callback tokens and signed links
            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace)),
            **http_limits(settings),
        ),
        app.state.drain,
    )
    with sock:
        server.run(sockets=[sock])
    if not server.started:
        return EXIT_UNREACHABLE  # the start failed (its reason is logged); uvicorn's own status too
    return 0


def backup_or_restore(args: argparse.Namespace) -> int:
    from receiver.backup import BackupError
    from receiver.backup import backup
    from receiver.backup import restore

    os.umask(0o077)  # as serve: what is written is its user's only
    try:
        summary = (backup if args.command == "backup" else restore)(os.environ, args.file)
    except BackupError as exc:
        print(f"receiver: {exc.message}", file=sys.stderr)
        return exc.status
    print(summary, file=sys.stderr)
    return 0


def print_config(args: argparse.Namespace) -> int:
    """`receiver config`: the settings table with this environment's values, secrets masked."""
    try:
        rows = effective(os.environ)
    except ConfigError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.json:
            json_lines(dataclasses.asdict(row) for row in rows)
        else:
            header, cells = (
                ["VARIABLE", "VALUE", "ORIGIN"],
                [[row.name, row.value, row.origin] for row in rows],
            )
            show(header, cells, sys.stdout.isatty())
        sys.stdout.flush()
    except BrokenPipeError:  # `receiver config | head`: the reader has what it wanted
        silence_stdout()
    return EXIT_SUCCEEDED


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    # whose proto says TCP, and accepted sockets inherit it. With proto 0 every keep-alive answer
    # waited out a delayed ACK: ~45 ms a request instead of ~3 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


# -- the client commands, on receiver.client ---------------------------------------------------------


KEY_FLAGS = {"name": "name", "budget": "budget_usd", "period": "budget_period", "rate": "rate_per_minute"}


def admin_command(args: argparse.Namespace) -> int:
    """`receiver keys ACTION`: one admin API call, its answer printed."""
    try:
        url = base_url(args.url or os.environ.get("RECEIVER_URL") or DEFAULT_URL)
    except ValueError as exc:
        print(f"receiver: {'--url' if args.url else 'RECEIVER_URL'} {exc}", file=sys.stderr)
        return EXIT_USAGE
    key_from = "--admin-key" if args.admin_key else "RECEIVER_ADMIN_KEY"
    admin_key = (args.admin_key or os.environ.get("RECEIVER_ADMIN_KEY", "")).strip()
    if not admin_key:
        print("receiver: RECEIVER_ADMIN_KEY is not set and no --admin-key given", file=sys.stderr)
        return EXIT_UNREACHABLE
    # The key's flags given (`change` leaves out those not given; `create` has them all, None if unset).
    given = {field: getattr(args, flag) for flag, field in KEY_FLAGS.items() if hasattr(args, flag)}
    try:
        with AdminClient(url, admin_key) as admin:
            if args.action == "create":
                created = admin.create_key(args.tenant, **{k: v for k, v in given.items() if v is not None})
                print(json.dumps(created))
                print("receiver: keep the key now: it is not shown again", file=sys.stderr)
            elif args.action == "list":
                keys = admin.list_keys()
                if args.json:
                    return json_lines(keys)
                rows = [
                    [
                        k["id"],
                        k["tenant"],
                        _money(k["budget_usd"]),
                        k["budget_period"] or "life",
                        str(k["rate_per_minute"] or ""),
                        "disabled" if k["disabled"] else "",
                        k["name"],
                    ]
                    for k in keys
                ]
                show(["ID", "TENANT", "BUDGET", "PERIOD", "RATE", "STATE", "NAME"], rows, sys.stdout.isatty())
            elif args.action == "change":
                if args.disabled is not None:
                    given["disabled"] = args.disabled
                print(json.dumps(admin.change_key(args.key_id, **given)))
            elif args.action == "revoke":
                admin.revoke_key(args.key_id)
                print(f"revoked {args.key_id}", file=sys.stderr)
            else:
                usage = admin.usage(tenant=args.tenant, since=args.since, to=args.to, group_by=args.group_by)
                return print_usage(usage, args.json)
    except ReceiverError as exc:
        error = cli_error(exc, url, key_from)
        print(f"receiver: {error.message}", file=sys.stderr)
        return error.status
    return EXIT_SUCCEEDED


def list_usage(client: Client, args: argparse.Namespace) -> int:
    return print_usage(client.usage(since=args.since, to=args.to, group_by=args.group_by), args.json)


def print_usage(usage: Usage, as_json: bool) -> int:
    if as_json:
        print(json.dumps(usage))
        return EXIT_SUCCEEDED
    rows = [[group["group"], str(group["tasks"]), _money(group["usd"])] for group in usage["groups"]]
    rows.append(["total", str(usage["tasks"]), _money(usage["usd"])])
    terminal = sys.stdout.isatty()
    if terminal:
        print(f"from {_when(usage['from'], True)} to {_when(usage['to'], True)}")
    show(["GROUP", "TASKS", "USD"], rows, terminal)
    return EXIT_SUCCEEDED


def _money(usd: float | None) -> str:
    return "" if usd is None else f"{usd:.4f}"


def connect(args: argparse.Namespace) -> Client:
    """The client for --url and --api-key, else RECEIVER_URL and RECEIVER_API_KEY."""
    url_from = "--url" if args.url else "RECEIVER_URL"
    try:
        url = base_url(args.url or os.environ.get("RECEIVER_URL") or DEFAULT_URL)
    except ValueError as exc:
        raise CliError(f"{url_from} {exc}", EXIT_USAGE) from None
    api_key = (args.api_key or os.environ.get("RECEIVER_API_KEY", "")).strip()
    if not api_key:
        raise CliError(
            "RECEIVER_API_KEY is not set and no --api-key given (receiver serve prints a development key)",
            EXIT_UNREACHABLE,
        )
    return Client(url, api_key)


def cli_error(exc: ReceiverError, url: str, key_from: str) -> CliError:
    """The one line and exit status for a client failure."""
    if isinstance(exc, ApiError):
        if exc.status == 401:
            return CliError(f"the service at {url} refused the API key ({key_from})", EXIT_UNREACHABLE)
        if exc.status >= 500:
            return CliError(f"the service at {url} answered HTTP {exc.status}", EXIT_UNREACHABLE)
    if isinstance(exc, ServiceUnreachable):
        return CliError(exc.message, EXIT_UNREACHABLE)
    return CliError(exc.message, EXIT_USAGE)


def _one_of(values: Iterable[str]) -> str:
    """`a, b or c`: the values a flag takes, in a help line, from the schema's enum."""
    *most, last = values
    return f"{', '.join(most)} or {last}" if most else last


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The optional POST /v1/tasks fields from the flags (images are handled apart)."""
    fields: dict[str, Any] = {}
    for name in (*OPTIONAL_FIELDS, "notify_url"):
        if name in ("images", "options"):  # repeated flags, gathered below
            continue
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.option:
        fields["options"] = dict(args.option)
    if args.metadata:
        fields["metadata"] = dict(args.metadata)
    if args.fallback:
        fields["fallback"] = list(args.fallback)
    return fields


def check_out_dir(out: Path) -> None:
    """--out must be a directory we can write to, known before anything is paid for."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise CliError(f"--out {out}: {exc.strerror or exc}", EXIT_USAGE) from None


class Progress:
    """Each status change as a line on stderr; on a terminal, the time waited so far in between."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.shown: str | None = None
        self.ticking = False

    def __call__(self, task: Task, elapsed: float) -> None:
        if task["status"] != self.shown:
            self.shown = task["status"]
            self._clear()
            print(f"{task['id']}: {self.shown} ({elapsed:.1f} s)", file=self.stream, flush=True)
        elif self.live and task["status"] not in ENDED:
            self.stream.write(f"\r  … {self.shown}, {elapsed:.0f} s elapsed")
            self.stream.flush()
            self.ticking = True

    def _clear(self) -> None:
        if self.ticking:
            self.stream.write("\r\x1b[K")
            self.ticking = False

    def done(self) -> None:
        self._clear()
        self.stream.flush()


def outcome(task: Task) -> int:
    """The exit status for a task that was waited for, with a line on stderr when it did not succeed."""
    if task["status"] == "succeeded":
        return EXIT_SUCCEEDED
    if task["status"] == "failed":
        error: Mapping[str, Any] = task["error"] or {}
        print(
            f"receiver: task {task['id']} failed: {error.get('code', 'failed')}: {error.get('message', '')}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"receiver: task {task['id']} is still {task['status']}", file=sys.stderr)
    return EXIT_STILL_RUNNING


def save_images(client: Client, task: Task, out: Path, show: Callable[[Path], None]) -> None:
    for image in task["images"]:
        dest = out / image_name(task, image)
        try:
            client.download(task, image["index"], dest)
        except OSError as exc:
            raise CliError(f"cannot write {dest}: {exc.strerror or exc}", EXIT_USAGE) from None
        show(dest)


def waited(client: Client, task: Task, timeout: float | None, progress: Progress | None) -> Task:
    """The task once it ended, or as it was when `timeout` ran out."""
    try:
        return client.wait(task, timeout=timeout, on_progress=progress)
    except WaitTimeout as exc:
        return exc.task
    finally:
        if progress is not None:
            progress.done()


def submit(client: Client, args: argparse.Namespace) -> int:
    waiting = args.wait or args.out is not None
    if args.timeout is not None and not waiting:
        raise CliError("--timeout needs --wait (or --out)", EXIT_USAGE)
    if args.out is not None:
        check_out_dir(args.out)
    try:
        task = client.create(
            args.provider,
            args.prompt,
            images=args.image,
            idempotency_key=args.idempotency_key,
            **request_fields(args),
        )
    except LocalFileError as exc:
        raise CliError(f"--image {exc.message}", EXIT_USAGE) from None
    status = EXIT_SUCCEEDED
    if waiting:
        try:
            task = waited(client, task, args.timeout, Progress(sys.stderr))
        except KeyboardInterrupt:
            print(f"receiver: stopped waiting; task {task['id']} goes on", file=sys.stderr)
            print(task["id"])
            return EXIT_INTERRUPTED
        status = outcome(task)
        if args.out is not None and task["status"] == "succeeded":
            save_images(client, task, args.out, lambda path: print(f"saved {path}", file=sys.stderr))
    print(json.dumps(task, indent=2) if args.json else task["id"])
    return status


def get(client: Client, args: argparse.Namespace) -> int:
    if args.wait is None:
        task = client.get(args.task_id)
    else:
        task = waited(client, client.get(args.task_id), args.wait, None)
    print(json.dumps(task, indent=2))
    if args.wait is None and task["status"] not in ENDED:
        return EXIT_SUCCEEDED
    return outcome(task)


def download(client: Client, args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    task = client.get(args.task_id)
    if args.wait is not None:
        task = waited(client, task, args.wait, None)
    if task["status"] != "succeeded":
        return outcome(task)
    save_images(client, task, args.out, print)
    return EXIT_SUCCEEDED


def list_tasks(client: Client, args: argparse.Namespace) -> int:
    found = client.list_tasks(status=args.status, provider=args.provider, limit=args.limit)
    if args.json:
        return json_lines(found)
    terminal = sys.stdout.isatty()
    rows = [
        [
            task["id"],
            task["status"],
            task["provider"],
            task["model"],
            str(len(task["images"])),
            _when(task["created_at"], terminal),
            _short(task["prompt"], 40) if terminal else task["prompt"],
        ]
        for task in found
    ]
    show(["ID", "STATUS", "PROVIDER", "MODEL", "IMAGES", "CREATED", "PROMPT"], rows, terminal)
    return EXIT_SUCCEEDED


def list_events(client: Client, args: argparse.Namespace) -> int:
    items = client.events(args.task_id)
    if args.json:
        return json_lines(items)
    terminal = sys.stdout.isatty()
    rows = [
        [
            _when(event["at"], terminal),
            event["kind"],
            "yes" if event["verified"] else "NO",
            event.get("change") or "",
            event["summary"],
        ]
        for event in items
    ]
    if not terminal:  # the app's answer as a last column, whole
        show([], [[*row, event.get("detail") or ""] for row, event in zip(rows, items, strict=True)], False)
        return EXIT_SUCCEEDED
    lines = table(["AT", "KIND", "VERIFIED", "CHANGE", "SUMMARY"], rows).splitlines()
    out = [lines[0]]
    for line, event in zip(lines[1:], items, strict=True):
        out.append(line)
        detail = event.get("detail")
        if detail:
            out.append(f"    answer: {_short(detail, 200)}")
    print("\n".join(out))
    return EXIT_SUCCEEDED


def list_providers(client: Client, args: argparse.Namespace) -> int:
    offered = client.providers()
    if args.json:
        return json_lines(offered)
    terminal = sys.stdout.isatty()

    def row(provider: ProviderInfo) -> list[str]:
        models = ", ".join(provider["models"] + provider["native_models"])
        images = f"{provider['min_images']}-{provider['max_images']}"
        fields = ", ".join(provider["fields"])
        return [provider["name"], provider["default_model"], images, fields, models]

    show(["NAME", "DEFAULT MODEL", "IMAGES", "FIELDS", "MODELS"], [row(p) for p in offered], terminal)
    return EXIT_SUCCEEDED


def json_lines(items: Iterable[Any]) -> int:
    for item in items:
        print(json.dumps(item))
    return EXIT_SUCCEEDED


def show(header: list[str], rows: list[list[str]], terminal: bool) -> None:
    """A table with a header for a person; for a pipe, one tab-separated line a row, no header, each
    cell whole (tabs and line breaks in it turned to spaces, so a row stays one line of cells)."""
    if terminal:
        print(table(header, rows))
        return
    for row in rows:
        print("\t".join(" ".join(cell.split()) for cell in row))


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in [header, *rows]
    )


def _when(iso: str | None, terminal: bool) -> str:
    """A time as the API gives it (ISO 8601, `Z` for UTC) for a pipe; to the second, marked UTC, for a
    person."""
    if not terminal or not iso:
        return iso or ""
    return iso.replace("T", " ")[:19] + " UTC"


def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


CLIENT_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": submit,
    "get": get,
    "download": download,
    "tasks": list_tasks,
    "events": list_events,
    "providers": list_providers,
    "usage": list_usage,
}
COMMANDS = ("serve", *CLIENT_COMMANDS, "backup", "restore", "config", "keys")
VALUED_FLAGS = ("--url", "--api-key")  # the options before a command that take a value


def mistyped(argv: Sequence[str]) -> str | None:
    """What to say when the command (the first word that is not an option) is none of ours."""
    words = iter(argv)
    for word in words:
        if word in VALUED_FLAGS:
            next(words, None)
        elif not word.startswith("-"):
            if word in COMMANDS:
                return None
            close = difflib.get_close_matches(word, COMMANDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the commands are {', '.join(COMMANDS)}"
            return f"unknown command {word!r} ({hint})"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    unknown = mistyped(sys.argv[1:] if argv is None else argv)
    if unknown is not None:
        print(f"receiver: {unknown} (see receiver --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2), as a return value for callers
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "serve":
        return serve(args)
    if args.command in ("backup", "restore"):
        return backup_or_restore(args)
    if args.command == "config":
        return print_config(args)
    if args.command == "keys":
        return admin_command(args)
    command = CLIENT_COMMANDS.get(args.command or "")
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    client: Client | None = None
    try:
        client = connect(args)
        status = command(client, args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except ReceiverError as exc:
        key_from = "--api-key" if args.api_key else "RECEIVER_API_KEY"
        error = cli_error(exc, client.url if client is not None else "", key_from)
        print(f"receiver: {error.message}", file=sys.stderr)
        return error.status
    except CliError as exc:
        print(f"receiver: {exc.message}", file=sys.stderr)
        return exc.status
    except BrokenPipeError:
        # The reader (`receiver tasks | head -1`) has what it wanted: not an error.
        silence_stdout()
        return EXIT_SUCCEEDED
    except KeyboardInterrupt:
        print("receiver: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if client is not None:
            client.close()


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no real file (a test's capture): nothing to flush into
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
