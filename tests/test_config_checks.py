"""Every configuration value is checked at start: `receiver serve` with a malformed URL, a number
outside its range, a weak secret or a short whsec_ key stops with one line naming the variable and exit
status 2 — never a traceback, never a silent accept. And `receiver.client.verify_notification` raises
its own error for every malformed header."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from receiver.client import NotificationError
from receiver.client import verify_notification
from receiver.config import load_settings
from receiver.webhooks import WebhookSigner
from tests.test_config import serve_once

SECRETS = {
    "RECEIVER_SECRET_KEY",
    "RECEIVER_NOTIFY_SECRET",
    "RECEIVER_METRICS_TOKEN",
    "RECEIVER_API_KEYS",
    "KIE_API_KEY",
    "KIE_WEBHOOK_HMAC_KEY",
    "FAL_KEY",
}
MEDIA = {"RECEIVER_MEDIA_URL": "s3://media-bucket"}
WHSEC_16 = "whsec_" + base64.b64encode(b"0123456789abcdef").decode()

BAD: list[tuple[str, str, dict[str, str]]] = [
    # URLs: malformed, a port out of range, a query or fragment, credentials, spaces.
    ("RECEIVER_PUBLIC_URL", "http://[", {}),
    ("RECEIVER_PUBLIC_URL", "https://images.example/?a=1", {}),
    ("RECEIVER_PUBLIC_URL", "https://images.example#top", {}),
    ("RECEIVER_PUBLIC_URL", "https://images.example:99999", {}),
    ("RECEIVER_PUBLIC_URL", "https://images.example:0", {}),
    ("RECEIVER_PUBLIC_URL", "https://admin:pw@images.example", {}),
    ("RECEIVER_PUBLIC_URL", "https://images .example", {}),
    ("RECEIVER_PUBLIC_URL", "https://images.example:", {}),
    ("KIE_BASE_URL", "http://h:abc", {}),
    ("KIE_BASE_URL", "http://[", {}),
    ("APIMART_BASE_URL", "https://api.apimart.ai:99999", {}),
    ("APICORE_BASE_URL", "https://api.apicore.ai/?x=1", {}),
    ("FAL_QUEUE_URL", "http://[::1", {}),
    ("FAL_JWKS_URL", "https://rest.fal.ai:abc/jwks.json", {}),
    ("FAL_JWKS_URL", "https://[not-an-address]/jwks.json", {}),
    ("AWS_ENDPOINT_URL", "http://[", MEDIA),
    ("AWS_REGION", "eu west", MEDIA),
    ("RECEIVER_MEDIA_URL", "s3://[", {}),
    ("RECEIVER_DATABASE_URL", "postgresql://u:p@[/receiver", {}),
    ("RECEIVER_DATABASE_URL", "postgresql://u:p@db:99999/receiver", {}),
    # Numbers: nan, inf, out of range, spellings float() and int() take but an operator never means.
    ("RECEIVER_LINK_TTL", "1e20", {}),
    ("RECEIVER_LINK_TTL", "100000000000000000000", {}),
    ("RECEIVER_LINK_TTL", "3153600000", {}),  # a century
    ("RECEIVER_RECONCILE_AFTER", "nan", {}),
    ("RECEIVER_RECONCILE_AFTER", "inf", {}),
    ("RECEIVER_TASK_DEADLINE", "-inf", {}),
    ("RECEIVER_TASK_DEADLINE", "1e400", {}),
    ("RECEIVER_TASK_DEADLINE", "315360000", {}),  # ten years
    ("RECEIVER_RETRY_BASE", "NaN", {}),
    ("RECEIVER_SANDBOX_DELAY", "infinity", {}),
    ("RECEIVER_HTTP_TIMEOUT", "1_000", {}),
    ("RECEIVER_SYNC_TIMEOUT", "1e9", {}),
    ("RECEIVER_NOTIFY_TIMEOUT", "nan", {}),
    ("RECEIVER_KEY_SET_REFRESH", "inf", {}),
    ("RECEIVER_BODY_TIMEOUT", "inf", {}),
    ("RECEIVER_KEEP_ALIVE", "nan", {}),
    ("RECEIVER_SHUTDOWN_GRACE", "inf", {}),
    ("RECEIVER_JOB_LEASE", "nan", {}),
    ("RECEIVER_RECONCILE_INTERVAL", "inf", {}),
    ("RECEIVER_DOWNLOAD_RETRY_DELAYS", "1,nan", {}),
    ("RECEIVER_DOWNLOAD_RETRY_DELAYS", "1,inf", {}),
    ("RECEIVER_DOWNLOAD_RETRY_DELAYS", "1,,2", {}),
    ("RECEIVER_NOTIFY_SCHEDULE", "5,1e20", {}),
    ("RECEIVER_MAX_IMAGE_BYTES", "99999999999999999999", {}),
    ("RECEIVER_SUBMIT_RETRIES", "1000000", {}),
    ("RECEIVER_DOWNLOAD_CONCURRENCY", "100000", {}),
    ("RECEIVER_MAX_CONNECTIONS", "-1", {}),
    ("RECEIVER_MAX_HEADER_BYTES", "1000000000", {}),
    ("RECEIVER_MAX_IMAGE_BYTES", "\uff15\uff10", {}),  # fullwidth digits: int() takes them
    ("KIE_MAX_CONCURRENT", "100000000", {}),
    ("APIMART_MAX_PER_MINUTE", "0", {}),
    # Secrets: too short once whitespace is set aside, a whsec_ key under 24 bytes.
    ("RECEIVER_SECRET_KEY", " " * 32, {}),
    ("RECEIVER_SECRET_KEY", "\t" * 20 + "k" * 20, {}),
    ("RECEIVER_NOTIFY_SECRET", "whsec_AA", {}),
    ("RECEIVER_NOTIFY_SECRET", WHSEC_16, {}),
    ("RECEIVER_NOTIFY_SECRET", "whsec_ñandú", {}),
    ("RECEIVER_METRICS_TOKEN", " " * 20, {}),
    ("RECEIVER_API_KEYS", "alice:alice key 0123456789", {}),
    ("KIE_API_KEY", "a key with spaces", {}),
    ("KIE_WEBHOOK_HMAC_KEY", "   ", {}),
    ("FAL_KEY", "id:secret\u200b", {}),
    # A value that is not UTF-8 text at all (the byte 0xff in the environment).
    ("RECEIVER_SECRET_KEY", "k" * 40 + "\udcff", {}),
]


def clean_env(tmp_path: Path) -> dict[str, str]:
    """The test process's environment without any of the receiver's own variables."""
    ours = ("RECEIVER_", "KIE_", "APIMART_", "APICORE_", "FAL_", "AWS_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    return {**env, "RECEIVER_DATA_DIR": str(tmp_path / "data")}


@pytest.mark.parametrize(("name", "value", "extra"), BAD)
def test_a_bad_value_stops_serve_with_one_line(
    tmp_path: Path, name: str, value: str, extra: dict[str, str]
) -> None:
    result = serve_once({**clean_env(tmp_path), **extra, name: value})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("receiver: ") and name in lines[0], lines
    assert "Traceback" not in result.stderr
    if name in SECRETS:
        assert value.strip() == "" or value not in result.stderr  # a secret is never repeated


def test_values_at_the_edges_of_their_ranges_are_taken(tmp_path: Path) -> None:
    whsec_24 = "whsec_" + base64.b64encode(b"x" * 24).decode()
    settings = load_settings(
        {
            "RECEIVER_DATA_DIR": str(tmp_path),
            "RECEIVER_PUBLIC_URL": "http://[::1]:8000/receiver/",
            "RECEIVER_SECRET_KEY": "  " + "k" * 32 + "  ",
            "RECEIVER_NOTIFY_SECRET": f"{whsec_24} whsec_{base64.b64encode(b'y' * 32).decode().rstrip('=')}",
            "RECEIVER_LINK_TTL": str(365 * 86400),
            "RECEIVER_RECONCILE_AFTER": "0",
            "RECEIVER_TASK_DEADLINE": "2.5e3",
            "RECEIVER_DOWNLOAD_RETRY_DELAYS": " 0.05, 1 ,86400",
            "KIE_BASE_URL": "http://kie_fake:65535",
            "APIMART_BASE_URL": "http://10.0.0.7",
            "KIE_MAX_PER_MINUTE": "1000000",
        },
        port=8000,
    )
    assert settings.public_url == "http://[::1]:8000/receiver"
    assert settings.link_ttl == 365 * 86400
    assert settings.task_deadline == 2500.0
    assert settings.download_retry_delays == (0.05, 1.0, 86400.0)
    assert settings.provider("kie").base_url == "http://kie_fake:65535"
    assert len(settings.notify_secrets) == 2
    # Listening on an IPv6 address gives a public URL that is one.
    assert (
        load_settings({"RECEIVER_DATA_DIR": str(tmp_path)}, host="::1", port=9).public_url == "http://[::1]:9"
    )


def test_a_weak_secret_kept_in_the_data_dir_stops_serve(tmp_path: Path) -> None:
    """A kept secret someone shortened by hand is checked like one given in the environment."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notify_secret").write_text("whsec_AA\n")
    result = serve_once(clean_env(tmp_path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "RECEIVER_NOTIFY_SECRET" in line and "notify_secret" in line and "Traceback" not in result.stderr


# -- receiver.client.verify_notification -----------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(b"a notify secret of 32 bytes....!").decode()
BODY = json.dumps({"type": "task.succeeded", "data": {"id": "tsk_1"}}).encode()


def signed_headers(now: int) -> dict[str, str]:
    return WebhookSigner([SECRET]).headers("msg_1", now, BODY)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("webhook-timestamp", "9" * 300),
        ("webhook-timestamp", "9" * 400),  # past a float's range: OverflowError before
        ("webhook-timestamp", "9" * 5000),  # int() refuses past 4300 digits
        ("webhook-timestamp", "\u0661\u0667" + "\u0660" * 8),  # other scripts' digits
        ("webhook-timestamp", "1_700_000_000"),
        ("webhook-timestamp", " 1700000000 "),
        ("webhook-timestamp", "1.7e9"),
        ("webhook-timestamp", "-1"),
        ("webhook-signature", "v1,ñ"),  # not ASCII: base64 raises a plain ValueError
        ("webhook-signature", "v1,\udcff"),
        ("webhook-signature", "v1"),
        ("webhook-id", "msg_\ud800"),  # cannot be encoded
        ("webhook-id", b"msg_1"),  # not text
        ("webhook-signature", None),
    ],
)
def test_a_malformed_header_raises_a_notification_error(header: str, value: Any) -> None:
    headers: dict[str, Any] = {**signed_headers(int(time.time())), header: value}
    with pytest.raises(NotificationError):
        verify_notification(headers, BODY, SECRET)  # the clock as apps use it: time.time(), a float


def test_a_malformed_body_raises_a_notification_error() -> None:
    now = int(time.time())
    with pytest.raises(NotificationError):
        verify_notification(signed_headers(now), "{\udcff}", SECRET, now=now)
    deep = b"[" * 100_000 + b"]" * 100_000
    headers = WebhookSigner([SECRET]).headers("msg_1", now, deep)
    with pytest.raises(NotificationError):
        verify_notification(headers, deep, SECRET, now=now)
    # And a good one still verifies.
    assert verify_notification(signed_headers(now), BODY, SECRET, now=now)["type"] == "task.succeeded"


def test_the_client_imports_only_httpx_and_the_standard_library() -> None:
    script = (
        "import sys, json; import httpx; before = set(sys.modules); import receiver.client;"
        " print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    added = {name.split(".")[0] for name in json.loads(out.stdout)}
    # httpx's own dependencies (anyio …) come with httpx; nothing else may.
    httpx_needs = {re.split(r"[^A-Za-z0-9_.-]", need)[0] for need in metadata.requires("httpx") or []}
    assert added - set(sys.stdlib_module_names) - httpx_needs == {"receiver"}, added
    ours = {name for name in json.loads(out.stdout) if name.startswith("receiver")}
    assert ours <= {"receiver", "receiver.client", "receiver.webhooks", "receiver.imageinfo"}, ours
