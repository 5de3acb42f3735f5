"""The retention sweep, measured: `python scripts/bench_sweep.py [--tasks 100000]`.

On SQLite with a media directory, and on PostgreSQL (a throwaway cluster, tests/pg.py) with an S3
bucket (moto's server, in a process of its own), in ONE run:

1. Fill: `--tasks` ended tasks, each with one image row and three events, plus one running task that
   is older than all of them; a stored object for every image on the directory and for `--s3-share`
   of them in the bucket (moto takes a few ms an object).
2. Reference: the plain way, one `DELETE` of the same rows per table in ONE transaction, timed and
   then rolled back (so the sweep finds the same rows).
3. The sweep (receiver.jobs.sweep.Sweep, as the worker runs it): first the images (bytes deleted,
   entries marked expired), then the tasks (rows and what is left of their media).

Printed for each: the time, the peak RSS of this process above what it was before the step, the
longest single write transaction, and the longest wait of a concurrent writer: a thread of its own
with its own connection that inserts one event (as a callback does) and commits, again and again,
from before the step until after it. Everything stops with the script; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.config import load_settings  # noqa: E402
from receiver.jobs.sweep import Sweep  # noqa: E402
from receiver.media import LocalMedia  # noqa: E402
from receiver.media import Media  # noqa: E402
from receiver.media import S3Media  # noqa: E402
from receiver.media import one_chunk  # noqa: E402
from receiver.store.base import Timings  # noqa: E402
from receiver.store.base import Tx  # noqa: E402
from receiver.store.postgres import PostgresBackend  # noqa: E402
from receiver.store.rules import Store  # noqa: E402
from receiver.store.sqlite import SqliteBackend  # noqa: E402
from tests.pg import HOW_TO_GET  # noqa: E402
from tests.pg import Cluster  # noqa: E402
from tests.pg import pg_bin  # noqa: E402
from tests.s3 import ACCESS_KEY  # noqa: E402
from tests.s3 import REGION  # noqa: E402
from tests.s3 import SECRET_KEY  # noqa: E402

LIVE_EVENT = (
    "INSERT INTO events (task_id, at, kind, verified, summary) VALUES ('tsk_live', 0, 'callback', 1, 'x')"
)
FILL_CHUNK = 5000  # rows per fill statement batch
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(1024)  # ~1 KiB a stored object: the sweep deletes, never reads
ENDED_AT = 1_000_000.0  # when the filled tasks ended (long before "now")
BOUND = 3600.0  # seconds any one step may take before the script gives up


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Figures:
    seconds: float = 0.0
    peak_rss: int = 0  # bytes above the step's start
    longest_tx: float = 0.0
    writes: int = 0  # transactions
    writer_max_wait: float = 0.0
    writer_commits: int = 0


class PeakRss:
    """The highest RSS while running, sampled every 5 ms in a thread."""

    def __init__(self) -> None:
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, rss_bytes())


Connect = Callable[[], tuple[Callable[[], None], Callable[[], None]]]


class Writer:
    """A concurrent writer in a thread of its own (its connection made there): insert one event and
    commit, in a loop; the longest time one insert+commit took is how long it waited on the sweep's
    locks (plus its own few hundred µs)."""

    def __init__(self, connect: Connect) -> None:
        self.connect = connect
        self.max_wait = 0.0
        self.commits = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        insert, close = self.connect()
        self._ready.set()
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                insert()
                self.max_wait = max(self.max_wait, time.perf_counter() - started)
                self.commits += 1
                time.sleep(0.001)
        finally:
            close()

    def __enter__(self) -> Writer:
        self._thread.start()
        self._ready.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def sqlite_writer(path: Path) -> Writer:
    def connect() -> tuple[Callable[[], None], Callable[[], None]]:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=600000")

        def insert() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(LIVE_EVENT)
            conn.execute("COMMIT")

        return insert, conn.close

    return Writer(connect)


def postgres_writer(url: str) -> Writer:
    def connect() -> tuple[Callable[[], None], Callable[[], None]]:
        loop = asyncio.new_event_loop()
        conn = loop.run_until_complete(asyncpg.connect(url))

        def close() -> None:
            loop.run_until_complete(conn.close())
            loop.close()

        return lambda: loop.run_until_complete(conn.execute(LIVE_EVENT)), close

    return Writer(connect)


def timed_writes(store: Store) -> list[float]:
    """Instrument the store: the duration of every write transaction it runs (queue to commit)."""
    durations: list[float] = []
    write = store.backend.write

    async def timed(op: Any) -> Any:
        started = time.perf_counter()
        try:
            return await write(op)
        finally:
            durations.append(time.perf_counter() - started)

    store.backend.write = timed  # type: ignore[method-assign]
    return durations


async def fill(store: Store, media: Media, tasks: int, media_share: float) -> None:
    """`tasks` ended tasks (one image, three events each) and one running task older than them all."""
    stored = max(0, min(tasks, round(tasks * media_share)))
    started = time.perf_counter()
    for first in range(0, tasks, FILL_CHUNK):
        ids = [f"tsk_{n:08d}" for n in range(first, min(tasks, first + FILL_CHUNK))]

        async def rows(tx: Tx, ids: list[str] = ids) -> None:
            await tx.many(
                "INSERT INTO tasks (id, tenant, provider, model, prompt, request, status, created_at,"
                " updated_at, completed_at) VALUES (:id, 'bench', 'sandbox', 'flux-kontext-pro', 'p', '{}',"
                " 'succeeded', :at, :at, :at)",
                [{"id": task_id, "at": ENDED_AT + n} for n, task_id in enumerate(ids)],
            )
            await tx.many(
                "INSERT INTO images (task_id, idx, source_url, path, content_type, size, sha256, width,"
                " height, stored_at) VALUES (:id, 0, 'https://x/0.png', :path, 'image/png', 1032, :sha, 8, 8,"
                " :at)",
                [
                    {"id": task_id, "path": f"{task_id}/0.png", "sha": "0" * 64, "at": ENDED_AT}
                    for task_id in ids
                ],
            )
            await tx.many(
                "INSERT INTO events (task_id, at, kind, verified, summary) VALUES (:id, :at, :kind, 1, 's')",
                [
                    {"id": task_id, "at": ENDED_AT, "kind": kind}
                    for task_id in ids
                    for kind in ("created", "submit", "callback")
                ],
            )

        await store.write(rows)
    await store.write(
        lambda tx: tx.run(
            "INSERT INTO tasks (id, tenant, provider, model, prompt, request, status, created_at, updated_at)"
            " VALUES ('tsk_running', 'bench', 'sandbox', 'flux-kontext-pro', 'p', '{}', 'submitted', 0, 0)"
        )
    )
    say(f"  rows: {tasks} tasks in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    limit = asyncio.Semaphore(32)

    async def put(n: int) -> None:
        async with limit:
            await media.put(f"tsk_{n:08d}/0.png", one_chunk(IMAGE))

    for first in range(0, stored, 2000):
        await asyncio.gather(*(put(n) for n in range(first, min(stored, first + 2000))))
    say(f"  media: {stored} objects in {time.perf_counter() - started:.1f} s")


PLAIN_DELETE = (
    "DELETE FROM events WHERE task_id IN (SELECT id FROM tasks WHERE completed_at<:before)",
    "DELETE FROM images WHERE task_id IN (SELECT id FROM tasks WHERE completed_at<:before)",
    "DELETE FROM jobs WHERE task_id IN (SELECT id FROM tasks WHERE completed_at<:before)",
    "DELETE FROM tasks WHERE completed_at<:before",
)


async def measure(
    step: Callable[[], Awaitable[Any]], writer: Writer, durations: list[float] | None
) -> Figures:
    if durations is not None:
        durations.clear()
    with writer, PeakRss() as rss:
        await asyncio.sleep(0.05)  # the writer is going
        started = time.perf_counter()
        await asyncio.wait_for(step(), BOUND)
        seconds = time.perf_counter() - started
        await asyncio.sleep(0.05)
    return Figures(
        seconds=seconds,
        peak_rss=rss.peak - rss.base,
        longest_tx=max(durations, default=seconds) if durations is not None else seconds,
        writes=len(durations) if durations is not None else 1,
        writer_max_wait=writer.max_wait,
        writer_commits=writer.commits,
    )


async def run_backend(
    name: str,
    store: Store,
    media: Media,
    writer: Callable[[], Writer],
    reference: Callable[[], Awaitable[None]],
    tasks: int,
    share: float,
) -> dict[str, Figures]:
    say(f"{name}: filling")
    await store.open()
    durations = timed_writes(store)
    try:
        await fill(store, media, tasks, share)
        results: dict[str, Figures] = {}
        say(f"{name}: reference (one DELETE per table, one transaction, rolled back)")
        results["reference"] = await measure(reference, writer(), None)
        settings = load_settings({"RECEIVER_RETAIN_IMAGES": "1d", "RECEIVER_RETAIN_TASKS": "2d"})
        sweep = Sweep(settings, store, media)
        say(f"{name}: sweep, images")
        results["images"] = await measure(lambda: sweep.images(time.time()), writer(), durations)
        say(f"{name}: sweep, tasks")
        results["tasks"] = await measure(lambda: sweep.tasks(time.time()), writer(), durations)
        left = await store.fetch("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status")
        assert [(row["status"], int(row["n"])) for row in left] == [("submitted", 1)], left
        return results
    finally:
        await store.close()


async def sqlite_dir(tasks: int, scratch: Path) -> dict[str, Figures]:
    path = scratch / "receiver.db"
    store = Store(SqliteBackend(path), Timings(300.0, 3600.0))
    media = LocalMedia(scratch / "media")

    async def reference() -> None:
        def plain() -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=600000")
            conn.execute("BEGIN IMMEDIATE")
            for statement in PLAIN_DELETE:
                conn.execute(statement, {"before": time.time()})
            conn.execute("ROLLBACK")
            conn.close()

        await asyncio.to_thread(plain)

    return await run_backend(
        "SQLite + directory", store, media, lambda: sqlite_writer(path), reference, tasks, 1.0
    )


async def postgres_s3(tasks: int, share: float, url: str, s3_env: dict[str, str]) -> dict[str, Figures]:
    store = Store(PostgresBackend(url), Timings(300.0, 3600.0))
    media = S3Media(s3_env["RECEIVER_MEDIA_URL"], s3_env)

    async def reference() -> None:
        conn = await asyncpg.connect(url)
        try:
            tx = conn.transaction()
            await tx.start()
            for statement in PLAIN_DELETE:
                await conn.execute(statement.replace(":before", "$1"), time.time())
            await tx.rollback()
        finally:
            await conn.close()

    return await run_backend(
        "PostgreSQL + S3", store, media, lambda: postgres_writer(url), reference, tasks, share
    )


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a process of its own (its memory is not ours); its endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        "import time; from moto.server import ThreadedMotoServer;"
        f" ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(1e9)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def table(results: dict[str, dict[str, Figures]]) -> str:
    lines = [
        "| backend | step | time | peak RSS above start | longest transaction | transactions"
        " | a concurrent writer's longest wait (commits) |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "reference": "reference: one DELETE per table, one transaction",
        "images": "sweep: images expired (bytes deleted)",
        "tasks": "sweep: tasks deleted (rows, events)",
    }
    for backend, steps in results.items():
        for step, fig in steps.items():
            lines.append(
                f"| {backend} | {names[step]} | {fig.seconds:.1f} s | {fig.peak_rss / 2**20:.1f} MiB"
                f" | {fig.longest_tx * 1000:.0f} ms | {fig.writes} | {fig.writer_max_wait * 1000:.0f} ms"
                f" ({fig.writer_commits}) |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--s3-share", type=float, default=0.1, help="share of images stored in the bucket")
    parser.add_argument("--backend", choices=("all", "sqlite", "postgres"), default="all")
    args = parser.parse_args()
    results: dict[str, dict[str, Figures]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        if args.backend in ("all", "sqlite"):
            results["SQLite + directory"] = asyncio.run(sqlite_dir(args.tasks, Path(scratch) / "sqlite"))
        if args.backend in ("all", "postgres"):
            bin_dir = pg_bin()
            if bin_dir is None:
                say(f"PostgreSQL skipped: {HOW_TO_GET}")
            else:
                cluster = Cluster(bin_dir).start()
                try:
                    with moto_server() as endpoint:
                        import boto3

                        bucket = "bench-sweep"
                        boto3.client(
                            "s3",
                            endpoint_url=endpoint,
                            region_name=REGION,
                            aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY,
                        ).create_bucket(Bucket=bucket)
                        env = {
                            "RECEIVER_MEDIA_URL": f"s3://{bucket}",
                            "AWS_ENDPOINT_URL": endpoint,
                            "AWS_REGION": REGION,
                            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                        }
                        results["PostgreSQL + S3"] = asyncio.run(
                            postgres_s3(args.tasks, args.s3_share, cluster.database(), env)
                        )
                finally:
                    cluster.stop()
    print(f"{args.tasks} ended tasks, one image and three events each\n")
    print(table(results))


if __name__ == "__main__":
    main()
