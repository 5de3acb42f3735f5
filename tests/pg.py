"""A real, throwaway PostgreSQL for tests: one cluster per session in a temp dir, a database per test.

Debian's `postgresql` package provides the binaries (/usr/lib/postgresql/<version>/bin). PostgreSQL
refuses to run as root, so initdb and pg_ctl run as the `postgres` system user when the tests are root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.harness import free_port

HOW_TO_GET = "PostgreSQL not found: install Debian's postgresql package (apt-get install postgresql)"
SECRETS = {
    # Replicas share these, so the receiver demands them under PostgreSQL.
    "RECEIVER_SECRET_KEY": "test-secret-key-0123456789abcdef-0123456789",
    "RECEIVER_NOTIFY_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
}


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory, if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parent.parent.name)
    )
    return found[-1].parent if found else None


class Cluster:
    """initdb + pg_ctl on a free loopback port; `database()` makes a fresh empty database."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="receiver-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.count = 0
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_postgres, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> Cluster:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
            "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database (from template0), its URL."""
        self.count += 1
        name = f"t{self.count}"
        self._psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def _psql(self, command: str) -> None:
        psql = [str(self.bin / "psql"), "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        subprocess.run([*psql, "-d", "postgres", "-c", command], check=True, capture_output=True, timeout=60)

    def drop(self, name: str) -> None:
        """Drop a database under its users' feet (a database that went away)."""
        self._psql(f"DROP DATABASE {name} WITH (FORCE)")

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
