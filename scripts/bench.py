"""Benchmarks that compare: every figure beside a reference measured in the same run.

Run as `scripts/bench` (after `scripts/test` made the venv). Needs wrk (`apt-get install wrk`) and curl.
Everything runs on 127.0.0.1: the receiver as a process, a bare Starlette app, a static file server and
a provider fake. Rounds alternate A/B and each figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.hazmat.primitives.serialization import PublicFormat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.store import migrate  # noqa: E402
from receiver.tokens import Tokens  # noqa: E402

LUA = ROOT / "scripts" / "bench_requests.lua"
SECRET = "bench-secret-" + "x" * 40
API_KEY = "bench-key-0123456789abcdef"
CONCURRENCY = 64
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)

BARE_APP = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
async def ok(request):
    return PlainTextResponse("ok")
bare = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST"])])
uvicorn.run(bare, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""

# A provider fake for the end-to-end run: accepts kie submits and calls back at once.
FAKE_KIE = """
import asyncio, itertools, sys, httpx, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
ids = itertools.count(1)
image_url = sys.argv[2]
client = None
pending = set()
async def callback(url, task_id):
    body = {"code": 200, "msg": "ok", "data": {"taskId": task_id, "info": {"resultImageUrl": image_url}}}
    await client.post(url, json=body)
async def generate(request):
    global client
    client = client or httpx.AsyncClient(timeout=30)
    body = await request.json()
    task_id = f"task{next(ids)}"
    job = asyncio.get_running_loop().create_task(callback(body["callBackUrl"], task_id))
    pending.add(job); job.add_done_callback(pending.discard)
    return JSONResponse({"code": 200, "msg": "success", "data": {"taskId": task_id}})
app = Starlette(routes=[Route("/api/v1/flux/kontext/generate", generate, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


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
    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
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
    def serve(self) -> Iterator[subprocess.Popen[bytes]]:
        with process(
            [sys.executable, "-m", "receiver", "serve", "--port", str(self.port)],
            self.env,
            f"{self.url}/healthz",
        ) as proc:
            yield proc


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- 1. callback ack ------------------------------------------------------------------------------


def fal_signer() -> tuple[Ed25519PrivateKey, dict[str, Any]]:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return key, {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "bench"}]}


def callback_lines(
    receiver: Receiver, tasks: list[tuple[str, str, str]], image_url: str, key: Ed25519PrivateKey
) -> list[tuple[str, str, dict[str, str], str]]:
    lines = []
    stamp = str(int(time.time()))
    prefix = len(receiver.url)
    for task_id, provider, provider_id in tasks:
        path = receiver.tokens.callback_url(provider, task_id)[prefix:]
        if provider == "kie":
            body = json.dumps(
                {
                    "code": 200,
                    "msg": "ok",
                    "data": {"taskId": provider_id, "info": {"resultImageUrl": image_url}},
                }
            )
            headers = {"Content-Type": "application/json"}
        else:
            body = json.dumps(
                {
                    "error": None,
                    "gateway_request_id": provider_id,
                    "request_id": provider_id,
                    "status": "OK",
                    "payload": {
                        "images": [{"url": image_url, "content_type": "image/png", "width": 1, "height": 1}],
                        "seed": 17454220438242315174,
                    },
                },
                sort_keys=True,
            )
            digest = hashlib.sha256(body.encode()).hexdigest()
            message = f"{provider_id}\nbench-user\n{stamp}\n{digest}".encode()
            headers = {
                "Content-Type": "application/json",
                "X-Fal-Webhook-Request-Id": provider_id,
                "X-Fal-Webhook-User-Id": "bench-user",
                "X-Fal-Webhook-Timestamp": stamp,
                "X-Fal-Webhook-Signature": key.sign(message).hex(),
            }
        lines.append(("POST", path, headers, body))
    return lines


def bench_callbacks(work: Path, rounds: int, seconds: float, per_round: int) -> dict[str, Any]:
    files = work / "files"
    files.mkdir()
    (files / "img.png").write_bytes(PNG_1PX)
    key, jwks = fal_signer()
    (files / "jwks.json").write_text(json.dumps(jwks))
    static = Static(files)
    data = work / "cb-data"
    data.mkdir()
    all_tasks = []
    for index in range(rounds * per_round):
        provider = "kie" if index % 2 else "fal"
        all_tasks.append((f"tsk_{index:024x}", provider, f"prov-{index}"))
    seed_tasks(data / "receiver.db", all_tasks)
    receiver = Receiver(data, {"KIE_API_KEY": "k", "FAL_KEY": "k", "FAL_JWKS_URL": f"{static.url}/jwks.json"})
    bare_port = free_port()
    results: dict[str, list[WrkResult]] = {"bare": [], "receiver": []}
    with (
        static.serve(),
        process([sys.executable, "-c", BARE_APP, str(bare_port)], url=f"http://127.0.0.1:{bare_port}/"),
        receiver.serve() as proc,
    ):
        idle = rss_kib(proc.pid)
        for r in range(rounds):
            slice_ = all_tasks[r * per_round : (r + 1) * per_round]
            lines = callback_lines(receiver, slice_, f"{static.url}/img.png", key)
            requests = write_requests(work / f"cb-{r}.tsv", lines)
            results["bare"].append(wrk(f"http://127.0.0.1:{bare_port}", requests, seconds, loop=True))
            results["receiver"].append(wrk(receiver.url, requests, seconds, loop=False))
        # Memory after the callbacks' tasks all ended (their downloads drained).
        deadline = time.monotonic() + 300
        conn = sqlite3.connect(data / "receiver.db")
        while time.monotonic() < deadline:
            left = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            if left == 0:
                break
            time.sleep(0.5)
        done = conn.execute("SELECT COUNT(*) FROM tasks WHERE status='succeeded'").fetchone()[0]
        conn.close()
        after = rss_kib(proc.pid)
    bare, recv = results["bare"], results["receiver"]
    return {
        "bare_rps": median([r.rps for r in bare]),
        "bare_p50": median([r.p50_ms for r in bare]),
        "bare_p99": median([r.p99_ms for r in bare]),
        "rps": median([r.rps for r in recv]),
        "p50": median([r.p50_ms for r in recv]),
        "p99": median([r.p99_ms for r in recv]),
        "errors": sum(r.errors for r in recv),
        "answered": sum(r.requests for r in recv),
        "tasks_done": done,
        "rss_idle_mib": idle / 1024,
        "rss_after_mib": after / 1024,
    }


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
    tasks = [(f"tsk_{n:024x}", "kie", f"dl-{n}") for n in range(rounds)]
    seed_tasks(data / "receiver.db", tasks)
    receiver = Receiver(
        data, {"KIE_API_KEY": "k", "RECEIVER_MAX_IMAGE_BYTES": str((megabytes + 10) * 1024 * 1024)}
    )
    curl_rates, our_rates, growth = [], [], []
    size = megabytes * 1024 * 1024
    with static.serve(), receiver.serve() as proc:
        conn = sqlite3.connect(data / "receiver.db")
        for task_id, _, provider_id in tasks:
            started = time.perf_counter()
            subprocess.run(["curl", "-s", "-o", str(work / "curl.out"), f"{static.url}/big.png"], check=True)
            curl_rates.append(size / (time.perf_counter() - started))
            (work / "curl.out").unlink()
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak-RSS mark
            before = rss_kib(proc.pid)
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
            # The download's own time: from the download job's start to the image's commit.
            callback_at, stored_at = conn.execute(
                "SELECT (SELECT at FROM events WHERE task_id=? AND kind='callback'),"
                " (SELECT stored_at FROM images WHERE task_id=?)",
                (task_id, task_id),
            ).fetchone()
            our_rates.append(size / max(1e-6, stored_at - callback_at))
            growth.append((rss_kib(proc.pid, "VmHWM") - before) / 1024)
        conn.close()
    return {
        "curl_mb_s": median(curl_rates) / 1e6,
        "ours_mb_s": median(our_rates) / 1e6,
        "rss_growth_mib": max(growth),
    }


# -- 4. end to end ----------------------------------------------------------------------------------


async def submit_all(url: str, count: int) -> list[str]:
    ids: list[str] = []
    limit = asyncio.Semaphore(32)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as client:

        async def one(n: int) -> None:
            async with limit:
                answer = await client.post("/v1/tasks", json={"provider": "kie", "prompt": f"e2e {n}"})
                answer.raise_for_status()
                ids.append(answer.json()["id"])

        await asyncio.gather(*(one(n) for n in range(count)))
    return ids


def bench_end_to_end(work: Path, count: int) -> dict[str, float]:
    files = work / "e2e-files"
    files.mkdir()
    (files / "img.png").write_bytes(PNG_1PX)
    static = Static(files)
    fake_port = free_port()
    data = work / "e2e-data"
    receiver = Receiver(
        data,
        {
            "KIE_API_KEY": "k",
            "KIE_BASE_URL": f"http://127.0.0.1:{fake_port}",
            "KIE_MAX_PER_MINUTE": "1000000",
        },
    )
    with (
        static.serve(),
        process([sys.executable, "-c", FAKE_KIE, str(fake_port), f"{static.url}/img.png"]),
        receiver.serve(),
    ):
        wait_http(f"http://127.0.0.1:{fake_port}/")
        started = time.perf_counter()
        ids = asyncio.run(submit_all(receiver.url, count))
        conn = sqlite3.connect(data / "receiver.db")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ended = conn.execute("SELECT COUNT(*) FROM tasks WHERE completed_at IS NOT NULL").fetchone()[0]
            if ended >= count:
                break
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        rows = conn.execute(
            "SELECT t.status, t.completed_at -"
            " (SELECT MIN(at) FROM events e WHERE e.task_id=t.id AND e.kind='callback')"
            " FROM tasks t"
        ).fetchall()
        conn.close()
    succeeded = sum(1 for status, _ in rows if status == "succeeded")
    lags = sorted(lag * 1000 for _, lag in rows if lag is not None)
    return {
        "tasks": len(ids),
        "succeeded": succeeded,
        "tasks_per_s": count / elapsed,
        "p50_ms": lags[len(lags) // 2],
        "p99_ms": lags[int(len(lags) * 0.99) - 1],
    }


# -- the table -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds per figure (median); default 3")
    parser.add_argument("--seconds", type=float, default=5, help="seconds per wrk run; default 5")
    parser.add_argument(
        "--only",
        default="callback,lookup,download,e2e",
        help="comma-separated parts to run (callback, lookup, download, e2e)",
    )
    parser.add_argument("--large", type=int, default=1_000_000, help="tasks in the large lookup database")
    parser.add_argument("--callbacks", type=int, default=40_000, help="distinct callbacks prepared per round")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("scripts/bench needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    parts = set(args.only.split(","))
    began = time.monotonic()
    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, {CONCURRENCY} connections, "
        f"{args.rounds} alternating rounds, medians"
    )
    with tempfile.TemporaryDirectory(prefix="receiver-bench-") as tmp:
        work = Path(tmp)
        rows: list[tuple[str, str, str, str]] = []
        if "callback" in parts:
            cb = bench_callbacks(work, args.rounds, args.seconds, args.callbacks)
            rows += [
                (
                    "callback ack (fal Ed25519 + kie token), req/s",
                    f"{cb['rps']:.0f}",
                    f"bare {cb['bare_rps']:.0f}",
                    f"{cb['rps'] / cb['bare_rps']:.2f}x (target >= 0.5)",
                ),
                (
                    "callback ack p50 / p99 ms",
                    f"{cb['p50']:.1f} / {cb['p99']:.1f}",
                    f"bare {cb['bare_p50']:.1f} / {cb['bare_p99']:.1f}",
                    "p99 target <= 25 ms",
                ),
                ("callbacks answered (non-2xx)", f"{cb['answered']} ({cb['errors']})", "", ""),
                (
                    "memory RSS idle / after callbacks, MiB",
                    f"{cb['rss_idle_mib']:.0f} / {cb['rss_after_mib']:.0f}",
                    f"{cb['tasks_done']} tasks ended",
                    "idle target <= 80",
                ),
            ]
        if "lookup" in parts:
            sizes = (1000, args.large)
            lk = bench_lookup(work, args.rounds, args.seconds, sizes)
            small, large = lk[sizes[0]], lk[sizes[1]]
            for size in sizes:
                rows.append(
                    (
                        f"lookup GET /v1/tasks/{{id}} at {size} tasks, req/s",
                        f"{lk[size]['rps']:.0f}",
                        f"bare {lk[size]['bare_rps']:.0f}",
                        f"{lk[size]['rps'] / lk[size]['bare_rps']:.2f}x (target >= 0.6)",
                    )
                )
            rows.append(("lookup large / small", f"{large['rps'] / small['rps']:.2f}x", "", "target >= 0.9"))
        if "download" in parts:
            dl = bench_download(work, args.rounds, 50)
            rows += [
                (
                    "download 50 MB, MB/s",
                    f"{dl['ours_mb_s']:.0f}",
                    f"curl {dl['curl_mb_s']:.0f}",
                    f"{dl['ours_mb_s'] / dl['curl_mb_s']:.2f}x (target >= 0.8)",
                ),
                ("download peak RSS growth, MiB", f"{dl['rss_growth_mib']:.1f}", "", "target <= 30"),
            ]
        if "e2e" in parts:
            e2e = bench_end_to_end(work, 2000)
            rows += [
                (
                    "end to end 2000 tasks, tasks/s",
                    f"{e2e['tasks_per_s']:.0f}",
                    f"{e2e['succeeded']} succeeded",
                    "",
                ),
                ("callback → succeeded p50 / p99 ms", f"{e2e['p50_ms']:.0f} / {e2e['p99_ms']:.0f}", "", ""),
            ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)} | receiver | reference | ratio / target")
    print("-" * (width + 50))
    for name, ours, ref, ratio in rows:
        print(f"{name.ljust(width)} | {ours} | {ref} | {ratio}")
    print(f"(took {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
