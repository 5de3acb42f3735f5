from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.kie import KEY as KIE_KEY
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.pg import HOW_TO_GET
from tests.pg import SECRETS
from tests.pg import Cluster
from tests.pg import pg_bin
from tests.s3 import MotoS3


@pytest.fixture
def kie() -> Iterator[KieFake]:
    fake = KieFake(hmac_key=None).start()
    yield fake
    fake.stop()


@pytest.fixture
def start_fake() -> Iterator[Callable[..., Any]]:
    """Start a provider fake (a class from tests/fakes, with its arguments); stopped after the test."""
    started: list[Any] = []

    def start(kind: type[Any], *args: Any, **kwargs: Any) -> Any:
        fake = kind(*args, **kwargs).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the session (skips the test where PostgreSQL is missing)."""
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip(HOW_TO_GET)
    cluster = Cluster(bin_dir).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_env(pg_cluster: Cluster) -> dict[str, str]:
    """The environment of a receiver on a fresh PostgreSQL database."""
    return {"RECEIVER_DATABASE_URL": pg_cluster.database(), **SECRETS}


@pytest.fixture
def database_env() -> dict[str, str]:
    """The database of the receivers a test starts: SQLite in their data dir. A module that runs on
    both backends overrides this (with database_settings)."""
    return {}


@pytest.fixture
def start_receiver(tmp_path: Path, database_env: dict[str, str]) -> Iterator[Callable[..., Receiver]]:
    """Start a served receiver; keyword arguments become environment variables."""
    started: list[Receiver] = []

    def start(data: str = "data", **env: Any) -> Receiver:
        receiver = Receiver(tmp_path / data, {**database_env, **{k: str(v) for k, v in env.items()}}).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def kie_receiver(kie: KieFake, start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver(KIE_API_KEY=KIE_KEY, KIE_BASE_URL=kie.url)


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoS3]:
    """moto's S3 server on loopback, shared by the session; each test makes its own bucket."""
    server = MotoS3().start()
    yield server
    server.stop()


def media_settings(request: pytest.FixtureRequest, kind: str) -> dict[str, str]:
    """A receiver's media settings: the data dir ("dir"), or a fresh bucket ("s3")."""
    if kind == "dir":
        return {}
    s3: MotoS3 = request.getfixturevalue("s3")
    return s3.env(s3.new_bucket(), "e2e")


def database_settings(request: pytest.FixtureRequest, kind: str) -> dict[str, str]:
    """A receiver's database settings: SQLite in the data dir ("sqlite"), or a fresh PostgreSQL database."""
    if kind == "sqlite":
        return {}
    env: dict[str, str] = request.getfixturevalue("pg_env")
    return env


@pytest.fixture(params=["dir", "s3"])
def media_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The media settings of each backend the shared suites run on: the data dir, and a bucket."""
    return media_settings(request, request.param)


@pytest.fixture(params=["sqlite+dir", "postgres+s3"])
def stack(request: pytest.FixtureRequest) -> str:
    """The two deployments the shared end-to-end suite runs on: embedded, and scaled out."""
    return str(request.param)
