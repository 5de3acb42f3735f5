"""Shapes real integrations saw that the documentation does not show, each sent by a fake over real
HTTP (the evidence for each is on its provider page under docs/providers/)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.fakes.apicore import GENERATIONS
from tests.fakes.apicore import ApicoreFake
from tests.fakes.kie import KieFake
from tests.fakes.kie_market import KieMarketFake
from tests.harness import Receiver


def test_kie_codes_as_strings_and_null_strings(
    start_fake: Callable[..., KieFake], start_receiver: Callable[..., Receiver]
) -> None:
    kie = start_fake(KieFake, real_world=True)
    receiver = start_receiver(**kie.receiver_env(), RECEIVER_RECONCILE_AFTER=0.1)
    # `code: "200"` in the submit answer and in the callback.
    task_id, kie_id = receiver.submitted(kie)
    assert kie.send(kie_id, kie.success_body(kie_id, kie.host("s.png"))).status_code == 200
    assert receiver.wait(task_id)["status"] == "succeeded"

    # record-info with "null" strings and string times: a success found by reconcile …
    task_id, kie_id = receiver.submitted(kie)
    kie.complete(kie_id, [kie.host("r.png")], deliver=False)
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded"
    assert [image["source_url"] for image in done["images"]] == [f"{kie.url}/files/r.png"]

    # … and a failure whose errorCode and errorMessage are "null": no "null" in the task's error.
    task_id, kie_id = receiver.submitted(kie)
    kie.records[kie_id].update(successFlag=3)
    done = receiver.wait(task_id)
    assert done["error"] == {
        "code": "generation_failed",
        "message": "kie could not generate the image",
        "provider_code": None,
    }


def test_kie_market_null_result_urls_and_older_credit_fields(
    start_fake: Callable[..., KieMarketFake], start_receiver: Callable[..., Receiver]
) -> None:
    market = start_fake(KieMarketFake)
    receiver = start_receiver(**market.receiver_env())
    task_id, kie_id = receiver.submitted(market, images=[market.host("in.png")])
    first, third = market.host("first.png"), market.host("third.png")
    assert market.complete_with_gaps(kie_id, [first, None, third]).status_code == 200
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded"
    assert [(image["index"], image["source_url"]) for image in done["images"]] == [(0, first), (1, third)]


def test_bfl_moderation_spellings_end_the_task_as_content_moderated(
    start_fake: Callable[..., ApicoreFake], start_receiver: Callable[..., Receiver]
) -> None:
    apicore = start_fake(ApicoreFake)
    receiver = start_receiver(**apicore.receiver_env(), RECEIVER_RECONCILE_AFTER=0.1)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"status": "Request Moderated", "details": {"message": "input flagged"}}, "Request Moderated"),
        ({"status": "Content Moderated"}, "Content Moderated"),
        ({"status": "Error", "error": "Content policy violation: NSFW content detected"}, "Error"),
    ]
    for fields, provider_code in cases:
        # By webhook …
        task_id, bfl_id = receiver.submitted(apicore)
        assert apicore.send(bfl_id, {"id": bfl_id, **fields}).status_code == 200
        done = receiver.wait(task_id)
        assert (done["error"]["code"], done["error"]["provider_code"]) == ("content_moderated", provider_code)
        # … and by get_result, which reconcile reads.
        task_id, bfl_id = receiver.submitted(apicore)
        apicore.records[bfl_id].update(fields)
        done = receiver.wait(task_id)
        assert (done["error"]["code"], done["error"]["provider_code"]) == ("content_moderated", provider_code)
    # An `Error` whose reason is not a content policy stays a generation failure.
    task_id, bfl_id = receiver.submitted(apicore)
    assert (
        apicore.send(bfl_id, {"id": bfl_id, "status": "Error", "error": "GPU out of memory"}).status_code
        == 200
    )
    assert receiver.wait(task_id)["error"]["code"] == "generation_failed"
    assert len(apicore.calls(GENERATIONS)) == 7
    assert json.loads(apicore.calls(GENERATIONS)[0].body)["webhook_url"]
