"""The `receiver` command: `serve` runs the service (more subcommands talk to a running one)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from receiver.config import ConfigError, Settings, load_settings


def _port(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="receiver",
        description="Verified callbacks and stored results for the FLUX image APIs of kie.ai, apimart, "
        "apicore and fal.ai.",
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
    return parser


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
    )


def serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(os.environ, host=args.host, port=args.port)
    except ConfigError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from receiver.app import create_app

    logging.basicConfig(
        level=os.environ.get("RECEIVER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if settings.dev_api_key_created:
        print(welcome(settings), file=sys.stderr, flush=True)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(float(os.environ.get("RECEIVER_SHUTDOWN_GRACE", "20"))),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
