"""Client generators fed the served /openapi.json: no warnings, typed operations, and a client that works.

Python: openapi-python-client (installed by the test extra), with its defaults and no config file of
ours (an app has none), generates a client, which then creates a task, waits for it, uploads an image
and downloads the result from the real service. TypeScript:
openapi-typescript through `npx` (skipped only where Node is not installed). `scripts/check-generators`
runs this file and prints the head of each generated client.
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes.common import png
from tests.harness import ALICE
from tests.harness import Receiver

HEAD_LINES = 30


@pytest.fixture
def document(start_receiver: Callable[..., Receiver], tmp_path: Path) -> tuple[Receiver, Path]:
    receiver = start_receiver()
    path = tmp_path / "openapi.json"
    path.write_bytes(receiver.anon.get("/openapi.json").content)
    return receiver, path


def show_head(title: str, path: Path) -> None:
    print(f"\n--- {title}: first lines of {path.name} ---")
    print("\n".join(path.read_text().splitlines()[:HEAD_LINES]))


def test_openapi_python_client_generates_a_client_that_works(
    document: tuple[Receiver, Path], tmp_path: Path
) -> None:
    receiver, spec = document
    binaries = Path(sys.executable).parent
    out = tmp_path / "generated" / "receiver_api"
    command = [str(binaries / "openapi-python-client"), "generate", "--path", str(spec), "--meta", "none"]
    run = subprocess.run(
        [*command, "--output-path", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{binaries}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    assert "warning" not in said.lower(), said
    show_head("openapi-python-client", out / "models" / "task.py")

    sys.path.insert(0, str(out.parent))
    try:
        client_module = importlib.import_module("receiver_api.client")
        models = importlib.import_module("receiver_api.models")
        types = importlib.import_module("receiver_api.types")
        create_task = importlib.import_module("receiver_api.api.tasks.create_task")
        get_task = importlib.import_module("receiver_api.api.tasks.get_task")
        create_upload = importlib.import_module("receiver_api.api.uploads.create_upload")
        get_task_image = importlib.import_module("receiver_api.api.images.get_task_image")
    finally:
        sys.path.remove(str(out.parent))
    with client_module.AuthenticatedClient(base_url=receiver.url, token=ALICE) as client:
        upload = create_upload.sync(client=client, body=types.File(payload=io.BytesIO(png(16, 16))))
        assert isinstance(upload, models.Upload), upload
        body = models.TaskCreate(
            provider=models.ProviderName.SANDBOX, prompt="a generated client's pear", images=[upload.url]
        )
        created = create_task.sync_detailed(client=client, body=body, idempotency_key="gen-1")
        assert created.status_code == 202
        task = get_task.sync(id=created.parsed.id, client=client, wait=20)
        assert isinstance(task, models.Task)
        assert task.status == models.Status.SUCCEEDED, task
        assert task.completed_at is not None and task.images[0].content_type == models.ImageType("image/png")
        image = get_task_image.sync_detailed(id=task.id, index=0, client=client)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        refused = create_task.sync(
            client=client, body=models.TaskCreate(provider=models.ProviderName.SANDBOX, prompt=" ")
        )
        assert (
            isinstance(refused, models.ErrorBody) and "prompt" in refused.error.fields.additional_properties
        )


@pytest.mark.skipif(shutil.which("npx") is None, reason="Node's npx is not installed")
def test_openapi_typescript_gives_typed_operations(document: tuple[Receiver, Path], tmp_path: Path) -> None:
    _, spec = document
    out = tmp_path / "receiver.d.ts"
    run = subprocess.run(
        ["npx", "--yes", "openapi-typescript@7", str(spec), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    said = run.stdout + run.stderr
    assert run.returncode == 0, said
    assert "warn" not in said.lower(), said
    show_head("openapi-typescript", out)
    typed = out.read_text()
    for operation in ("createTask", "listTasks", "getTask", "listTaskEvents", "getTaskImage", "createUpload"):
        assert f'operations["{operation}"]' in typed, operation
    assert '"application/json": components["schemas"]["Task"];' in typed
    assert 'provider: components["schemas"]["ProviderName"];' in typed
    assert "provider_task_id: string | null;" in typed  # required, and nullable
    assert "taskEnded" in typed  # the notification, under webhooks
    untyped = [line for line in typed.splitlines() if "Record<string, never>" in line and "$defs" not in line]
    assert untyped == []
