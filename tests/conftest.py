"""Fixtures shared by the suite, and its tiers.

Every test gets one tier marker at collection, read from what it reaches rather than written in each
file: `browser` (drives chromium), `pg` (runs on PostgreSQL), `s3` (moto's S3 server), `e2e` (starts a
served app, a provider fake, a subprocess), and `unit` for the rest; `slow` is added to the few that
take tens of seconds. A `unit` test really starts nothing and waits for nothing: binding a socket,
starting a process or sleeping fails it (so `scripts/test --fast`, which runs `-m unit`, cannot
quietly grow servers or waits).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
import time
import types
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.common import FakeProvider
from tests.fakes.image_host import ImageHost
from tests.fakes.kie import KEY as KIE_KEY
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.harness import ReceiverProcess
from tests.harness import Served
from tests.harness import bound_socket
from tests.harness import free_port
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
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests leave what a person may want to look at (screenshots, a metrics page): under pytest's
    temporary directory (`/tmp/pytest-of-$USER/pytest-current/artifacts`), never the source tree."""
    return tmp_path_factory.mktemp("artifacts", numbered=False)


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


# -- tiers ---------------------------------------------------------------------------------------

TIERS = ("unit", "e2e", "pg", "s3", "browser", "slow")
# What starts a server or a process when a test (or a helper or fixture of ours it calls) reaches it.
STARTS_SERVER: tuple[object, ...] = (
    Served,
    Receiver,
    ReceiverProcess,
    ImageHost,
    bound_socket,
    free_port,
    subprocess,
    MotoS3,
    Cluster,
)
SERVER_NAMES = frozenset(
    {"bind", "listen", "start_server", "create_server", "create_subprocess_exec", "create_subprocess_shell"}
)
BROWSER_NAMES = frozenset({"sync_playwright", "async_playwright", "chromium"})
# Modules whose tests take tens of seconds each (property-based runs, generated clients, benchmarks).
SLOW_MODULES = frozenset({"test_schemathesis", "test_generators", "test_fuzz_callbacks", "test_bench_scale"})


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _reaches(function: Any, seen: set[int]) -> tuple[set[str], set[object]]:
    """Every global name used by `function` and by the functions of this suite it calls, transitively,
    and the objects those names stand for."""
    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    if code is None or id(code) in seen:
        return set(), set()
    seen.add(id(code))
    names: set[str] = set()
    objects: set[object] = set()
    namespace = getattr(function, "__globals__", {})
    for part in _code_objects(code):
        for name in part.co_names:
            names.add(name)
            value = namespace.get(name)
            if value is None:
                continue
            if isinstance(value, type | types.ModuleType | types.FunctionType):
                objects.add(value)
            if not getattr(value, "__module__", "").startswith("tests"):
                continue
            # A helper of this suite is followed into; so is each method of one of its classes.
            inner = vars(value).values() if isinstance(value, type) else (value,)
            for helper in inner:
                if isinstance(helper, types.FunctionType):
                    more_names, more_objects = _reaches(helper, seen)
                    names |= more_names
                    objects |= more_objects
    return names, objects


def tiers_of(item: pytest.Item) -> set[str]:
    """The tier markers of one test, from what it and its fixtures reach and how it is parametrized."""
    assert isinstance(item, pytest.Function)
    given = {marker.name for marker in item.iter_markers() if marker.name in TIERS}
    if given:  # written on the test itself: taken as said
        return given
    seen: set[int] = set()
    names, objects = _reaches(item.function, seen)
    fixtures = item._fixtureinfo.name2fixturedefs  # pytest's own record of the fixtures a test uses
    for definitions in fixtures.values():
        for definition in definitions:
            if definition.func.__module__.startswith("tests") and definition.func is not _unit_guard:
                more_names, more_objects = _reaches(definition.func, seen)
                names |= more_names
                objects |= more_objects
    callspec = getattr(item, "callspec", None)
    params = " ".join(str(value) for value in callspec.params.values()) if callspec is not None else ""
    tiers = set()
    if names & BROWSER_NAMES:
        tiers.add("browser")
    if Cluster in objects or "pg_cluster" in item.fixturenames or "postgres" in params:
        tiers.add("pg")
    if MotoS3 in objects or "s3" in item.fixturenames or "s3" in params:
        tiers.add("s3")
    fake = any(isinstance(value, type) and issubclass(value, FakeProvider) for value in objects)
    if tiers or fake or names & SERVER_NAMES or any(value in objects for value in STARTS_SERVER):
        tiers.add("e2e")
    if item.module is not None and item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
        tiers.add("slow")
    if not tiers - {"slow"}:
        tiers.add("unit")
    return tiers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for tier in sorted(tiers_of(item)):
            item.add_marker(tier)


def _refuse(what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a unit test {what}; it belongs in the e2e tier (see tests/conftest.py)")

    return refuse


def _unit_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked `unit` that binds a socket, starts a process or sleeps fails, naming its tier."""
    if request.node.get_closest_marker("unit") is None:
        return
    monkeypatch.setattr(socket.socket, "bind", _refuse("bound a socket (started a server)"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("started a process"))
    monkeypatch.setattr(time, "sleep", _refuse("slept (wall time is for e2e tests)"))
    monkeypatch.setattr(asyncio, "sleep", _no_nap)


_nap = asyncio.sleep


async def _no_nap(delay: float, result: Any = None) -> Any:
    """asyncio.sleep for a unit test: yielding to the loop (0) is fine, waiting is not."""
    if delay > 0:
        raise AssertionError(
            f"a unit test slept {delay}s; it belongs in the e2e tier (see tests/conftest.py)"
        )
    return await _nap(0, result)


unit_starts_nothing = pytest.fixture(autouse=True, name="unit_starts_nothing")(_unit_guard)
