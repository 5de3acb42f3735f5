"""Scaling out, measured: `scripts/bench --backend postgres`.

The realistic scenario of scripts/bench.py (distinct tasks, half kie with HMAC and half fal with
Ed25519, every callback a real ~0.5 MB download from the fakes), in ONE run, on four layouts:
SQLite and PostgreSQL, each as one `serve --role all` and as two `--role api` replicas beside one
`--role worker`. PostgreSQL is a throwaway cluster this script starts (tests/pg.py) and stops.

1. Callback ack: wrk replays distinct signed callbacks for seeded submitted tasks for a few seconds;
   with two API replicas the 64 connections are split over both ports (two wrk, one thread each).
   Then the downloads drain (bounded polling of the database) before the next layout starts.
2. End to end, in the same processes once the burst drained: tasks created through the API, submitted
   by the worker to the fakes, called back, downloaded, notified; tasks per second from the first
   create to the last notification.
3. Takeover: PostgreSQL, one API replica and two workers with a short RECEIVER_JOB_LEASE; images are
   served slowly; once worker A is fetching, `kill -9` it and time until the downloads it held (read
   from the jobs table: their owner names its pid) are stored by worker B. Work done twice is counted
   from the fakes' fetch log.

Everything is on 127.0.0.1, every wait is bounded, and the script stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
from bench import Images  # noqa: E402
from bench import Receiver  # noqa: E402
from bench import Sink  # noqa: E402
from bench import callback_lines  # noqa: E402
from bench import end_to_end  # noqa: E402
from bench import image_bytes  # noqa: E402
from bench import phase_tasks  # noqa: E402
from bench import print_table  # noqa: E402
from bench import say  # noqa: E402
from bench import seed_tasks  # noqa: E402
from bench import write_requests  # noqa: E402
from bench import wrk  # noqa: E402

from receiver.store.base import Timings  # noqa: E402
from receiver.store.postgres import PostgresBackend  # noqa: E402
from receiver.store.rules import Store  # noqa: E402
from tests.pg import HOW_TO_GET  # noqa: E402
from tests.pg import SECRETS  # noqa: E402
from tests.pg import Cluster  # noqa: E402
from tests.pg import pg_bin  # noqa: E402

# Layouts: the roles of the processes started; the first API process's URL is everyone's public URL.
LAYOUTS = {"1 replica": ("all",), "2 replicas": ("api", "api", "worker")}
SEED_SQL = (
    "INSERT INTO tasks (id, tenant, provider, model, prompt, request, status, provider_task_id,"
    " created_at, updated_at, submitted_at) VALUES ($1, 'bench', $2, 'flux-kontext-pro', 'bench',"
    ' \'{"images":[],"params":{},"options":{}}\', \'submitted\', $3, $4, $4, $4)'
)


class Database:
    """One fresh database of either backend: the env that points the receiver at it, seeding, counts."""

    def __init__(self, data: Path, cluster: Cluster | None) -> None:
        self.data = data
        data.mkdir()
        self.url = cluster.database() if cluster else None
        self.env = {"RECEIVER_DATA_DIR": str(data)}
        if self.url:
            self.env |= {
                "RECEIVER_DATABASE_URL": self.url,
                "RECEIVER_NOTIFY_SECRET": SECRETS["RECEIVER_NOTIFY_SECRET"],
            }
            asyncio.run(self._migrate())

    async def _migrate(self) -> None:
        assert self.url
        store = Store(PostgresBackend(self.url), Timings(3600.0, 86400.0))
        await store.open()
        await store.close()

    def seed(self, rows: list[tuple[str, str, str]]) -> None:
        if self.url is None:
            seed_tasks(self.data / "receiver.db", rows)
            return
        now = time.time()
        self.query(lambda conn: conn.executemany(SEED_SQL, [(*row, now) for row in rows]))

    def query(self, run: Callable[[asyncpg.Connection], Any]) -> Any:
        async def once() -> Any:
            assert self.url
            conn = await asyncpg.connect(self.url)
            try:
                return await run(conn)
            finally:
                await conn.close()

        return asyncio.run(once())

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """A read in the SQLite dialect with ? marks, run on either backend."""
        if self.url is None:
            conn = sqlite3.connect(self.data / "receiver.db")
            try:
                return conn.execute(sql, args).fetchall()
            finally:
                conn.close()
        for n in range(len(args)):
            sql = sql.replace("?", f"${n + 1}", 1)
        return [tuple(row) for row in self.query(lambda conn: conn.fetch(sql, *args))]

    def phase_statuses(self, phase: int) -> dict[str, int]:
        return dict(
            self.rows(
                "SELECT status, COUNT(*) FROM tasks WHERE id >= ? AND id < ? GROUP BY status",
                f"tsk_{phase:02x}",
                f"tsk_{phase + 1:02x}",
            )
        )

    def wait_drained(self, seconds: float) -> None:
        """Bounded polling until every acknowledged callback is applied (the inbox is empty) and every
        download it started has ended (no download job left)."""
        deadline = time.monotonic() + seconds
        while True:
            (left,) = self.rows(
                "SELECT (SELECT COUNT(*) FROM inbox) + (SELECT COUNT(*) FROM jobs WHERE kind = 'download')"
            )[0]
            if left == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{left} callbacks or downloads still pending after {seconds:g} s")
            time.sleep(0.2)


@contextmanager
def replicas(
    database: Database, env: dict[str, str], layout: str
) -> Iterator[list[tuple[str, Receiver, Any]]]:
    """The layout's processes, running: (role, Receiver, Popen) each."""
    started: list[tuple[str, Receiver, Any]] = []
    with ExitStack() as stack:
        public: dict[str, str] = {}
        for role in LAYOUTS[layout]:
            receiver = Receiver(database.data, {**env, **database.env, **public}, ("--role", role))
            public = public or {"RECEIVER_PUBLIC_URL": receiver.url}
            started.append((role, receiver, stack.enter_context(receiver.serve())))
        yield started


def ack(
    work: Path, name: str, database: Database, running: list[tuple[str, Receiver, Any]], images: Images,
    args: argparse.Namespace, phase: int,
) -> dict[str, Any]:  # fmt: skip
    """A callback burst against the layout's API processes, then the downloads drain."""
    tasks = phase_tasks(phase, args.burst)
    database.seed(tasks)
    apis = [receiver for role, receiver, _ in running if role != "worker"]
    lines = callback_lines(apis[0], images, tasks)
    files = [write_requests(work / f"ack-{phase}-{n}.tsv", lines[n :: len(apis)]) for n in range(len(apis))]
    # 64 connections in all, split over the API processes (bench.wrk opens CONCURRENCY each).
    bench.CONCURRENCY = 64 // len(apis)
    try:
        with ThreadPoolExecutor(len(apis)) as pool:
            results = list(
                pool.map(
                    lambda pair: wrk(pair[0].url, pair[1], args.seconds, loop=False, threads=2 // len(apis)),
                    zip(apis, files, strict=True),
                )
            )
    finally:
        bench.CONCURRENCY = 64
    rps = sum(r.rps for r in results)
    say(f"{name}: {rps:,.0f} callbacks/s; downloads drain")
    database.wait_drained(args.drain)
    statuses = database.phase_statuses(phase)
    return {
        "rps": rps,
        "p50": max(r.p50_ms for r in results),
        "p99": max(r.p99_ms for r in results),
        "ended": sum(n for status, n in statuses.items() if status != "submitted"),
        "errors": sum(r.errors for r in results),
        "succeeded": statuses.get("succeeded", 0),
        "short": any(r.requests >= len(lines) // len(apis) for r in results),
    }


def measure(
    work: Path, name: str, database: Database, layout: str, image: bytes, args: argparse.Namespace, phase: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One layout, one set of processes: the callback burst, then end to end once it has drained."""
    images = Images(image)
    sink = Sink()
    try:
        with replicas(database, images.env, layout) as running:
            acked = ack(work, name, database, running, images, args, phase)
            say(f"{name}: end to end, {args.tasks} tasks")
            started = time.perf_counter()
            asyncio.run(end_to_end(running[0][1], images, sink, args.tasks))
            took = time.perf_counter() - started
        files, fetched, _ = images.fetches()
        return acked, {"tasks_s": args.tasks / took, "notified": sink.count, "twice": fetched - files}
    finally:
        images.stop()
        sink.served.stop()
        shutil.rmtree(database.data, ignore_errors=True)  # thousands of images: gone before the next layout


def takeover(work: Path, cluster: Cluster, image: bytes, args: argparse.Namespace) -> dict[str, Any]:
    """kill -9 a worker mid-download; the time until the other worker has stored what it held."""
    database = Database(work / "takeover", cluster)
    phase = 0x70
    tasks = phase_tasks(phase, args.takeover)
    database.seed(tasks)
    images = Images(image)
    env = {**images.env, "RECEIVER_JOB_LEASE": str(args.lease)}
    try:
        with ExitStack() as stack:
            api = Receiver(database.data, {**env, **database.env}, ("--role", "api"))
            stack.enter_context(api.serve())
            workers = []
            for _ in range(2):
                worker = Receiver(
                    database.data,
                    {**env, **database.env, "RECEIVER_PUBLIC_URL": api.url},
                    ("--role", "worker"),
                )
                workers.append(stack.enter_context(worker.serve()))
            lines = callback_lines(api, images, tasks)
            hosted = {name: file for fake in (images.kie, images.fal) for name, file in fake.files.items()}
            for file in hosted.values():
                file.chunk_delay = 1.0  # ~8 s a download: both workers are mid-download for a while
            with httpx.Client(base_url=api.url, timeout=30) as client:
                for _, path, headers, body in lines:
                    client.post(path, headers=headers, content=body).raise_for_status()
            victim = workers[0].pid  # worker A

            def held() -> list[str]:
                """The download jobs worker A has claimed, whose image it has started fetching."""
                rows = database.rows(
                    "SELECT task_id FROM jobs WHERE kind = 'download' AND running = 1 AND owner LIKE ?",
                    f"%:{victim}:%",
                )
                return [task_id for (task_id,) in rows if hosted[f"{task_id}.png"].fetches]

            deadline = time.monotonic() + 60
            while not (mine := held()):
                if time.monotonic() > deadline:
                    raise RuntimeError("worker A never started a download")
                time.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            while Path(f"/proc/{victim}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                if time.monotonic() > killed + 30:
                    raise RuntimeError("worker A outlived kill -9")
                time.sleep(0.01)
            mine = held()  # as the database has it once A is gone: its leases still hold
            for file in hosted.values():
                file.chunk_delay = 0.0
            say(f"takeover: worker A killed holding {len(mine)} downloads; lease {args.lease:g} s")
            deadline = killed + args.drain
            while True:
                open_ids = database.rows(
                    "SELECT id FROM tasks WHERE completed_at IS NULL AND id >= ? AND id < ?",
                    f"tsk_{phase:02x}",
                    f"tsk_{phase + 1:02x}",
                )
                left = len({task_id for (task_id,) in open_ids} & set(mine))
                if left == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"takeover: {left} of worker A's downloads never ended")
                time.sleep(0.05)
            took = time.monotonic() - killed
            database.wait_drained(args.drain)
        statuses = database.phase_statuses(phase)
        shutil.rmtree(database.data, ignore_errors=True)
        files, fetched, _ = images.fetches()
        return {
            "held": len(mine),
            "seconds": took,
            "twice": fetched - files,
            "succeeded": statuses.get("succeeded", 0),
            "tasks": len(tasks),
        }
    finally:
        images.stop()


def rows(acks: dict[str, dict[str, Any]], ends: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    columns = list(acks)

    def row(name: str, cell: Callable[[str], str]) -> tuple[str, ...]:
        return (name, *(cell(c) for c in columns))

    return [
        row("callback ack, 64 connections, req/s", lambda c: f"{acks[c]['rps']:,.0f}"),
        row("callback ack p50 / p99, ms", lambda c: f"{acks[c]['p50']:.1f} / {acks[c]['p99']:.1f}"),
        row(
            "called back: succeeded / ended (non-2xx)",
            lambda c: f"{acks[c]['succeeded']:,} / {acks[c]['ended']:,} ({acks[c]['errors']})",
        ),
        row("end to end, tasks/s", lambda c: f"{ends[c]['tasks_s']:.0f} ({ends[c]['notified']:,} notified)"),
        row("images fetched twice", lambda c: str(ends[c]["twice"])),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["postgres"], default="postgres", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=4, help="seconds per callback burst; default 4")
    parser.add_argument(
        "--burst", type=int, default=8000, help="distinct callbacks prepared per burst; default 8000"
    )
    parser.add_argument("--tasks", type=int, default=300, help="end-to-end tasks per layout; default 300")
    parser.add_argument("--takeover", type=int, default=16, help="tasks in the takeover; default 16")
    parser.add_argument(
        "--lease", type=float, default=2, help="RECEIVER_JOB_LEASE in the takeover; default 2"
    )
    parser.add_argument(
        "--drain", type=float, default=300, help="most seconds any wait may take; default 300"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers it started are stopped
    if shutil.which("wrk") is None:
        print("scripts/bench needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    bin_dir = pg_bin()
    if bin_dir is None:
        print(HOW_TO_GET, file=sys.stderr)
        return 2
    began = time.monotonic()
    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; load generators on the same cores"
    )
    image = image_bytes()
    cluster = Cluster(bin_dir).start()
    try:
        with tempfile.TemporaryDirectory(prefix="receiver-bench-scale-") as tmp:
            work = Path(tmp)
            columns = [(backend, layout) for backend in ("sqlite", "postgres") for layout in LAYOUTS]
            acks: dict[str, dict[str, Any]] = {}
            ends: dict[str, dict[str, Any]] = {}
            for n, (backend, layout) in enumerate(columns):
                name = f"{'SQLite' if backend == 'sqlite' else 'PostgreSQL'}, {layout}"
                database = Database(work / f"layout-{n}", cluster if backend == "postgres" else None)
                acks[name], ends[name] = measure(work, name, database, layout, image, args, n)
            moved = takeover(work, cluster, image, args)
    finally:
        cluster.stop()
    print(
        "callbacks: distinct tasks, half kie (HMAC) and half fal (Ed25519), each a"
        f" {len(image):,}-byte image downloaded; 2 replicas = `--role api` x2 + one `--role worker`"
    )
    print_table(("measure", *acks), rows(acks, ends))
    if any(a["short"] for a in acks.values()):
        print(f"warning: --burst {args.burst} ran out during a burst: raise it", file=sys.stderr)
    print(
        f"takeover (PostgreSQL, RECEIVER_JOB_LEASE={args.lease:g}): worker A killed (kill -9) while"
        f" holding {moved['held']} downloads; worker B had stored all of them {moved['seconds']:.1f} s later;"
        f" {moved['succeeded']}/{moved['tasks']} tasks succeeded; images fetched twice: {moved['twice']}"
    )
    print(f"(took {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
