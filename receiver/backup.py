"""`receiver backup FILE` and `receiver restore FILE`: the embedded deployment (SQLite and the media
directory) as one tar file, taken while the service runs.

The database is copied with SQLite's online-backup API, which reads one consistent snapshot however
much the service writes meanwhile; the media tree is copied after it. Media files are only ever added
before the row that names them is committed, so every file the snapshot names is in the copy. The kept
secrets go along, so signed links and callback URLs handed out before still verify after a restore.
PostgreSQL and S3 have their own tools for this job, named when asked.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from receiver import __version__
from receiver.config import data_dir_of

DATABASE = "receiver.db"
MANIFEST = "receiver-backup.json"
FORMAT = 1
# Files of a running data dir that are no part of a backup: the live database (its snapshot goes in
# instead) with its journal files, and the worker's lock.
LIVE = frozenset({DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", f"{DATABASE}-journal", "worker.lock"})
CHUNK = 1024 * 1024


class BackupError(Exception):
    """One line for stderr, and the exit status it calls for (2: refused or unusable input)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def elsewhere(env: Mapping[str, str], command: str) -> str | None:
    """What does the job instead when the deployment is not the embedded one, in one line."""
    tools = []
    if env.get("RECEIVER_DATABASE_URL"):
        tools.append("PostgreSQL (RECEIVER_DATABASE_URL) with pg_dump and pg_restore")
    if env.get("RECEIVER_MEDIA_URL"):
        tools.append("the media bucket (RECEIVER_MEDIA_URL) with bucket versioning or replication")
    if not tools:
        return None
    return (
        f"{command} covers the embedded SQLite data dir only; back up {' and '.join(tools)}"
        " (see the production guide)"
    )


def backup(env: Mapping[str, str], dest: Path) -> str:
    """Write the backup of RECEIVER_DATA_DIR to `dest` (gzipped when it ends in .gz or .tgz), atomically
    and readable by its owner only. Returns a one-line summary."""
    refusal = elsewhere(env, "receiver backup")
    if refusal:
        raise BackupError(refusal)
    data_dir = data_dir_of(env)
    database = data_dir / DATABASE
    if not database.is_file():
        raise BackupError(f"no database to back up at {database} (RECEIVER_DATA_DIR)")
    dest = dest.absolute()
    if dest.is_dir():
        raise BackupError(f"{dest} is a directory; name the backup file")
    gzipped = dest.name.endswith((".gz", ".tgz"))
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as scratch:
            snapshot = Path(scratch) / DATABASE
            tasks, schema = _snapshot(database, snapshot)
            temp = Path(scratch) / "backup.tar"
            manifest = {
                "format": FORMAT,
                "receiver": __version__,
                "schema": schema,
                "tasks": tasks,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as raw:
                if gzipped:
                    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                        files = _fill(tar, manifest, snapshot, data_dir)
                else:
                    with tarfile.open(fileobj=raw, mode="w") as tar:
                        files = _fill(tar, manifest, snapshot, data_dir)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(temp, dest)
        _sync_dir(dest.parent)
    except OSError as exc:
        raise BackupError(f"cannot write {dest}: {exc.strerror or exc}", 1) from None
    except sqlite3.Error as exc:
        raise BackupError(f"cannot read the database {database}: {exc}", 1) from None
    return f"backup written to {dest}: {tasks} tasks, {files} other files, {dest.stat().st_size} bytes"


def restore(env: Mapping[str, str], source: Path) -> str:
    """Unpack a backup into RECEIVER_DATA_DIR, which must be empty or absent. Returns a summary."""
    refusal = elsewhere(env, "receiver restore")
    if refusal:
        raise BackupError(refusal)
    data_dir = data_dir_of(env)
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise BackupError(
            f"RECEIVER_DATA_DIR {data_dir} is not empty: restore only into an empty or new data dir"
        )
    if not source.is_file():
        raise BackupError(f"no backup file at {source}")
    try:
        data_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=data_dir.parent, prefix=f".{data_dir.name}.restore-") as scratch:
            unpacked = Path(scratch) / "data"
            unpacked.mkdir(mode=0o700)
            files = _unpack(source, unpacked)
            manifest = _manifest(unpacked / MANIFEST, source)
            (unpacked / MANIFEST).unlink()
            _check_database(unpacked / DATABASE, source)
            if data_dir.exists():
                data_dir.rmdir()  # empty, as checked: the unpacked tree takes its place in one step
            os.replace(unpacked, data_dir)
        _sync_dir(data_dir.parent)
    except OSError as exc:
        raise BackupError(f"cannot restore into {data_dir}: {exc.strerror or exc}", 1) from None
    return f"restored {source} into {data_dir}: {manifest['tasks']} tasks, {files - 2} other files"


# -- backup -----------------------------------------------------------------------------------------


def _snapshot(database: Path, snapshot: Path) -> tuple[int, int]:
    """The live database copied to `snapshot` in one read transaction; (tasks, schema version)."""
    os.close(os.open(snapshot, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    source = sqlite3.connect(database, timeout=30)
    try:
        target = sqlite3.connect(snapshot)
        try:
            source.backup(target)  # all pages in one step: one consistent snapshot, writers not blocked
            tasks = int(target.execute("SELECT count(*) FROM tasks").fetchone()[0])
            schema = int(target.execute("PRAGMA user_version").fetchone()[0])
        finally:
            target.close()
    finally:
        source.close()
    return tasks, schema


def _fill(tar: tarfile.TarFile, manifest: Mapping[str, object], snapshot: Path, data_dir: Path) -> int:
    """The manifest first, then the database snapshot, then the rest; how many files of the rest."""
    _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2).encode())
    _add_file(tar, DATABASE, snapshot)
    return sum(_add_file(tar, name, path) for name, path in _kept_files(data_dir))


def _kept_files(data_dir: Path) -> Iterator[tuple[str, Path]]:
    """Every file of the data dir but the live database: kept secrets and the media tree, without
    the temporary files of writes still under way."""
    for folder, dirs, files in os.walk(data_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            relative = path.relative_to(data_dir).as_posix()
            if relative in LIVE or (name.startswith(".") and name.endswith(".part")):
                continue
            if path.is_file() and not path.is_symlink():
                yield relative, path


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> int:
    """One private regular file; 0 when it went away meanwhile (a deleted upload), else 1."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after the tar read it
    except FileNotFoundError:
        return 0
    with handle:
        info = tar.gettarinfo(arcname=name, fileobj=handle)
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
        tar.addfile(info, handle)
    return 1


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- restore ----------------------------------------------------------------------------------------


def _unpack(source: Path, into: Path) -> int:
    """The archive's regular files under `into` (0600 files, 0700 folders); anything else in it (a
    link, a device, a path outside) refuses the whole archive. How many files."""
    count = 0
    try:
        with tarfile.open(source, mode="r:*") as tar:
            for member in tar:
                target = _member_path(into, member.name)
                if member.isdir():
                    target.mkdir(mode=0o700, parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise BackupError(f"{source} is not a receiver backup: {member.name!r} is not a file")
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                extracted = tar.extractfile(member)
                assert extracted is not None  # a regular file always has its bytes
                with (
                    extracted,
                    open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out,
                ):
                    _copy(extracted, out)
                count += 1
    except (tarfile.TarError, EOFError) as exc:
        raise BackupError(f"{source} is not a readable backup: {exc}") from None
    return count


def _member_path(root: Path, name: str) -> Path:
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise BackupError(f"not a receiver backup: it names the path {name!r}")
    return root.joinpath(*parts)


def _copy(source: IO[bytes], dest: IO[bytes]) -> None:
    while chunk := source.read(CHUNK):
        dest.write(chunk)


def _manifest(path: Path, source: Path) -> dict[str, object]:
    try:
        manifest = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{source} is not a receiver backup (no {MANIFEST} of format {FORMAT})")
    return manifest


def _check_database(path: Path, source: Path) -> None:
    if not path.is_file():
        raise BackupError(f"{source} is not a receiver backup: it has no {DATABASE}")
    try:
        with sqlite3.connect(path) as conn:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"the database in {source} cannot be read: {exc}") from None
    if verdict != "ok":
        raise BackupError(f"the database in {source} is damaged: {verdict}")
