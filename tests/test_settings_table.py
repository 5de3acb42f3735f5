"""The settings table: `Settings`, `receiver config` and the providers' own variables come from one
declaration each; loading reads, and only `serve`'s preparing step writes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from receiver.config import KEPT
from receiver.config import SECTIONS
from receiver.config import VARIABLES
from receiver.config import Settings
from receiver.config import load_settings
from receiver.config import mask
from receiver.config import prepare_settings
from receiver.providers import REGISTRY

SECRETS = {
    "RECEIVER_SECRET_KEY": "secret-key-that-must-never-show-0123456789",
    "RECEIVER_API_KEYS": "alice:alice-key-never-shown-0123456789",
    "RECEIVER_METRICS_TOKEN": "metrics-token-never-shown-0123",
    "KIE_API_KEY": "kie-key-never-shown-0123456789",
    "FAL_KEY": "fal-id:fal-secret-never-shown-0123",
    "KIE_WEBHOOK_HMAC_KEY": "kie-hmac-never-shown-0123456789",
    "RECEIVER_MEDIA_URL": "s3://media-bucket",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEID",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-never-shown-0123456789",
}


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without any of the receiver's variables, and these."""
    ours = ("RECEIVER_", "KIE_", "APIMART_", "APICORE_", "FAL_", "AWS_", "SANDBOX_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    return {**env, "RECEIVER_DATA_DIR": str(data_dir), **extra}


def receiver_config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "receiver", "config", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_never_prints_a_secret_whole(tmp_path: Path) -> None:
    data = tmp_path / "data"
    kept = prepare_settings(clean_env(data, RECEIVER_API_KEYS=SECRETS["RECEIVER_API_KEYS"]))
    notify_secret = kept.notify_secrets[0]  # generated and kept in the data dir
    env = clean_env(data, **SECRETS)
    piped = receiver_config(env)
    as_json = receiver_config(env, "--json")
    assert piped.returncode == 0 and as_json.returncode == 0, piped.stderr + as_json.stderr
    for name, secret in [*SECRETS.items(), ("RECEIVER_NOTIFY_SECRET", notify_secret)]:
        if VARIABLES[name].secret:
            assert secret not in piped.stdout + piped.stderr, name
            assert secret not in as_json.stdout + as_json.stderr, name
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in piped.stdout.splitlines()}
    assert set(rows) == set(VARIABLES)  # every declared setting, and only those, each once
    assert len(piped.stdout.splitlines()) == len(VARIABLES)
    assert rows["RECEIVER_SECRET_KEY"] == ["secr…", "environment"]
    assert rows["KIE_API_KEY"] == ["kie-…", "environment"]
    assert rows["RECEIVER_NOTIFY_SECRET"] == [notify_secret[:4] + "…", "data dir"]
    assert rows["AWS_ACCESS_KEY_ID"] == ["AKIAEXAMPLEID", "environment"]  # an id, not a secret
    assert rows["RECEIVER_LINK_TTL"] == ["604800", "default"]
    assert rows["FAL_JWKS_URL"] == ["https://rest.fal.ai/.well-known/jwks.json", "default"]
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {line["name"]: line["section"] for line in lines} == {
        var.name: section for section, variables in SECTIONS.items() for var in variables
    }


def test_config_reads_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    result = receiver_config(clean_env(data, RECEIVER_LINK_TTL="3600"))
    assert result.returncode == 0, result.stderr
    assert "RECEIVER_LINK_TTL\t3600\tenvironment" in result.stdout.splitlines()
    assert "RECEIVER_SECRET_KEY\t\tgenerated at the first serve" in result.stdout.splitlines()
    assert not data.exists()
    bad = receiver_config(clean_env(data, RECEIVER_LINK_TTL="forever"))
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == ["receiver: RECEIVER_LINK_TTL must be a whole number, got 'forever'"]
    assert bad.stdout == ""


def test_loading_writes_nothing_preparing_keeps_the_secrets(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(data)
    loaded = load_settings(env)
    assert not data.exists()  # loading only reads
    assert len(loaded.secret_key) >= 32 and loaded.dev_api_key_created
    prepared = prepare_settings(env)
    assert {path.name for path in data.iterdir()} == {
        "media",
        "receiver.db",
        *(var.kept.filename for var in KEPT if var.kept),
    }
    again = load_settings(env)  # now it reads what preparing kept
    assert (again.secret_key, again.notify_secrets, list(again.api_keys)) == (
        prepared.secret_key,
        prepared.notify_secrets,
        list(prepared.api_keys),
    )
    assert again.provider("sandbox").api_key == prepared.provider("sandbox").api_key


def test_settings_take_every_default_from_the_table(tmp_path: Path) -> None:
    """With nothing set, each setting is its declared default: the table is the one place it is written."""
    settings = load_settings(clean_env(tmp_path))
    fields = {field.name for field in dataclasses.fields(Settings)}
    compared = 0
    for var in (*SECTIONS["service"], *SECTIONS["schedules"], *SECTIONS["limits"], *SECTIONS["storage"]):
        name = var.field or var.name.removeprefix("RECEIVER_").lower()
        if name in fields and var.default is not None and not isinstance(var.default, str):
            assert getattr(settings, name) == var.default, var.name
            compared += 1
    assert compared >= 25
    assert settings.max_connections == VARIABLES["RECEIVER_MAX_CONNECTIONS"].default


def test_providers_declare_their_own_variables(tmp_path: Path) -> None:
    env = clean_env(tmp_path, APICORE_API_KEY="apicore-key", APICORE_REQUIRE_SIGNATURE="yes")
    settings = load_settings(env)
    for name, provider in REGISTRY.items():
        declared = provider.variables.all()
        assert all(var.name in VARIABLES for var in declared), name
        assert f"{name.upper().replace('-', '_')}_MAX_CONCURRENT" in VARIABLES
        if provider.key_variable is not None:
            assert provider.variables.key is not None and provider.key_variable == provider.variables.key.name
            for var in provider.variables.extra:
                assert var.name in settings.provider(name).extra or var.default is None
    assert settings.provider("apicore").api_key == "apicore-key"
    assert settings.provider("apicore").extra["APICORE_REQUIRE_SIGNATURE"] == "1"


def test_a_secret_is_masked_to_four_characters_and_a_short_one_whole() -> None:
    assert mask("0123456789abcdefghij") == "0123…"
    assert mask("short-secret") == "shor…"
    assert mask("short") == "…"
    assert mask("") == ""
    assert {name for name, var in VARIABLES.items() if var.secret} >= {
        "RECEIVER_SECRET_KEY",
        "RECEIVER_API_KEYS",
        "RECEIVER_NOTIFY_SECRET",
        "RECEIVER_METRICS_TOKEN",
        "RECEIVER_DATABASE_URL",
        "KIE_API_KEY",
        "KIE_WEBHOOK_HMAC_KEY",
        "APIMART_API_KEY",
        "APICORE_API_KEY",
        "FAL_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    }
