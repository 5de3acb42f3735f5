"""SQLite and PostgreSQL back to back, beside the bare app: `scripts/bench --backend both`.

The realistic scenario of scripts/bench.py (distinct tasks, half kie with HMAC and half fal with
Ed25519, every callback a real ~0.5 MB download from the fakes, the `fast` stack), run with the same
configuration on SQLite + directory and on PostgreSQL + directory (a throwaway local cluster,
tests/pg.py), each beside a bare Starlette app that reads the body and answers 200:

1. callback capacity: wrk, 64 connections, `--seconds` per burst, median of `--rounds`; the server's
   CPU (its process tree) per callback; then the downloads drain;
2. ack latency at a fixed 100/s and 300/s (`--rate-seconds` each), p99;
3. a burst of `--drain` callbacks for tasks with a notify_url, sent at once over 64 connections:
   the time until every image is stored and every notification has arrived;
4. end to end at a fixed 100 tasks/s (`--tasks`): created through the API, submitted to the fakes,
   called back, downloaded, notified; the receiver's CPU per task (download child included) and
   PostgreSQL's (the cluster's process tree) beside it;
5. correctness: every task called back succeeded, every image fetched once, every notification came.

`--checkout DIR` runs another tree's receiver (its `receiver` package first on PYTHONPATH) with this
same script, so two versions compare in one session. `--quick` is a smaller run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import BARE_APP  # noqa: E402
from bench import STACKS  # noqa: E402
from bench import Images  # noqa: E402
from bench import Receiver  # noqa: E402
from bench import Sink  # noqa: E402
from bench import callback_lines  # noqa: E402
from bench import correctness  # noqa: E402
from bench import cpu_seconds  # noqa: E402
from bench import end_to_end  # noqa: E402
from bench import fixed_rate  # noqa: E402
from bench import free_port  # noqa: E402
from bench import image_bytes  # noqa: E402
from bench import median  # noqa: E402
from bench import phase_tasks  # noqa: E402
from bench import print_table  # noqa: E402
from bench import process  # noqa: E402
from bench import say  # noqa: E402
from bench import write_requests  # noqa: E402
from bench import wrk  # noqa: E402
from bench_scale import Database  # noqa: E402

from tests.pg import HOW_TO_GET  # noqa: E402
from tests.pg import Cluster  # noqa: E402
from tests.pg import pg_bin  # noqa: E402

RATES = (100, 300)
SEED = (
    "INSERT INTO tasks (id, tenant, provider, model, prompt, request, status, provider_task_id,"
    " created_at, updated_at, submitted_at, notify_url) VALUES ($1, 'bench', $2, 'flux-kontext-pro', 'bench',"
    ' \'{"images":[],"params":{},"options":{}}\', \'submitted\', $3, $4, $4, $4, $5)'
)


class Backend(Database):
    """One fresh database (bench_scale's), left for the receiver to migrate as it starts (so that
    `--checkout` runs its own schema); seeding with a notify_url, reads, the database server's CPU."""

    def __init__(self, name: str, data: Path, cluster: Cluster | None) -> None:
        self.name = name
        self.cluster = cluster
        super().__init__(data, cluster)

    async def _migrate(self) -> None:
        return  # the receiver migrates its database when it starts

    def seed(self, rows: list[tuple[str, str, str]], notify: str | None = None) -> None:
        values = [(*row, time.time(), notify) for row in rows]
        if self.url is None:
            conn = sqlite3.connect(self.data / "receiver.db", timeout=30)
            try:
                with conn:
                    conn.executemany(SEED.replace("$", "?"), values)  # ?1 … ?5: SQLite numbers them too
            finally:
                conn.close()
            return
        self.query(lambda conn: conn.executemany(SEED, values))

    def drained(self) -> bool:
        """Every kept callback applied and every download and notification it started ended."""
        sql = (
            "SELECT (SELECT COUNT(*) FROM inbox)"
            " + (SELECT COUNT(*) FROM jobs WHERE kind IN ('download', 'notify'))"
        )
        return int(self.rows(sql)[0][0]) == 0

    def wait_drained(self, seconds: float = 600) -> None:
        deadline = time.monotonic() + seconds
        while not self.drained():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: callbacks or downloads still pending after {seconds:g} s")
            time.sleep(0.2)

    def statuses(self) -> dict[str, int]:
        """The statuses of the tasks that got a callback, with their counts."""
        rows = self.rows(
            "SELECT status, COUNT(*) FROM tasks t WHERE EXISTS (SELECT 1 FROM events e"
            " WHERE e.task_id = t.id AND e.kind = 'callback') GROUP BY status"
        )
        return {str(status): int(n) for status, n in rows}

    def cpu(self) -> float:
        """CPU seconds of the database server's processes (PostgreSQL), 0 for SQLite (in the receiver):
        the live ones, and the ones that have exited (a closed connection's backend), which the
        postmaster has reaped into its children's times: without them a run where connections close
        measured less than nothing."""
        if self.cluster is None:
            return 0.0
        pid = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        return cpu_seconds([pid]) + reaped


def run_backend(
    backend: Backend, work: Path, args: argparse.Namespace, image: bytes, bare: tuple[str, int]
) -> dict[str, Any]:
    http, loop = STACKS[args.stack]
    bare_url, bare_pid = bare
    images = Images(image)
    sink = Sink()
    env = {**images.env, **backend.env}
    if args.checkout:  # its package first; PYTHONSAFEPATH: `python -m` must not put this tree's first
        env |= {"PYTHONPATH": str(Path(args.checkout).resolve()), "PYTHONSAFEPATH": "1"}
    profile = (
        ("-m", "cProfile", "-o", str(Path(args.profile) / f"{backend.name.split()[0]}.prof"))
        if args.profile
        else ()
    )
    receiver = Receiver(backend.data, env, ("--http", http, "--loop", loop), profile)
    workers = args.pg_workers if backend.cluster is not None else 0
    out: dict[str, Any] = {"rps": [], "bare_rps": [], "cpu": [], "bare_cpu": [], "rates": {}, "errors": 0}
    name = backend.name
    try:
        with serving(receiver, workers) as pids:
            bursts = [phase_tasks(r, args.burst) for r in range(args.rounds)]
            rated = {
                rate: phase_tasks(0x40 + i, int(rate * args.rate_seconds)) for i, rate in enumerate(RATES)
            }
            drain = phase_tasks(0x60, args.drain)
            if args.profile:  # the end-to-end phase alone, its receiver under cProfile
                bursts, rated, drain = [], {}, []
            backend.seed([t for tasks in [*bursts, *rated.values()] for t in tasks])
            backend.seed(drain, sink.url)
            for r, tasks in enumerate(bursts):
                requests = write_requests(
                    work / f"burst-{name}-{r}.tsv", callback_lines(receiver, images, tasks)
                )
                before = cpu_seconds([bare_pid])
                theirs = wrk(bare_url, requests, args.seconds, loop=True)
                out["bare_cpu"].append((cpu_seconds([bare_pid]) - before) / theirs.requests)
                out["bare_rps"].append(theirs.rps)
                before = cpu_seconds(pids)
                ours = wrk(receiver.url, requests, args.seconds, loop=False)
                out["cpu"].append((cpu_seconds(pids) - before) / ours.requests)
                out["rps"].append(ours.rps)
                out["errors"] += ours.errors
                say(f"{name}: burst {r}: {ours.rps:.0f}/s (bare {theirs.rps:.0f}/s); downloads drain")
                backend.wait_drained()
            for rate, tasks in rated.items():
                requests = write_requests(
                    work / f"rate-{name}-{rate}.tsv", callback_lines(receiver, images, tasks)
                )
                ours_rate, bare_rate = (
                    fixed_rate(receiver.url, requests, rate),
                    fixed_rate(bare_url, requests, rate),
                )
                out["rates"][rate] = (ours_rate, bare_rate)
                out["errors"] += ours_rate.errors
                say(f"{name}: {rate}/s: p99 {ours_rate.p99_ms:.1f} ms (bare {bare_rate.p99_ms:.1f} ms)")
                backend.wait_drained()
            if args.profile:
                run_e2e(receiver, images, sink, backend, pids, args, out)
                return out
            requests = write_requests(work / f"drain-{name}.tsv", callback_lines(receiver, images, drain))
            started, notified = time.perf_counter(), sink.count
            acked = fixed_rate(receiver.url, requests, 1_000_000)  # all at once, over 64 connections
            out["errors"] += acked.errors
            while sink.count < notified + args.drain or not backend.drained():
                if time.perf_counter() - started > 900:
                    raise RuntimeError(f"{name}: the burst did not drain in 900 s")
                time.sleep(0.05)
            out["drain_s"] = time.perf_counter() - started
            out["drain_ack_s"] = acked.requests / acked.sustained
            say(f"{name}: answered in {out['drain_ack_s']:.1f} s, drained in {out['drain_s']:.1f} s")
            run_e2e(receiver, images, sink, backend, pids, args, out)
        out["statuses"] = backend.statuses()
        out["fetches"] = images.fetches()
        out["notified"] = sink.count
    finally:
        images.stop()
        sink.served.stop()
    return out


@contextmanager
def serving(receiver: Receiver, workers: int) -> Iterator[list[int]]:
    """The receiver's process ids: one `serve`, or with `workers` an `--role api` beside that many
    `--role worker` processes (PostgreSQL: they share the jobs by their leases)."""
    if not workers:
        with receiver.processes(False) as pids:
            yield pids
        return
    with ExitStack() as stack:
        pids = [stack.enter_context(receiver.serve("--role", "api")).pid]
        for _ in range(workers):
            worker = Receiver(receiver.data_dir, receiver.env, receiver.serve_args)  # not profiled
            pids.append(stack.enter_context(worker.serve("--role", "worker")).pid)
        yield pids


def run_e2e(
    receiver: Receiver,
    images: Images,
    sink: Sink,
    backend: Backend,
    pids: list[int],
    args: argparse.Namespace,
    out: dict[str, Any],
) -> None:
    """Tasks created at `--task-rate` through the API until every one is notified: CPU per task of the
    receiver's process tree and of the database server."""
    before, db_before = cpu_seconds(pids), backend.cpu()
    started = time.perf_counter()
    asyncio.run(end_to_end(receiver, images, sink, args.tasks, rate=args.task_rate))
    out["e2e_rate"] = args.tasks / (time.perf_counter() - started)
    out["e2e_cpu"] = (cpu_seconds(pids) - before) / args.tasks
    out["e2e_db_cpu"] = (backend.cpu() - db_before) / args.tasks
    say(f"{backend.name}: end to end: {out['e2e_cpu'] * 1000:.2f} ms receiver CPU per task")
    backend.wait_drained()


def rows(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[tuple[str, ...]]:
    names = list(results)
    first = results[names[0]]

    def row(label: str, cell: Any, bare: str = "") -> tuple[str, ...]:
        return (label, *(cell(results[n]) for n in names), bare)

    def capacity(r: dict[str, Any]) -> str:
        ours = median(r["rps"])
        text = f"{ours:,.0f}/s = {ours / median(r['bare_rps']):.2f}x bare"
        if r is not first:
            text += f" ({ours / median(first['rps']):.2f}x {names[0]})"
        return text

    bare_rps = median([x for r in results.values() for x in r["bare_rps"]])
    bare_cpu = median([x for r in results.values() for x in r["bare_cpu"]])

    def bare_p99(rate: int) -> float:
        return median([r["rates"][rate][1].p99_ms for r in results.values()])

    def p99(r: dict[str, Any]) -> str:
        text = " / ".join(f"{r['rates'][rate][0].p99_ms:.1f}" for rate in RATES) + " ms"
        short = [
            f"{rate}/s: {r['rates'][rate][0].sustained:.0f}/s"
            for rate in RATES
            if r["rates"][rate][0].sustained < rate * 0.97
        ]
        return text + (f" (only {', '.join(short)})" if short else "")

    return [
        row(f"callback capacity, 64 connections (median of {args.rounds})", capacity, f"{bare_rps:,.0f}/s"),
        row(
            "server CPU per callback at capacity",
            lambda r: f"{median(r['cpu']) * 1000:.2f} ms",
            f"{bare_cpu * 1000:.2f} ms",
        ),
        row(
            "ack p99 at a fixed 100/s / 300/s",
            p99,
            " / ".join(f"{bare_p99(rate):.1f}" for rate in RATES) + " ms",
        ),
        row(
            f"a {args.drain:,}-callback burst, drained after (all downloaded, notified)",
            lambda r: f"{r['drain_s']:.1f} s (answered in {r['drain_ack_s']:.1f} s)",
        ),
        row(
            f"receiver CPU per task at {args.task_rate:g}/s (create → notified, download child included)",
            lambda r: (
                f"{r['e2e_cpu'] * 1000:.2f} ms"
                + (f" (+ PostgreSQL's {r['e2e_db_cpu'] * 1000:.2f} ms)" if r["e2e_db_cpu"] else "")
            ),
        ),
        row("correctness", correctness),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["both"], default="both", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a smaller run (about a third of the time)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="capacity bursts per backend (median); default 2"
    )
    parser.add_argument("--seconds", type=float, default=None, help="seconds per capacity burst; default 4")
    parser.add_argument("--rate-seconds", type=float, default=None, help="seconds per fixed rate; default 4")
    parser.add_argument(
        "--drain", type=int, default=None, help="callbacks in the drained burst; default 3000"
    )
    parser.add_argument("--tasks", type=int, default=None, help="end-to-end tasks; default 1000")
    parser.add_argument(
        "--task-rate", type=float, default=100, help="end-to-end tasks per second; default 100"
    )
    parser.add_argument("--burst", type=int, default=20000, help="seeded tasks per capacity burst")
    parser.add_argument(
        "--profile",
        help="only the end-to-end phase, the receiver under cProfile: DIR/SQLite.prof, DIR/PostgreSQL.prof",
    )
    parser.add_argument(
        "--pg-workers",
        type=int,
        default=0,
        help="PostgreSQL as one --role api process beside this many --role worker ones (default: one serve)",
    )
    parser.add_argument("--checkout", help="another tree whose receiver to run (e.g. an older commit's)")
    parser.add_argument(
        "--stack",
        choices=sorted(STACKS),
        default="fast",
        help="uvicorn's HTTP parser and loop: fast (httptools, uvloop: pip install '.[fast]') or default",
    )
    args = parser.parse_args()
    quick = args.quick
    args.seconds = args.seconds or (2 if quick else 4)
    args.rate_seconds = args.rate_seconds or (2 if quick else 4)
    args.drain = args.drain or (600 if quick else 3000)
    args.tasks = args.tasks or (200 if quick else 1000)
    if quick:
        args.burst = min(args.burst, 8000)
    bin_dir = pg_bin()
    if bin_dir is None:
        print(HOW_TO_GET, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what was started, cluster included
    image = image_bytes()
    results: dict[str, dict[str, Any]] = {}
    cluster = Cluster(bin_dir).start()
    try:
        with tempfile.TemporaryDirectory(prefix="receiver-bench-") as tmp:
            work = Path(tmp)
            bare_port = free_port()
            http, loop = STACKS[args.stack]
            bare_url = f"http://127.0.0.1:{bare_port}"
            with process(
                [sys.executable, "-c", BARE_APP, str(bare_port), http, loop], url=f"{bare_url}/"
            ) as bare:
                pg = "PostgreSQL + directory" + (
                    f" (api + {args.pg_workers} workers)" if args.pg_workers else ""
                )
                for name, used in (("SQLite + directory", None), (pg, cluster)):
                    backend = Backend(name, work / f"data-{len(results)}", used)
                    results[name] = run_backend(backend, work, args, image, (bare_url, bare.pid))
    finally:
        cluster.stop()
    if args.profile:
        for name, r in results.items():
            print(f"{name}: {r['e2e_cpu'] * 1000:.2f} ms receiver CPU per task (under cProfile)")
        return 0
    print_table(("measure", *results, "bare"), rows(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
