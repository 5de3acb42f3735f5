"""Nothing paid twice: a submit that may have reached the provider is never blindly sent again, and
every call to a provider or its file host says who is calling. All over real HTTP against the fakes,
which stall on an event until the test lets them answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from receiver import USER_AGENT
from tests.fakes.apicore import GENERATIONS
from tests.fakes.apicore import GET_RESULT
from tests.fakes.apicore import ApicoreFake
from tests.fakes.kie import GENERATE
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.harness import free_port


def test_a_synchronous_submit_that_times_out_fails_without_a_second_submit(
    start_fake: Callable[..., ApicoreFake], start_receiver: Callable[..., Receiver]
) -> None:
    apicore = start_fake(ApicoreFake, synchronous=True)
    receiver = start_receiver(**apicore.receiver_env(), RECEIVER_SYNC_TIMEOUT=0.5)
    apicore.hold = threading.Event()  # the generation "runs" until the test is done
    try:
        done = receiver.wait(str(receiver.submit(provider="apicore", prompt="p")["id"]))
    finally:
        apicore.hold.set()
    assert done["status"] == "failed"
    assert done["error"]["code"] == "provider_unavailable"
    assert done["error"]["provider_code"] == "outcome_unknown"
    assert "no answer within 0.5 s" in done["error"]["message"]
    assert "may have run the task" in done["error"]["message"]
    assert len(apicore.calls(GENERATIONS)) == 1  # paid at most once


def test_a_synchronous_provider_gets_the_long_timeout(
    start_fake: Callable[..., ApicoreFake], start_receiver: Callable[..., Receiver]
) -> None:
    apicore = start_fake(ApicoreFake, synchronous=True)
    receiver = start_receiver(**apicore.receiver_env(), RECEIVER_HTTP_TIMEOUT=0.2, RECEIVER_SYNC_TIMEOUT=60)
    apicore.hold = threading.Event()
    task = receiver.submit(provider="apicore", prompt="p")
    apicore.wait_for(lambda: len(apicore.calls(GENERATIONS)) == 1)
    # Hold the answer for several ordinary timeouts: the submit must still be waiting for it.
    held_since = time.monotonic()
    while time.monotonic() - held_since < 5 * 0.2:
        assert receiver.alice.get(f"/v1/tasks/{task['id']}").json()["status"] == "queued"
        time.sleep(0.05)
    apicore.hold.set()
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded", done
    assert len(apicore.calls(GENERATIONS)) == 1


def test_a_synchronous_500_is_not_resent_but_gateway_errors_are(
    start_fake: Callable[..., ApicoreFake], start_receiver: Callable[..., Receiver]
) -> None:
    apicore = start_fake(ApicoreFake, synchronous=True)
    receiver = start_receiver(**apicore.receiver_env())
    apicore.script(GENERATIONS, 503, b"<html>upstream unavailable</html>")
    apicore.script(GENERATIONS, 504, b"gateway timeout")
    done = receiver.wait(str(receiver.submit(provider="apicore", prompt="p")["id"]))
    assert done["status"] == "succeeded"
    assert len(apicore.calls(GENERATIONS)) == 3  # 503 and 504 never reached the work: sent again

    apicore.script(GENERATIONS, 500, {"detail": "internal error"})
    done = receiver.wait(str(receiver.submit(provider="apicore", prompt="p")["id"]))
    assert done["error"]["code"] == "provider_unavailable"
    assert done["error"]["provider_code"] == "outcome_unknown"
    assert "HTTP 500" in done["error"]["message"]
    assert len(apicore.calls(GENERATIONS)) == 4  # the 500 came after the work may have run: once


def test_connect_errors_are_retried_freely(start_receiver: Callable[..., Receiver]) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: the request never leaves
    receiver = start_receiver(APICORE_API_KEY="k", APICORE_BASE_URL=closed, RECEIVER_SUBMIT_RETRIES=2)
    done = receiver.wait(str(receiver.submit(provider="apicore", prompt="p")["id"]))
    assert done["error"]["code"] == "provider_unavailable"
    assert "gave up after 3 tries" in done["error"]["message"]
    assert done["error"]["provider_code"] is None
    tries = [e for e in receiver.events(str(done["id"])) if "ConnectError" in e["summary"]]
    assert len(tries) == 3


def test_an_async_submit_that_times_out_waits_for_the_callback_instead_of_resending(
    kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver(**kie.receiver_env(), RECEIVER_HTTP_TIMEOUT=0.3)
    kie.hold = threading.Event()
    try:
        task = receiver.submit(provider="kie", prompt="p")
        waiting = receiver.wait_status(str(task["id"]), "submitted")
    finally:
        kie.hold.set()
    assert waiting["provider_task_id"] is None
    summaries = [e["summary"] for e in receiver.events(str(task["id"])) if e["kind"] == "submit"]
    assert any("outcome unknown: no answer within 0.3 s" in s for s in summaries), summaries
    # kie did take it: its callback (to the URL that names our task) still completes the task.
    kie_id = kie.last_task_id()
    assert kie.send(kie_id, kie.success_body(kie_id, kie.host("late.png"))).status_code == 200
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded"
    assert done["provider_task_id"] == kie_id
    assert len(kie.calls(GENERATE)) == 1


def test_every_provider_call_and_download_says_receiver_and_version(
    start_fake: Callable[..., ApicoreFake], start_receiver: Callable[..., Receiver]
) -> None:
    apicore = start_fake(ApicoreFake)
    receiver = start_receiver(**apicore.receiver_env(), RECEIVER_RECONCILE_AFTER=0.1)
    task_id, bfl_id = receiver.submitted(apicore)
    apicore.complete(bfl_id, [apicore.host("ua.png")], deliver=False)  # only reconcile will learn it
    assert receiver.wait(task_id)["status"] == "succeeded"
    seen = [*apicore.calls(GENERATIONS), *apicore.calls(GET_RESULT), *apicore.calls("/files/ua.png")]
    assert {r.path for r in seen} == {GENERATIONS, GET_RESULT, "/files/ua.png"}
    assert {r.headers.get("user-agent") for r in seen} == {USER_AGENT}
    assert USER_AGENT.startswith("receiver/")
