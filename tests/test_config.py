"""Configuration: every bad value stops `serve` with one line naming the variable, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from receiver.config import ConfigError
from receiver.config import load_settings
from receiver.config import prepare_settings


def serve_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`receiver serve` as a process that is expected to stop at once."""
    return subprocess.run(
        [sys.executable, "-m", "receiver", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECEIVER_PUBLIC_URL", "ftp://example.com"),
        ("RECEIVER_SECRET_KEY", "short"),
        ("RECEIVER_API_KEYS", "alice"),
        ("RECEIVER_API_KEYS", "alice:short"),
        ("RECEIVER_NOTIFY_SECRET", "plain-secret"),
        ("RECEIVER_ALLOW_PRIVATE_URLS", "maybe"),
        ("RECEIVER_RECONCILE_AFTER", "soon"),
        ("RECEIVER_TASK_DEADLINE", "0"),
        ("RECEIVER_MAX_IMAGE_BYTES", "12.5"),
        ("RECEIVER_LINK_TTL", "-1"),
        ("KIE_BASE_URL", "not a url"),
        ("APICORE_REQUIRE_SIGNATURE", "yes please"),
        ("RECEIVER_LOG_FORMAT", "xml"),
        ("RECEIVER_LOG_LEVEL", "LOUD"),
        ("RECEIVER_SHUTDOWN_GRACE", "-1"),
        ("RECEIVER_DOWNLOAD_RETRY_DELAYS", "1,x"),
        ("RECEIVER_MEDIA_URL", "https://bucket.example"),
        ("RECEIVER_MEDIA_URL", "s3://Not_A_Bucket"),
        ("RECEIVER_MEDIA_URL", "s3://media/../elsewhere"),
        ("RECEIVER_MEDIA_REDIRECT", "1"),  # without a bucket there is nothing to presign
        ("RECEIVER_DATABASE_URL", "mysql://user:pw@db/receiver"),
        ("RECEIVER_DATABASE_URL", "postgresql://user:pw@db:port/receiver"),
        ("RECEIVER_JOB_LEASE", "0"),
        ("RECEIVER_DOWNLOAD_PROCESS", "2"),
    ],
)
def test_bad_values_stop_serve_with_one_line(tmp_path: Path, name: str, value: str) -> None:
    result = serve_once({**os.environ, "RECEIVER_DATA_DIR": str(tmp_path / "data"), name: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("receiver: ")
    assert name in lines[0]
    assert "Traceback" not in result.stderr


def test_an_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="RECEIVER_DATA_DIR"):
        prepare_settings({"RECEIVER_DATA_DIR": str(blocker / "data")})


def test_generated_secrets_are_kept(tmp_path: Path) -> None:
    env = {"RECEIVER_DATA_DIR": str(tmp_path)}
    first = prepare_settings(env)
    second = prepare_settings(env)
    assert len(first.secret_key) >= 32
    assert first.secret_key == second.secret_key
    assert first.notify_secrets == second.notify_secrets
    assert first.notify_secrets[0].startswith("whsec_")
    assert list(first.api_keys) == list(second.api_keys)
    assert first.dev_api_key_created
    assert oct((tmp_path / "secret_key").stat().st_mode & 0o777) == "0o600"


def test_defaults_follow_the_contract(tmp_path: Path) -> None:
    settings = load_settings(
        {"RECEIVER_DATA_DIR": str(tmp_path), "RECEIVER_API_KEYS": "a:0123456789abcdef0"},
        host="0.0.0.0",
        port=9000,
    )
    assert settings.public_url == "http://0.0.0.0:9000"
    assert settings.reconcile_after == 300
    assert settings.task_deadline == 3600
    assert settings.max_image_bytes == 52_428_800
    assert settings.link_ttl == 604_800
    assert settings.allow_private_urls is False
    assert settings.provider("kie").base_url == "https://api.kie.ai"
    assert settings.provider("kie").api_key is None
    assert settings.provider("fal").extra["FAL_JWKS_URL"] == "https://rest.fal.ai/.well-known/jwks.json"
    assert settings.db_path == tmp_path / "receiver.db"


def test_download_process_setting(tmp_path: Path) -> None:
    base = {"RECEIVER_DATA_DIR": str(tmp_path)}
    cores = len(os.sched_getaffinity(0))
    assert load_settings(base).download_process is (cores >= 2)  # auto: on with two cores or more
    assert load_settings({**base, "RECEIVER_DOWNLOAD_PROCESS": "AUTO"}).download_process is (cores >= 2)
    assert load_settings({**base, "RECEIVER_DOWNLOAD_PROCESS": "1"}).download_process is True
    assert load_settings({**base, "RECEIVER_DOWNLOAD_PROCESS": "0"}).download_process is False


def test_serve_prints_a_dev_key_and_a_curl_example(tmp_path: Path) -> None:
    from receiver.cli import welcome

    settings = prepare_settings({"RECEIVER_DATA_DIR": str(tmp_path)})
    text = welcome(settings)
    key = (tmp_path / "dev_api_key").read_text().strip()
    assert key in text
    assert "curl" in text and '"provider": "sandbox"' in text


def test_media_settings(tmp_path: Path) -> None:
    base = {"RECEIVER_DATA_DIR": str(tmp_path / "data"), "RECEIVER_MEDIA_URL": "s3://media-bucket/a/b/"}
    settings = load_settings({**base, "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"})
    assert settings.media_url == "s3://media-bucket/a/b"
    assert dict(settings.aws) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}
    assert load_settings({"RECEIVER_DATA_DIR": str(tmp_path / "data")}).media_url is None
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL"):
        load_settings({**base, "AWS_ENDPOINT_URL": "minio:9000"})
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        load_settings({**base, "AWS_ACCESS_KEY_ID": "only-the-id"})


def test_postgres_demands_the_shared_secrets(tmp_path: Path) -> None:
    """Replicas cannot each generate their own secrets: without them `serve` stops with one line."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RECEIVER_SECRET_KEY", "RECEIVER_NOTIFY_SECRET", "RECEIVER_API_KEYS")
    }
    env |= {
        "RECEIVER_DATA_DIR": str(tmp_path / "data"),
        "RECEIVER_DATABASE_URL": "postgresql://receiver:hunter2-password@127.0.0.1:1/receiver",
        "RECEIVER_API_KEYS": "alice:alice-key-0123456789abcdef",
    }
    result = serve_once(env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "receiver: with RECEIVER_DATABASE_URL, set RECEIVER_SECRET_KEY and RECEIVER_NOTIFY_SECRET"
        " (shared by every replica)"
    ]
    assert not (tmp_path / "data" / "secret_key").exists()  # nothing generated on the way


def test_a_bad_database_url_never_shows_its_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"RECEIVER_DATA_DIR": str(tmp_path), "RECEIVER_DATABASE_URL": "mysql://u:hunter2@db/x"})
    assert "hunter2" not in str(caught.value)
    assert "RECEIVER_DATABASE_URL" in str(caught.value)


@pytest.mark.parametrize("where", ["nothing listening", "no such database"])
def test_a_database_that_cannot_be_used_stops_serve_with_one_line(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    if where == "nothing listening":
        url = "postgresql://receiver:hunter2-password@127.0.0.1:1/receiver"
        expected = "Connect call failed"
    else:
        cluster = request.getfixturevalue("pg_cluster")
        url = cluster.url("no_such_database")
        expected = 'database "no_such_database" does not exist'
    env = {**os.environ, "RECEIVER_DATA_DIR": str(tmp_path / "data"), "RECEIVER_DATABASE_URL": url}
    env |= {
        "RECEIVER_SECRET_KEY": "k" * 40,
        "RECEIVER_NOTIFY_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "RECEIVER_API_KEYS": "alice:alice-key-0123456789abcdef",
    }
    result = serve_once(env)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("receiver: cannot use the database in RECEIVER_DATABASE_URL: ")
    assert expected in lines[0]
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
