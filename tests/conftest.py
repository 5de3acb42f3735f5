from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.kie import KEY as KIE_KEY
from tests.fakes.kie import KieFake
from tests.harness import Receiver
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


@pytest.fixture
def start_receiver(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start a served receiver; keyword arguments become environment variables."""
    started: list[Receiver] = []

    def start(data: str = "data", **env: Any) -> Receiver:
        receiver = Receiver(tmp_path / data, {k: str(v) for k, v in env.items()}).start()
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


@pytest.fixture(params=["dir", "s3"])
def media_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The media settings of each backend the shared suites run on: the data dir, and a bucket."""
    if request.param == "dir":
        return {}
    s3: MotoS3 = request.getfixturevalue("s3")
    return s3.env(s3.new_bucket(), "e2e")
