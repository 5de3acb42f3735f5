"""A kie.ai Market fake speaking providers.md §2 (createTask, recordInfo, the unified Market callback)
and §2.5 (the HMAC kie signs every callback with)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.fakes.kie import KieFamilyFake

CREATE_TASK = "/api/v1/jobs/createTask"
RECORD_INFO = "/api/v1/jobs/recordInfo"
MODEL = "flux-2/pro-image-to-image"
RATIOS = ("1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3")
CREATED_AT = 1765174753676  # ms epoch, as in the §2.2 example task id


def param_string(submitted: Any) -> str:
    """`param` as kie echoes it (§2.4): a JSON string whose `input` member is itself a JSON string."""
    return json.dumps({**submitted, "input": json.dumps(submitted.get("input", {}))})


class KieMarketFake(KieFamilyFake):
    name = "kie-market"
    text_to_image = False  # Market image-to-image needs at least one input_urls entry
    submit_path = CREATE_TASK
    status_path = RECORD_INFO

    def refusal(self, submitted: Any) -> str | None:
        """The Market FLUX 2 schema (§2.1; providers.md, "Third look"): ratios, resolution, 1-8 URLs
        for image-to-image, and `auto` only with an input image."""
        job = submitted.get("input", {})
        urls = job.get("input_urls", [])
        if job.get("aspect_ratio") not in (*RATIOS, "auto"):
            return f"aspect_ratio must be one of {', '.join(RATIOS)}, auto"
        if job.get("aspect_ratio") == "auto" and not urls:
            return "aspect_ratio auto needs input_urls"
        if job.get("resolution") not in ("1K", "2K"):
            return "resolution must be 1K or 2K"
        if str(submitted.get("model", "")).endswith("image-to-image") and not 1 <= len(urls) <= 8:
            return "input_urls takes 1 to 8 images"
        return None

    def new_task_id(self) -> str:
        return f"task_flux-2_{CREATED_AT + next(self.ids)}"

    def new_record(self, task_id: str, submitted: Any) -> dict[str, Any]:
        return {
            "taskId": task_id,
            "model": submitted.get("model", MODEL),
            "state": "waiting",
            "param": param_string(submitted),
            "resultJson": "",
            "failCode": "",
            "failMsg": "",
            "costTime": 0,
            "completeTime": None,
            "createTime": CREATED_AT,
            "updateTime": CREATED_AT,
        }

    # -- what kie sends ----------------------------------------------------------------------------

    def callback_body(self, task_id: str, code: int, msg: str, state: str, **fields: Any) -> dict[str, Any]:
        """The unified Market callback (§2.4, the Wan 3.0 page's shape) for this task's record."""
        record = self.records[task_id]
        data = {"taskId": task_id, "model": record["model"], "state": state, "param": record["param"]}
        return {"code": code, "msg": msg, "data": {**data, **fields}}

    def success_body(self, task_id: str, urls: list[str]) -> dict[str, Any]:
        return self.callback_body(
            task_id,
            200,
            "Playground task completed successfully.",
            "success",
            resultJson=json.dumps({"resultUrls": urls}),
            costTime=15,
            completeTime=CREATED_AT + 15000,
            createTime=CREATED_AT,
            updateTime=CREATED_AT + 15000,
            creditsConsumed=5,
        )

    def failure_body(self, task_id: str, fail_code: str, message: str) -> dict[str, Any]:
        """Code 501, failCode a numeric string, no resultJson and no times, as documented."""
        return self.callback_body(
            task_id,
            501,
            "Playground task failed.",
            "fail",
            failCode=fail_code,
            failMsg=message,
            costTime=3,
            creditsConsumed=0,
        )

    def complete_with_gaps(self, task_id: str, urls: list[str | None]) -> httpx.Response:
        """Success whose `resultUrls` holds `null` entries, in the older callback envelope that carries
        `consumeCredits`/`remainedCredits` (a kie docs mirror and real receivers, e.g. a Go struct with
        both fields) instead of `creditsConsumed`."""
        result = json.dumps({"resultUrls": urls})
        self.records[task_id].update(state="success", resultJson=result, completeTime=CREATED_AT + 9000)
        body = self.callback_body(
            task_id,
            200,
            "Playground task completed successfully.",
            "success",
            resultJson=result,
            consumeCredits=5,
            remainedCredits=2510330,
            costTime=8,
            completeTime=CREATED_AT + 9000,
            createTime=CREATED_AT,
            updateTime=CREATED_AT + 9000,
        )
        return self.send(task_id, body)

    def complete(self, task_id: str, urls: list[str], deliver: bool = True) -> httpx.Response | None:
        self.records[task_id].update(
            state="success", resultJson=json.dumps({"resultUrls": urls}), completeTime=CREATED_AT + 15000
        )
        return self.send(task_id, self.success_body(task_id, urls)) if deliver else None

    def fail(
        self, task_id: str, moderated: bool, message: str, deliver: bool = True
    ) -> httpx.Response | None:
        # kie's Market codes say nothing about moderation ("400" is its generic failure): only the
        # message does, so a moderated failure says so in failMsg.
        fail_code = "400" if moderated else "500"
        message = f"Content moderation flagged the request: {message}" if moderated else message
        self.records[task_id].update(state="fail", failCode=fail_code, failMsg=message)
        return self.send(task_id, self.failure_body(task_id, fail_code, message)) if deliver else None
