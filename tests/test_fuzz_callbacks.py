"""Every provider's callback route, fuzzed over real HTTP: arbitrary bytes and arbitrary JSON (nested,
lone surrogates, NaN, numbers past any range, the provider's own field names) never get a 5xx, and the
worker still completes an ordinary task afterwards, on SQLite and on PostgreSQL.

Each body carries a valid token for a real task of that provider, and is signed where the provider
signs (fal always, apicore here), so the fuzzer reaches the parser rather than stopping at the 401.
Reproducible: derandomized, no example database. One served app per backend for the whole module.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from tests.fakes.apicore import ApicoreFake
from tests.fakes.apicore import bfl_signature
from tests.fakes.apimart import ApimartFake
from tests.fakes.fal import FalFake
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.pg import HOW_TO_GET
from tests.pg import SECRETS
from tests.pg import Cluster
from tests.pg import pg_bin

PROVIDERS = ("kie", "kie-market", "apimart", "apicore", "fal", "sandbox")
EXAMPLES = 50  # per provider and kind of body: the module stays well within a minute on both backends
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
# Names the providers' callbacks use (providers.md), so generated objects reach past the first check.
FIELDS = (
    "code", "msg", "data", "info", "resultImageUrl", "taskId", "state", "resultJson", "failMsg", "failCode",
    "status", "id", "task_id", "result", "images", "url", "error", "message", "type", "request_id",
    "payload", "payload_error", "detail", "sample", "progress", "successFlag",
)  # fmt: skip

STATUSES = ("completed", "failed", "OK", "ERROR", "succeeded", "running", "processing", "200", "Ready")
text = st.text(alphabet=st.characters(exclude_categories=()), max_size=12)  # lone surrogates included
# A string certain to hold one: a UTF-16 string cut in half, as a provider might send it.
halved = st.builds("".join, st.tuples(text, st.characters(categories=["Cs"]), text))
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()  # NaN and the infinities too
    | text
    | halved
    | st.sampled_from(STATUSES)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | text, inner, max_size=4)
    ),
    max_leaves=12,
)
shaped = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)


def spelled(value: Any, raw: bool) -> bytes:
    """JSON text of `value`: escaped ASCII, or (raw) UTF-8 with any lone surrogate encoded as such."""
    return json.dumps(value, ensure_ascii=not raw).encode("utf-8", "surrogatepass")


json_bodies = st.builds(spelled, values | shaped, st.booleans())
edge_bodies = st.one_of(
    st.integers(1, 3000).map(lambda n: b'{"status":"processing","x":' + b"[" * n + b"]" * n + b"}"),
    st.integers(1, 6000).map(lambda n: b'{"code":' + b"9" * n + b',"status":1e' + str(n).encode() + b"}"),
    st.binary(max_size=64).map(lambda tail: b'{"status":"' + tail + b'"}'),
)


def unsigned(body: bytes) -> dict[str, str]:
    return {}


@dataclass
class Route:
    """One provider's callback route for a real task: its URL, how a body is signed there (if the
    provider signs), and the provider's id for the task (named in some bodies)."""

    url: str
    sign: Callable[[bytes], dict[str, str]]
    ids: tuple[str, str]  # (the id's field name, the id)


@dataclass
class Stage:
    receiver: Receiver
    routes: dict[str, Route]
    client: httpx.Client  # one connection for the lot: a fresh client per body costs ~50 ms here


def open_stage(root: Path, database: dict[str, str]) -> tuple[Stage, list[Any]]:
    kie, apimart, apicore, fal = (
        KieFake(hmac_key=None).start(),
        ApimartFake().start(),
        ApicoreFake().start(),
        FalFake().start(),
    )
    started: list[Any] = [kie, apimart, apicore, fal]
    env = {**kie.receiver_env(), **apimart.receiver_env(), **apicore.receiver_env(), **fal.receiver_env()}
    receiver = Receiver(root / "data", {**env, **database}).start()
    started.append(receiver)
    routes: dict[str, Route] = {}
    _, provider_id = receiver.submitted(apicore)
    url, secret = apicore.webhooks[provider_id]
    routes["apicore"] = Route(url, functools.partial(bfl_signature, secret), ("id", provider_id))
    _, provider_id = receiver.submitted(fal)
    signed = functools.partial(fal.signed, provider_id)
    routes["fal"] = Route(fal.queue[provider_id].webhook, signed, ("request_id", provider_id))
    plain = {"kie": "taskId", "kie-market": "taskId", "apimart": "id", "sandbox": "id"}
    for name, key in plain.items():
        extra: dict[str, Any] = {"images": [apimart.host("in.png")]} if name == "kie-market" else {}
        task = receiver.submit(provider=name, prompt="a lighthouse at dusk", **extra)
        url = receiver.callback_url(name, str(task["id"])) + ("/callback" if name == "apimart" else "")
        routes[name] = Route(url, unsigned, (key, str(task["id"])))
    client = httpx.Client(timeout=30, headers={"Content-Type": "application/json"})
    return Stage(receiver, routes, client), started


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stage(request: pytest.FixtureRequest) -> Iterator[Stage]:
    database: dict[str, str] = {}
    if request.param == "postgres":
        bin_dir = pg_bin()
        if bin_dir is None:
            pytest.skip(HOW_TO_GET)
        cluster: Cluster = request.getfixturevalue("pg_cluster")
        database = {"RECEIVER_DATABASE_URL": cluster.database(), **SECRETS}
    with tempfile.TemporaryDirectory(prefix="receiver-fuzz-") as root:
        stage, started = open_stage(Path(root), database)
        try:
            yield stage
        finally:
            stage.client.close()
            for server in reversed(started):
                server.stop()


def check(stage: Stage, provider: str, body: bytes) -> None:
    route = stage.routes[provider]
    answer = stage.client.post(route.url, content=body, headers=route.sign(body))
    assert answer.status_code < 500, (provider, body[:200], answer.status_code, answer.text[:300])
    assert "error" in answer.json() or answer.status_code == 200


@pytest.mark.parametrize("provider", PROVIDERS)
def test_arbitrary_bytes_never_get_a_5xx(stage: Stage, provider: str) -> None:
    @FUZZ
    @given(st.binary(max_size=512) | edge_bodies)
    def fuzz(body: bytes) -> None:
        check(stage, provider, body)

    fuzz()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_arbitrary_json_never_gets_a_5xx(stage: Stage, provider: str) -> None:
    key, own_id = stage.routes[provider].ids

    @FUZZ
    @given(json_bodies, shaped, st.none() | st.sampled_from(STATUSES) | halved, st.booleans(), st.booleans())
    def fuzz(body: bytes, fields: dict[str, Any], status: str | None, named: bool, raw: bool) -> None:
        check(stage, provider, body)
        # The same kind of noise in a body that names this very task and often has a status the
        # provider knows (or one cut in half), so parsing goes as far as it can.
        fields = {**fields, "status": status} if status is not None else fields
        check(stage, provider, spelled({**fields, key: own_id} if named else fields, raw))

    fuzz()


def test_the_worker_still_completes_a_task_afterwards(stage: Stage) -> None:
    receiver = stage.receiver
    task = receiver.submit(receiver.bob, provider="sandbox", prompt="after the storm")
    done = receiver.wait(str(task["id"]), client=receiver.bob)
    assert done["status"] == "succeeded", done
    assert receiver.anon.get("/readyz").status_code == 200
