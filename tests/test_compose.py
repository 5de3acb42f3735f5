"""compose.yaml has no public default secrets: each one must come from .env, which scripts/make-env
writes with fresh random values that the service's own checks accept, and .env.example lists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from receiver.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
# ${NAME}, ${NAME:-default} or ${NAME:?message}
REFERENCE = re.compile(r"\$\{([A-Z0-9_]+)(?::([-?])([^}]*))?\}")
# What compose may default: nothing secret (an empty provider key means "not offered").
DEFAULTS_ALLOWED = {"RECEIVER_PUBLIC_URL", "MINIO_ROOT_USER", "APICORE_REQUIRE_SIGNATURE"}


def compose_variables() -> dict[str, set[tuple[str, str]]]:
    found: dict[str, set[tuple[str, str]]] = {}
    for name, how, value in REFERENCE.findall((ROOT / "compose.yaml").read_text()):
        found.setdefault(name, set()).add((how, value))
    return found


def env_file(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: value for name, value in pairs}


def make_env() -> dict[str, str]:
    done = subprocess.run([str(ROOT / "scripts" / "make-env")], capture_output=True, text=True, check=True)
    return env_file(done.stdout)


def test_compose_gives_no_secret_a_default() -> None:
    variables = compose_variables()
    assert "RECEIVER_SECRET_KEY" in variables
    for name, uses in variables.items():
        for how, value in uses:
            if how == "-" and value:
                assert name in DEFAULTS_ALLOWED, f"compose.yaml gives {name} a default"
            if name.endswith(("_SECRET", "_SECRET_KEY", "_PASSWORD", "_API_KEYS")):
                assert how == "?", f"compose.yaml must refuse to start without {name}"


def test_env_example_and_make_env_name_every_variable_compose_reads() -> None:
    wanted = set(compose_variables())
    assert set(env_file((ROOT / ".env.example").read_text())) == wanted
    assert set(make_env()) == wanted


def test_make_env_writes_fresh_secrets_the_service_accepts(tmp_path: Path) -> None:
    first, second = make_env(), make_env()
    for name in ("RECEIVER_SECRET_KEY", "RECEIVER_NOTIFY_SECRET", "POSTGRES_PASSWORD", "MEDIA_SECRET_KEY"):
        assert first[name] and first[name] != second[name], name
    env = {
        name: first[name]
        for name in (
            "RECEIVER_PUBLIC_URL",
            "RECEIVER_API_KEYS",
            "RECEIVER_SECRET_KEY",
            "RECEIVER_NOTIFY_SECRET",
        )
    }
    settings = load_settings({**env, "RECEIVER_DATA_DIR": str(tmp_path / "data")})
    assert settings.secret_key == first["RECEIVER_SECRET_KEY"]
    assert dict(settings.api_keys) == {first["RECEIVER_API_KEYS"].split(":", 1)[1]: "app"}
