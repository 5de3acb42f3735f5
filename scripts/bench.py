"""Benchmarks that compare: every figure beside a reference measured in the same run.

Run as `scripts/bench` (after `scripts/test` made the venv). Needs wrk (`apt-get install wrk`) and curl.
Everything runs on 127.0.0.1: the receiver as a process, a bare Starlette app, a static file server and
a provider fake. Rounds alternate A/B and each figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.sandbox_service import encode_png  # noqa: E402
from receiver.store.sqlite import migrate  # noqa: E402
from receiver.tokens import Tokens  # noqa: E402
from tests.fakes.fal import FalFake  # noqa: E402
from tests.fakes.kie import HMAC_KEY  # noqa: E402
from tests.fakes.kie import KieFake  # noqa: E402
from tests.fakes.kie import kie_signature  # noqa: E402
from tests.harness import Served  # noqa: E402

LUA = ROOT / "scripts" / "bench_requests.lua"
SECRET = "bench-secret-" + "x" * 40
API_KEY = "bench-key-0123456789abcdef"
CONCURRENCY = 64
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)

# The reference: a Starlette app that reads the body and answers 200, on the same uvicorn stack.
BARE_APP = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
async def ok(request):
    await request.body()
    return PlainTextResponse("ok")
bare = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST"])])
uvicorn.run(bare, host="127.0.0.1", port=int(sys.argv[1]), http=sys.argv[2], loop=sys.argv[3],
            log_level="warning", access_log=False)
"""
STACKS = {"default": ("h11", "asyncio"), "fast": ("httptools", "uvloop")}
RATES = (100, 300, 1000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def wait_http(url: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None, url: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.NamedTemporaryFile(prefix="receiver-bench-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log)
    try:
        if url:
            wait_http(url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-5:]
        if tail and proc.returncode not in (0, -15):
            print(f"{args[-3:]} exited {proc.returncode}: " + " | ".join(tail), file=sys.stderr)
        Path(log.name).unlink()


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def wrk(url: str, requests_file: Path, seconds: float, loop: bool, threads: int = 2) -> WrkResult:
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{CONCURRENCY}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            url,
            "--",
            str(requests_file),
            str(threads),
            "1" if loop else "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def latency(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert match, out
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(rps, latency("50"), latency("99"), total, int(errors.group(1)) if errors else 0)


def write_requests(path: Path, lines: list[tuple[str, str, dict[str, str], str]]) -> Path:
    with path.open("w") as handle:
        for method, target, headers, body in lines:
            handle.write(
                f"{method}\t{target}\t{chr(1).join(f'{k}: {v}' for k, v in headers.items())}\t{body}\n"
            )
    return path


def seed_tasks(db: Path, rows: list[tuple[str, str, str]]) -> None:
    """Insert submitted tasks (id, provider, provider task id) straight into a fresh database."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrate(conn)
    now = time.time()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO tasks (id, tenant, provider, model, prompt, request, status, provider_task_id,"
        " created_at, updated_at, submitted_at) VALUES (?, 'bench', ?, 'flux-kontext-pro', 'bench',"
        ' \'{"images":[],"params":{},"options":{}}\', \'submitted\', ?, ?, ?, ?)',
        [(task_id, provider, provider_id, now, now, now) for task_id, provider, provider_id in rows],
    )
    conn.execute("COMMIT")
    conn.close()


class Static:
    """A static file server (python -m http.server) for result images and the fal JWKS."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    @contextmanager
    def serve(self) -> Iterator[None]:
        with process(
            [
                sys.executable,
                "-m",
                "http.server",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(self.directory),
            ],
            url=f"{self.url}/",
        ):
            yield


class Receiver:
    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str],
        serve_args: tuple[str, ...] = (),
        python_args: tuple[str, ...] = (),
    ) -> None:
        self.serve_args = serve_args
        self.python_args = python_args  # before `-m receiver`, e.g. `-m cProfile -o FILE`
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.env = {
            "RECEIVER_DATA_DIR": str(data_dir),
            "RECEIVER_PUBLIC_URL": self.url,
            "RECEIVER_SECRET_KEY": SECRET,
            "RECEIVER_API_KEYS": f"bench:{API_KEY}",
            "RECEIVER_ALLOW_PRIVATE_URLS": "1",
            "RECEIVER_RECONCILE_AFTER": "3600",
            "RECEIVER_LOG_LEVEL": "WARNING",
            **env,
        }
        self.tokens = Tokens(SECRET, self.url, 3600)

    @contextmanager
    def serve(self, *role: str) -> Iterator[subprocess.Popen[bytes]]:
        with process(
            [
                sys.executable,
                *self.python_args,
                "-m",
                "receiver",
                "serve",
                *self.serve_args,
                "--port",
                str(self.port),
                *role,
            ],
            self.env,
            f"{self.url}/healthz",
        ) as proc:
            yield proc

    @contextmanager
    def processes(self, split: bool) -> Iterator[list[int]]:
        """The receiver's process ids: one `serve`, or with `split` an `--role api` and a `--role worker`."""
        if not split:
            with self.serve() as proc:
                yield [proc.pid]
            return
        worker = Receiver(self.data_dir, self.env, self.serve_args)
        with self.serve("--role", "api") as api, worker.serve("--role", "worker") as work:
            yield [api.pid, work.pid]


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- the realistic scenario: distinct tasks, every callback a real download ------------------------


def image_bytes(side: int = 420) -> bytes:
    """A PNG of random pixels, so it does not compress: side 420 is about 0.5 MB."""
    raw = b"".join(b"\x00" + os.urandom(side * 3) for _ in range(side))
    return encode_png(side, side, raw)


def proc_tree(pid: int) -> list[int]:
    pids = [pid]
    for each in pids:
        for task in Path(f"/proc/{each}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes and their live descendants."""
    total = 0
    for each in [p for pid in pids for p in proc_tree(pid)]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pids: list[int]) -> float:
    return sum(rss_kib(each, "VmHWM") for pid in pids for each in proc_tree(pid)) / 1024


class Images:
    """The provider fakes of tests/fakes (kie with its HMAC, fal with Ed25519 and its JWKS), serving
    one distinct ~0.5 MB image per task and counting every fetch."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.kie = KieFake().start()
        self.fal = FalFake().start()
        self.env = {
            **self.kie.receiver_env(),
            **self.fal.receiver_env(),
            # No limits here, the bench measures the receiver's own work: kie's documented 20 per 10 s is
            # lifted, as a deployment with a larger quota would. kie and fal cap no concurrency by
            # default, and a cap set (even 1,000,000) makes every worker turn count the tasks in flight,
            # work a default deployment does not do.
            "KIE_MAX_PER_MINUTE": "1000000",
        }

    def host(self, provider: str, task_id: str) -> str:
        fake = self.kie if provider == "kie" else self.fal
        return fake.host(f"{task_id}.png", self.image)

    def callback(self, provider: str, provider_id: str, url: str) -> tuple[dict[str, str], bytes]:
        """The headers and body the provider sends when `provider_id` finished with the image at `url`."""
        if provider == "kie":
            body = json.dumps(self.kie.success_body(provider_id, url)).encode()
            return {"Content-Type": "application/json", **kie_signature(HMAC_KEY, provider_id)}, body
        body = FalFake.envelope(provider_id, "OK", FalFake.output([url]))
        return {"Content-Type": "application/json", **self.fal.signed(provider_id, body)}, body

    def fetches(self) -> tuple[int, int, int]:
        """Files fetched at least once, fetches in all, most fetches of one file."""
        counts = [f.fetches for fake in (self.kie, self.fal) for f in fake.files.values() if f.fetches]
        return len(counts), sum(counts), max(counts, default=0)

    def stop(self) -> None:
        self.kie.stop()
        self.fal.stop()


def phase_tasks(phase: int, count: int) -> list[tuple[str, str, str]]:
    """`count` distinct tasks, half kie and half fal; the id's first byte names the phase."""
    return [(f"tsk_{phase:02x}{n:022x}", "kie" if n % 2 else "fal", f"p{phase}-{n}") for n in range(count)]


def callback_lines(
    receiver: Receiver, images: Images, tasks: list[tuple[str, str, str]]
) -> list[tuple[str, str, dict[str, str], str]]:
    lines = []
    prefix = len(receiver.url)
    for task_id, provider, provider_id in tasks:
        headers, body = images.callback(provider, provider_id, images.host(provider, task_id))
        path = receiver.tokens.callback_url(provider, task_id)[prefix:]
        lines.append(("POST", path, headers, body.decode()))
    return lines


def wait_phase_done(db: Path, phase: int, answered: int, seconds: float = 600) -> None:
    """Bounded polling until `answered` tasks of the phase have ended (their downloads stored)."""
    conn = sqlite3.connect(db)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ended = conn.execute(
                "SELECT COUNT(*) FROM tasks WHERE id >= ? AND id < ? AND completed_at IS NOT NULL",
                (f"tsk_{phase:02x}", f"tsk_{phase + 1:02x}"),
            ).fetchone()[0]
            if ended >= answered:
                return
            time.sleep(0.2)
    finally:
        conn.close()
    raise RuntimeError(f"phase {phase}: only {ended} of {answered} acknowledged tasks ended")


@dataclass
class RateResult:
    sustained: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def fixed_rate(url: str, requests_file: Path, rate: float) -> RateResult:
    """An open-loop load at a fixed rate, from a process of its own (see rate_client)."""
    port = urlsplit(url).port
    out = subprocess.run(
        [sys.executable, __file__, "--rate-client", str(requests_file), str(rate), str(port)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return RateResult(**json.loads(out))


async def rate_client(lines: list[str], rate: float, port: int) -> dict[str, Any]:
    """Send each request at its scheduled time (start + i/rate) over 64 keep-alive connections; a
    request's latency counts from its scheduled time, so a server that falls behind is not hidden."""
    raws = []
    for line in lines:
        method, target, headers, body = line.split("\t", 3)
        head = "".join(f"{pair}\r\n" for pair in headers.split(chr(1)) if pair)
        data = body.encode()
        raws.append(
            f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(data)}\r\n"
            f"{head}\r\n".encode()
            + data
        )
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(CONCURRENCY):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    latencies: list[float] = []
    errors = 0
    last = start

    async def one(index: int, raw: bytes) -> None:
        nonlocal errors, last
        scheduled = start + index / rate
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        reader, writer = await idle.get()
        writer.write(raw)
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        done = loop.time()
        latencies.append(done - scheduled)
        last = max(last, done)
        errors += status >= 300
        idle.put_nowait((reader, writer))

    await asyncio.gather(*(one(i, raw) for i, raw in enumerate(raws)))
    latencies.sort()
    return {
        "sustained": len(raws) / (last - start),
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "requests": len(raws),
        "errors": errors,
    }


class Sink:
    """The app's notification endpoint: counts the signed POSTs it gets."""

    def __init__(self) -> None:
        self.count = 0

        async def hook(request: Request) -> Response:
            await request.body()
            self.count += 1
            return Response(b"", status_code=204)

        self.served = Served(Starlette(routes=[Route("/hook", hook, methods=["POST"])])).start()
        self.url = f"{self.served.url}/hook"


async def end_to_end(
    receiver: Receiver,
    images: Images,
    sink: Sink,
    count: int,
    mark: Callable[[str], None] = lambda _: None,
    rate: float | None = None,
) -> None:
    """Create `count` tasks (half kie, half fal) with a notify_url, let the receiver submit them to
    the fakes, then deliver each provider's signed callback; returns once every notification came.
    `mark` is called at the end of each stage (created, submitted, called back, notified). With
    `rate`, creates and then callbacks go at that many per second, else as fast as 16 at a time."""
    limit = asyncio.Semaphore(16)
    loop = asyncio.get_running_loop()
    first = loop.time()

    async def on_time(n: int) -> None:
        if rate:
            await asyncio.sleep(max(0.0, first + n / rate - loop.time()))

    async with httpx.AsyncClient(
        base_url=receiver.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as client:

        async def create(n: int) -> None:
            await on_time(n)
            async with limit:
                answer = await client.post(
                    "/v1/tasks",
                    json={
                        "provider": "kie" if n % 2 else "fal",
                        "prompt": f"e2e {n}",
                        "notify_url": sink.url,
                    },
                )
                answer.raise_for_status()

        await asyncio.gather(*(create(n) for n in range(count)))
        mark("created")
        submitted = await poll(lambda: len(images.kie.callback_urls) + len(images.fal.queue) >= count)
        assert submitted, "the receiver did not submit every task"
        mark("submitted")
        targets = [("kie", pid, url) for pid, url in images.kie.callback_urls.items()]
        targets += [("fal", rid, queued.webhook) for rid, queued in images.fal.queue.items()]

        async def deliver(n: int, provider: str, provider_id: str, callback_url: str) -> None:
            await on_time(n)
            async with limit:
                headers, body = images.callback(
                    provider, provider_id, images.host(provider, f"e2e-{provider_id}")
                )
                answer = await client.post(callback_url, content=body, headers=headers)
                answer.raise_for_status()

        first = loop.time()
        await asyncio.gather(*(deliver(n, *target) for n, target in enumerate(targets)))
        mark("called back")
        assert await poll(lambda: sink.count >= count), "not every notification arrived"
        mark("notified")


async def poll(predicate: Callable[[], bool], seconds: float = 600) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def say(text: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_stack(work: Path, stack: str, args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    """Every row of the table for one HTTP stack: the receiver and the bare app, same uvicorn stack."""
    http, loop = STACKS[stack]
    data = work / f"data-{stack}"
    data.mkdir()
    bursts = [phase_tasks(r, args.burst) for r in range(args.rounds)]
    rate_phases = {rate: phase_tasks(0x40 + i, int(rate * args.rate_seconds)) for i, rate in enumerate(RATES)}
    seed_tasks(data / "receiver.db", [t for tasks in [*bursts, *rate_phases.values()] for t in tasks])
    images = Images(image)
    sink = Sink()
    receiver = Receiver(data, images.env, ("--http", http, "--loop", loop))
    bare_port = free_port()
    bare_url = f"http://127.0.0.1:{bare_port}"
    out: dict[str, Any] = {"bare_rps": [], "rps": [], "bare_cpu": [], "cpu": [], "rates": {}, "errors": 0}
    try:
        with (
            process(
                [sys.executable, "-c", BARE_APP, str(bare_port), http, loop], url=f"{bare_url}/"
            ) as bare_proc,
            receiver.processes(args.split) as pids,
        ):
            bare_pid = [bare_proc.pid]
            for r, tasks in enumerate(bursts):
                requests = write_requests(
                    work / f"burst-{stack}-{r}.tsv", callback_lines(receiver, images, tasks)
                )
                before = cpu_seconds(bare_pid)
                bare = wrk(bare_url, requests, args.seconds, loop=True)
                out["bare_cpu"].append((cpu_seconds(bare_pid) - before) / bare.requests)
                out["bare_rps"].append(bare.rps)
                before = cpu_seconds(pids)
                ours = wrk(receiver.url, requests, args.seconds, loop=False)
                if ours.requests >= len(tasks):
                    print(f"warning: --burst {len(tasks)} ran out during the burst", file=sys.stderr)
                out["cpu"].append((cpu_seconds(pids) - before) / ours.requests)
                out["rps"].append(ours.rps)
                out["errors"] += ours.errors
                say(f"{stack}: burst {r}: bare {bare.rps:.0f}/s, receiver {ours.rps:.0f}/s; downloads drain")
                wait_phase_done(data / "receiver.db", r, ours.requests - ours.errors)
            for i, (rate, tasks) in enumerate(rate_phases.items()):
                requests = write_requests(
                    work / f"rate-{stack}-{rate}.tsv", callback_lines(receiver, images, tasks)
                )
                bare_rate = fixed_rate(bare_url, requests, rate)
                ours_rate = fixed_rate(receiver.url, requests, rate)
                out["rates"][rate] = (ours_rate, bare_rate)
                say(f"{stack}: {rate}/s: p99 {ours_rate.p99_ms:.1f} ms (bare {bare_rate.p99_ms:.1f} ms)")
                out["errors"] += ours_rate.errors
                wait_phase_done(data / "receiver.db", 0x40 + i, len(tasks) - ours_rate.errors)
            out["peak_rss"] = peak_rss_mib(pids)
        statuses = Counter(called_back(data / "receiver.db"))
        e2e = end_to_end_phase(work, stack, args, images, sink)
        out["peak_rss"] = max(out["peak_rss"], e2e.pop("peak_rss"))
        statuses.update(e2e.pop("statuses"))
        out.update(e2e)
        out["statuses"] = dict(statuses)
        out["fetches"] = images.fetches()
        out["notified"] = sink.count
    finally:
        images.stop()
        sink.served.stop()
        shutil.rmtree(data, ignore_errors=True)
    return out


def end_to_end_phase(
    work: Path, stack: str, args: argparse.Namespace, images: Images, sink: Sink
) -> dict[str, Any]:
    """The end-to-end row: `args.tasks` tasks through a fresh receiver, its process tree's CPU summed
    over the whole phase (idle moments included), with the CPU of each stage on stderr."""
    http, loop = STACKS[stack]
    # A fresh data dir: the thousands of seeded tasks the bursts never called back would otherwise be
    # in flight, and counting them is work a steady deployment has less of.
    fresh = Receiver(work / f"data-{stack}-e2e", images.env, ("--http", http, "--loop", loop))
    out: dict[str, Any] = {}
    try:
        with fresh.processes(args.split) as pids:
            say(f"{stack}: end to end, {args.tasks} tasks (receiver pid {' '.join(map(str, pids))})")
            before = last = cpu_seconds(pids)
            started = time.perf_counter()
            stages = []

            def mark(stage: str) -> None:
                nonlocal last
                now = cpu_seconds(pids)
                stages.append(f"{stage} {(now - last) * 1000 / args.tasks:.2f}")
                last = now

            asyncio.run(end_to_end(fresh, images, sink, args.tasks, mark))
            out["e2e_s"] = time.perf_counter() - started
            out["e2e_cpu"] = (cpu_seconds(pids) - before) / args.tasks
            out["peak_rss"] = peak_rss_mib(pids)
            say(f"{stack}: end to end, ms of receiver CPU per task by stage: {', '.join(stages)}")
        out["statuses"] = called_back(fresh.data_dir / "receiver.db")
    finally:
        shutil.rmtree(fresh.data_dir, ignore_errors=True)
    return out


def run_e2e_only(work: Path, stack: str, args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    """Only the end-to-end phase (`--only e2e`): for profiling the per-task path without the bursts."""
    images = Images(image)
    sink = Sink()
    try:
        out = end_to_end_phase(work, stack, args, images, sink)
        out["statuses"] = dict(out["statuses"])
        out["fetches"] = images.fetches()
        out["notified"] = sink.count
        out["errors"] = 0  # end_to_end raises on any non-2xx
    finally:
        images.stop()
        sink.served.stop()
    return out


def called_back(db: Path) -> dict[str, int]:
    """The statuses of the tasks that got a callback, with their counts."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT status, COUNT(*) FROM tasks t WHERE EXISTS"
            " (SELECT 1 FROM events e WHERE e.task_id = t.id AND e.kind = 'callback') GROUP BY status"
        ).fetchall()
    finally:
        conn.close()
    return dict(rows)


# -- 2. lookup --------------------------------------------------------------------------------------


def bench_lookup(
    work: Path, rounds: int, seconds: float, sizes: tuple[int, ...]
) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    bare_port = free_port()
    with process([sys.executable, "-c", BARE_APP, str(bare_port)], url=f"http://127.0.0.1:{bare_port}/"):
        for size in sizes:
            data = work / f"lookup-{size}"
            data.mkdir()
            ids = [f"tsk_{secrets.token_hex(12)}" for _ in range(size)]
            seed_tasks(data / "receiver.db", [(task_id, "kie", f"p{n}") for n, task_id in enumerate(ids)])
            sample = [ids[i] for i in sorted(secrets.SystemRandom().sample(range(size), min(size, 20_000)))]
            secrets.SystemRandom().shuffle(sample)
            auth = {"Authorization": f"Bearer {API_KEY}"}
            requests = write_requests(
                work / f"lookup-{size}.tsv", [("GET", f"/v1/tasks/{t}", auth, "") for t in sample]
            )
            receiver = Receiver(data, {"KIE_API_KEY": "k"})
            bare: list[WrkResult] = []
            recv: list[WrkResult] = []
            with receiver.serve():
                for _ in range(rounds):
                    bare.append(wrk(f"http://127.0.0.1:{bare_port}", requests, seconds, loop=True))
                    recv.append(wrk(receiver.url, requests, seconds, loop=True))
            out[size] = {
                "bare_rps": median([r.rps for r in bare]),
                "rps": median([r.rps for r in recv]),
                "p99": median([r.p99_ms for r in recv]),
                "errors": sum(r.errors for r in recv),
            }
            shutil.rmtree(data)
    return out


# -- 3. download ------------------------------------------------------------------------------------


def bench_download(work: Path, rounds: int, megabytes: int) -> dict[str, float]:
    files = work / "big"
    files.mkdir()
    ihdr = struct.pack(">IIBBBBB", 4000, 3000, 8, 2, 0, 0, 0)
    head = (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    (files / "big.png").write_bytes(head + bytes(megabytes * 1024 * 1024 - len(head)))
    static = Static(files)
    data = work / "dl-data"
    data.mkdir()
    # The first download is untimed: it starts the download process (RECEIVER_DOWNLOAD_PROCESS).
    tasks = [(f"tsk_{n:024x}", "kie", f"dl-{n}") for n in range(rounds + 1)]
    seed_tasks(data / "receiver.db", tasks)
    receiver = Receiver(
        data, {"KIE_API_KEY": "k", "RECEIVER_MAX_IMAGE_BYTES": str((megabytes + 10) * 1024 * 1024)}
    )
    curl_rates, our_rates, growth, cpu = [], [], [], []
    size = megabytes * 1024 * 1024
    with static.serve(), receiver.serve() as proc:
        pid = proc.pid
        conn = sqlite3.connect(data / "receiver.db")

        def download(task_id: str, provider_id: str) -> float:
            """Seconds from the callback to the image's commit: the download job's own time."""
            body = {
                "code": 200,
                "msg": "ok",
                "data": {"taskId": provider_id, "info": {"resultImageUrl": f"{static.url}/big.png"}},
            }
            httpx.post(receiver.tokens.callback_url("kie", task_id), json=body)
            answer = httpx.get(
                f"{receiver.url}/v1/tasks/{task_id}",
                params={"wait": 60},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=70,
            ).json()
            assert answer["status"] == "succeeded", answer
            callback_at, stored_at = conn.execute(
                "SELECT (SELECT at FROM events WHERE task_id=? AND kind='callback'),"
                " (SELECT stored_at FROM images WHERE task_id=?)",
                (task_id, task_id),
            ).fetchone()
            return float(max(1e-6, stored_at - callback_at))

        download(tasks[0][0], tasks[0][2])
        for task_id, _, provider_id in tasks[1:]:
            started = time.perf_counter()
            subprocess.run(["curl", "-s", "-o", str(work / "curl.out"), f"{static.url}/big.png"], check=True)
            curl_rates.append(size / (time.perf_counter() - started))
            (work / "curl.out").unlink()
            pids = proc_tree(pid)  # the service and its download process
            for each in pids:
                Path(f"/proc/{each}/clear_refs").write_text("5")  # reset the peak-RSS mark
            before = {each: rss_kib(each) for each in pids}
            cpu_before = cpu_seconds([pid])
            our_rates.append(size / download(task_id, provider_id))
            growth.append(sum(rss_kib(each, "VmHWM") - before[each] for each in pids) / 1024)
            cpu.append(cpu_seconds([pid]) - cpu_before)  # the callback and the wait included (~1 ms)
        conn.close()
    return {
        "curl_mb_s": median(curl_rates) / 1e6,
        "ours_mb_s": median(our_rates) / 1e6,
        "rss_growth_mib": max(growth),
        "cpu_ms": median(cpu) * 1000,
    }


# -- the table -----------------------------------------------------------------------------------------


def correctness(r: dict[str, Any]) -> str:
    """The correctness cell: tasks called back that succeeded, images fetched once, notifications."""
    files, fetched, most = r["fetches"]
    ended = sum(r["statuses"].values())
    ok = r["statuses"].get("succeeded", 0)
    once = (
        "every image fetched once"
        if fetched == files == ok and most == 1
        else f"{fetched} fetches of {files} images"
    )
    return f"{ok:,}/{ended:,} succeeded, {once}, {r['notified']:,} notified, {r['errors']} non-2xx"


def stack_rows(results: dict[str, dict[str, Any]], e2e_only: bool = False) -> list[tuple[str, ...]]:
    """The issue's rows: one column per stack, each figure beside the bare app's from the same run."""
    stacks = list(results)

    def row(name: str, target: str, cell: Callable[[dict[str, Any]], str]) -> tuple[str, ...]:
        return (name, *(cell(results[s]) for s in stacks), target)

    def capacity(r: dict[str, Any]) -> str:
        ours, bare = median(r["rps"]), median(r["bare_rps"])
        return f"{ours:,.0f}/s = {ours / bare:.2f}x bare ({bare:,.0f}/s)"

    def at(rate: int) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            ours, bare = r["rates"][rate]
            text = f"{ours.p50_ms:.1f} / {ours.p99_ms:.1f} ms (bare {bare.p50_ms:.1f} / {bare.p99_ms:.1f})"
            if ours.sustained < rate * 0.97:
                text = f"only {ours.sustained:,.0f}/s sustained, " + text
            return text

        return cell

    rows = []
    if not e2e_only:
        rows += [
            row("callback capacity, 64 connections", ">= 0.5x default, >= 0.3x fast", capacity),
            row(
                "server CPU per callback during the burst",
                "",
                lambda r: f"{median(r['cpu']) * 1000:.2f} ms (bare {median(r['bare_cpu']) * 1000:.2f} ms)",
            ),
        ]
        for rate, target in zip(RATES, ("", "p99 <= 10 ms", "sustained, p99 <= 25 ms"), strict=True):
            rows.append(row(f"ack latency at a fixed {rate:,}/s, p50 / p99", target, at(rate)))
    rows += [
        row(
            "receiver CPU per task, end to end",
            "<= 2 ms",
            lambda r: (
                f"{r['e2e_cpu'] * 1000:.1f} ms"
                f" ({r['notified']:,} tasks at {r['notified'] / r['e2e_s']:.0f}/s)"
            ),
        ),
        row("everything correct afterwards", "all", correctness),
        row("peak RSS of the receiver", "", lambda r: f"{r['peak_rss']:.0f} MiB"),
    ]
    return rows


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--rate-client":
        loop_factory = asyncio.new_event_loop
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            result = runner.run(
                rate_client(Path(sys.argv[2]).read_text().splitlines(), float(sys.argv[3]), int(sys.argv[4]))
            )
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only",
        default="callback,download",
        help="parts: callback, download, lookup, e2e (only the end-to-end row of callback, per stack)",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="run the receiver as `serve --role api` + `serve --role worker` on one SQLite data dir",
    )
    parser.add_argument(
        "--stacks", default="default,fast", help="uvicorn stacks: default (h11, asyncio), fast"
    )
    parser.add_argument("--rounds", type=int, default=2, help="capacity bursts per stack (median); default 2")
    parser.add_argument(
        "--burst", type=int, default=15000, help="distinct callbacks prepared per burst; default 15000"
    )
    parser.add_argument("--seconds", type=float, default=4, help="seconds per capacity burst; default 4")
    parser.add_argument("--rate-seconds", type=float, default=4, help="seconds per fixed rate; default 4")
    parser.add_argument("--tasks", type=int, default=1000, help="end-to-end tasks per stack; default 1000")
    parser.add_argument("--downloads", type=int, default=3, help="50 MB downloads (median); default 3")
    parser.add_argument("--large", type=int, default=1_000_000, help="tasks in the large lookup database")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers it started are stopped
    if shutil.which("wrk") is None:
        print("scripts/bench needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    parts = set(args.only.split(","))
    began = time.monotonic()
    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; load generators on the same cores"
    )
    with tempfile.TemporaryDirectory(prefix="receiver-bench-") as tmp:
        work = Path(tmp)
        if "callback" in parts:
            image = image_bytes()
            print(
                f"callbacks: distinct tasks, half kie (HMAC) and half fal (Ed25519), each a"
                f" {len(image):,}-byte image downloaded from the fakes;"
                " bare = Starlette reading the body, same uvicorn stack"
            )
            results = {stack: run_stack(work, stack, args, image) for stack in args.stacks.split(",")}
            print_table(
                (
                    "measure",
                    *(
                        f"{s} stack ({', '.join(STACKS[s])}){', api + worker' if args.split else ''}"
                        for s in results
                    ),
                    "target",
                ),
                stack_rows(results),
            )
        if "e2e" in parts and "callback" not in parts:
            image = image_bytes()
            results = {stack: run_e2e_only(work, stack, args, image) for stack in args.stacks.split(",")}
            print_table(
                ("measure", *(f"{s} stack ({', '.join(STACKS[s])})" for s in results), "target"),
                stack_rows(results, e2e_only=True),
            )
        rows: list[tuple[str, ...]] = []
        if "lookup" in parts:
            sizes = (1000, args.large)
            lk = bench_lookup(work, args.rounds, args.seconds, sizes)
            for size in sizes:
                rows.append(
                    (
                        f"lookup GET /v1/tasks/{{id}} at {size:,} tasks",
                        f"{lk[size]['rps']:,.0f}/s = {lk[size]['rps'] / lk[size]['bare_rps']:.2f}x bare"
                        f" ({lk[size]['bare_rps']:,.0f}/s)",
                        ">= 0.6x",
                    )
                )
        if "download" in parts:
            dl = bench_download(work, args.downloads, 50)
            rows += [
                (
                    "download 50 MB",
                    f"{dl['ours_mb_s']:.0f} MB/s = {dl['ours_mb_s'] / dl['curl_mb_s']:.2f}x curl -o"
                    f" ({dl['curl_mb_s']:.0f} MB/s)",
                    ">= 0.8x",
                ),
                ("download peak RSS growth", f"{dl['rss_growth_mib']:.1f} MiB", "flat"),
                ("receiver CPU per 50 MB download", f"{dl['cpu_ms']:.0f} ms", ""),
            ]
        if rows:
            print_table(("measure", "receiver (default stack)", "target"), rows)
    print(f"(took {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
