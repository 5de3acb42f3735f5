"""Time the lookup, list and callback paths of the real app: `receiver serve` under uvicorn, httpx as client.

    .venv/bin/python scripts/bench_api.py [--source DIR ...] [--lookups 2000] [--rounds 3]

Each `--source` is a checkout of this repository (default: this one); giving two (say a worktree of the
commit before a change, and this one) compares them in one run, rounds alternating so that load from
elsewhere on the machine falls on both alike. Per source it serves the app on 127.0.0.1, makes 50
sandbox tasks with metadata, then times, one request at a time over one keep-alive connection:
`GET /v1/tasks/{id}` (a lookup: one task read and encoded), `GET /v1/tasks?limit=50` (50 tasks encoded
in one answer) and `POST /callbacks/sandbox/{token}` (a verified duplicate callback: token, parse,
record). Prints the median of the rounds in microseconds per request: wall time at the client, and the
CPU time the server process spent (from /proc), which a busy shared machine disturbs far less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key-0123456789abcdef"
SECRET = "bench-secret-" + "x" * 40
TASKS = 50


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def served(source: Path) -> Iterator[tuple[httpx.Client, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-api-") as data:
        env = {
            **os.environ,
            "PYTHONPATH": str(source),
            "RECEIVER_DATA_DIR": data,
            "RECEIVER_PUBLIC_URL": url,
            "RECEIVER_API_KEYS": f"bench:{KEY}",
            "RECEIVER_SECRET_KEY": SECRET,
            "RECEIVER_ALLOW_PRIVATE_URLS": "1",
            "RECEIVER_SANDBOX_DELAY": "0.01",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "receiver", "serve", "--port", str(port)],
            env=env,
            cwd=source,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"the receiver from {source} did not start")
                time.sleep(0.05)
            yield client, process.pid
        finally:
            client.close()
            process.terminate()
            process.wait(timeout=20)


def callback_path(source: Path, task_id: str) -> str:
    """The task's sandbox callback path, signed with the bench secret by the source's own Tokens."""
    code = (
        "import sys; from receiver.tokens import Tokens; "
        f"print(Tokens({SECRET!r}, '', 60).callback_url('sandbox', sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(source)}
    return subprocess.run(
        [sys.executable, "-c", code, task_id], env=env, cwd=source, check=True, capture_output=True, text=True
    ).stdout.strip()


def prepare(client: httpx.Client, source: Path) -> tuple[str, str, dict[str, object]]:
    ids = []
    for n in range(TASKS):
        body = {"provider": "sandbox", "prompt": f"a lighthouse at dusk #{n}", "metadata": {"n": n, "k": "v"}}
        answer = client.post("/v1/tasks", json=body)
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["id"])
    task: dict[str, object] = {}
    for task_id in ids:
        task = client.get(f"/v1/tasks/{task_id}", params={"wait": "30"}).json()
        assert task["status"] == "succeeded", task
    images = task["images"]
    assert isinstance(images, list)
    callback = {
        "id": task["provider_task_id"],
        "status": "succeeded",
        "images": [image["source_url"] for image in images],
    }
    return ids[-1], callback_path(source, ids[-1]), callback


def timed(count: int, call: Callable[[], None], pid: int) -> tuple[float, float]:
    """Microseconds per call: wall time here, CPU time in the server."""
    cpu = cpu_seconds(pid)
    started = time.perf_counter()
    for _ in range(count):
        call()
    wall = time.perf_counter() - started
    return wall / count * 1e6, (cpu_seconds(pid) - cpu) / count * 1e6


def round_for(source: Path, lookups: int) -> dict[str, float]:
    with served(source) as (client, pid):
        task_id, callback_url, callback = prepare(client, source)

        def lookup() -> None:
            assert client.get(f"/v1/tasks/{task_id}").status_code == 200

        def page() -> None:
            assert len(client.get("/v1/tasks", params={"limit": TASKS}).json()["items"]) == TASKS

        def call_back() -> None:
            assert client.post(callback_url, json=callback).status_code == 200

        for warm in (lookup, page, call_back):
            timed(50, warm, pid)
        figures = {}
        for name, call, count in (
            ("lookup", lookup, lookups),
            ("list of 50", page, lookups // 10),
            ("callback", call_back, lookups),
        ):
            figures[f"{name} wall"], figures[f"{name} cpu"] = timed(count, call, pid)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, action="append", help="a checkout to serve (repeatable)")
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sources: list[Path] = [path.resolve() for path in (args.source or [ROOT])]
    results: dict[Path, list[dict[str, float]]] = {source: [] for source in sources}
    for _ in range(args.rounds):
        for source in sources:
            results[source].append(round_for(source, args.lookups))
    print(f"µs per request, median of {args.rounds} rounds ({args.lookups} lookups and callbacks each)")
    names = list(results[sources[0]][0])
    print(f"{'source':<24}" + "".join(f"{name:>17}" for name in names))
    for source, rounds in results.items():
        medians = [statistics.median(r[name] for r in rounds) for name in names]
        print(f"{str(source)[-24:]:<24}" + "".join(f"{value:>17.0f}" for value in medians))


if __name__ == "__main__":
    main()
