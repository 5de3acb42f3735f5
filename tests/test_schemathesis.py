"""schemathesis against our own /openapi.json (issue 11): no 5xx, and no answer outside its schema.

Bounded: a few dozen examples per operation, with the sandbox configured so that positive examples
create real tasks that run end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck
from hypothesis import Phase
from hypothesis import given
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import content_type_conformance
from schemathesis.specs.openapi.checks import response_schema_conformance
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.harness import ALICE
from tests.harness import Receiver

EXAMPLES = 25  # per operation: the whole run stays within about a minute
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def sandbox_task(case: Any) -> Any:
    """A generated create made one the sandbox accepts: its prompt and metadata kept where usable."""
    body = case.body if isinstance(case.body, dict) else {}
    prompt = body.get("prompt")
    metadata = body.get("metadata")
    case.body = {
        "provider": "sandbox",
        "prompt": prompt if isinstance(prompt, str) and prompt.strip() else "a lighthouse at dusk",
        **({"metadata": metadata} if isinstance(metadata, dict) else {}),
    }
    return case


def test_every_answer_keeps_to_the_document(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver()
    schema = schemathesis.openapi.from_dict(receiver.anon.get("/openapi.json").json())
    schema.config.base_url = receiver.url
    headers = {"Authorization": f"Bearer {ALICE}"}
    failures: dict[str, str] = {}
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results  # the document itself is valid
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) >= 10
    create = schema["/v1/tasks"]["POST"]
    # Positive path first: generated bodies turned into sandbox tasks, which then run for real, so the
    # reads below meet tasks that are queued, running and done, with images.
    runs = [(create, create.as_strategy().map(sandbox_task)), *((op, op.as_strategy()) for op in operations)]
    for operation, cases in runs:

        @given(case=cases)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def keeps_to_it(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            keeps_to_it()
        except (Exception, BaseExceptionGroup) as exc:  # every operation runs; failures are listed together
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    tasks = receiver.alice.get("/v1/tasks", params={"limit": 200}).json()["items"]
    assert sum(task["provider"] == "sandbox" for task in tasks) >= 5  # positive examples made real tasks
