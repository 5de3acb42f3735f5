"""The proxies the repo ships: deploy/Caddyfile (plain HTTP, compose.yaml) and deploy/Caddyfile.tls (a real
domain with automatic HTTPS, compose.tls.yaml), checked by Caddy itself (`caddy validate`, and `caddy
adapt` read back as JSON), and the compose files read as YAML: every image pinned by digest, the TLS
overlay wired to the replicas. `docker compose config` checks the merged files where the plugin exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML: mkdocs (the test extra) brings it

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CADDY = shutil.which("caddy")
DIGEST = re.compile(r"^[a-z0-9./-]+:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}$")
TLS_ENV = {"DOMAIN": "images.example.com", "ACME_EMAIL": "ops@example.com"}

needs_caddy = pytest.mark.skipif(CADDY is None, reason="caddy is not installed (Debian package caddy)")


def caddy(command: str, caddyfile: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert CADDY is not None
    clean = {k: v for k, v in os.environ.items() if k not in ("DOMAIN", "ACME_EMAIL", "RECEIVER_UPSTREAMS")}
    return subprocess.run(
        [CADDY, command, "--config", str(DEPLOY / caddyfile), "--adapter", "caddyfile"],
        env={**clean, **env, "HOME": str(ROOT / ".venv")},  # caddy would write under $HOME otherwise
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def adapted(caddyfile: str, env: dict[str, str]) -> dict[str, Any]:
    done = caddy("adapt", caddyfile, env)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def handlers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every handler of the config's HTTP routes, subroutes opened."""
    found: list[dict[str, Any]] = []

    def walk(routes: list[dict[str, Any]]) -> None:
        for route in routes:
            for handler in route.get("handle", []):
                found.append(handler)
                walk(handler.get("routes", []))

    for server in config["apps"]["http"]["servers"].values():
        walk(server["routes"])
    return found


def proxy_of(config: dict[str, Any]) -> dict[str, Any]:
    [proxy] = [handler for handler in handlers(config) if handler["handler"] == "reverse_proxy"]
    return proxy


@needs_caddy
@pytest.mark.parametrize(("caddyfile", "env"), [("Caddyfile", {}), ("Caddyfile.tls", TLS_ENV)])
def test_caddy_validates_both_caddyfiles(caddyfile: str, env: dict[str, str]) -> None:
    done = caddy("validate", caddyfile, env)
    assert done.returncode == 0, done.stderr
    assert "Valid configuration" in done.stdout + done.stderr


@needs_caddy
def test_both_proxies_stream_to_the_replicas_and_check_healthz() -> None:
    plain, tls = adapted("Caddyfile", {}), adapted("Caddyfile.tls", TLS_ENV)
    for config in (plain, tls):
        assert config["admin"] == {"disabled": True}
        proxy = proxy_of(config)
        assert [u["dial"] for u in proxy["upstreams"]] == ["api-1:8000", "api-2:8000"]
        assert proxy["health_checks"]["active"]["uri"] == "/healthz"
        assert proxy["flush_interval"] == -1
        assert proxy["load_balancing"]["selection_policy"] == {"policy": "round_robin"}
    [plain_server] = plain["apps"]["http"]["servers"].values()
    assert plain_server["listen"] == [":8080"]
    # The TLS site: the domain only, on 443 with the automatic redirect from 80, HSTS, the ACME email.
    [tls_server] = tls["apps"]["http"]["servers"].values()
    assert tls_server["listen"] == [":443"]
    assert tls_server["routes"][0]["match"] == [{"host": ["images.example.com"]}]
    assert "automatic_https" not in tls_server  # not switched off
    headers = [h for h in handlers(tls) if h["handler"] == "headers"]
    assert headers[0]["response"]["set"]["Strict-Transport-Security"] == ["max-age=31536000"]
    assert "ops@example.com" in json.dumps(tls["apps"].get("tls", {}))
    # RECEIVER_UPSTREAMS runs the same proxy outside compose.
    outside = proxy_of(adapted("Caddyfile", {"RECEIVER_UPSTREAMS": "127.0.0.1:8001 127.0.0.1:8002"}))
    assert [u["dial"] for u in outside["upstreams"]] == ["127.0.0.1:8001", "127.0.0.1:8002"]


@needs_caddy
def test_the_tls_caddyfile_refuses_to_start_without_a_domain() -> None:
    done = caddy("validate", "Caddyfile.tls", {"ACME_EMAIL": "ops@example.com"})
    assert done.returncode != 0


def compose(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return loaded


def test_every_image_is_pinned_by_digest() -> None:
    for name in ("compose.yaml", "compose.tls.yaml"):
        for service, spec in compose(name)["services"].items():
            image = spec.get("image")
            if image is None or "build" in spec:
                continue  # a replica: built here from the Dockerfile
            assert DIGEST.match(image), f"{name}: {service} runs {image!r}, not pinned by digest"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert base is not None and DIGEST.match(base.group(1)), "the Dockerfile's base is not pinned"


def test_the_tls_overlay_serves_the_replicas_on_the_domain() -> None:
    base, tls = compose("compose.yaml"), compose("compose.tls.yaml")
    required = "${DOMAIN:?"
    for replica in ("api-1", "api-2", "worker"):
        assert replica in base["services"]
        public = tls["services"][replica]["environment"]["RECEIVER_PUBLIC_URL"]
        assert public.startswith(f"https://{required}"), public
    proxy = tls["services"]["tls"]
    assert proxy["image"] == base["services"]["proxy"]["image"]
    assert {"80:80", "443:443", "443:443/udp"} <= set(proxy["ports"])
    volumes = set(proxy["volumes"])
    assert "./deploy/Caddyfile.tls:/etc/caddy/Caddyfile:ro" in volumes
    assert "./deploy/proxy.caddy:/etc/caddy/proxy.caddy:ro" in volumes
    assert "./deploy/proxy.caddy:/etc/caddy/proxy.caddy:ro" in base["services"]["proxy"]["volumes"]
    assert {"caddy-data:/data", "caddy-config:/config"} <= volumes
    assert set(tls["volumes"]) == {"caddy-data", "caddy-config"}
    assert proxy["environment"]["DOMAIN"].startswith(required)
    assert proxy["environment"]["ACME_EMAIL"].startswith("${ACME_EMAIL:?")
    assert proxy["networks"]["default"]["aliases"][0].startswith(required)


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    plugin = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    return [docker, "compose"] if plugin.returncode == 0 else None


@pytest.mark.skipif(_docker_compose() is None, reason="docker compose is not installed")
def test_docker_compose_merges_the_tls_overlay(tmp_path: Path) -> None:
    command = _docker_compose()
    assert command is not None
    env = {name: "x" * 40 for name in ("POSTGRES_PASSWORD", "MEDIA_SECRET_KEY", "MINIO_ROOT_PASSWORD")}
    env |= {"RECEIVER_API_KEYS": "app:" + "k" * 32, "RECEIVER_SECRET_KEY": "s" * 40, **TLS_ENV}
    env["RECEIVER_NOTIFY_SECRET"] = "whsec_" + "A" * 40
    done = subprocess.run(
        [*command, "-f", "compose.yaml", "-f", "compose.tls.yaml", "config", "--format", "json"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    merged = json.loads(done.stdout)["services"]
    for replica in ("api-1", "api-2", "worker"):
        assert merged[replica]["environment"]["RECEIVER_PUBLIC_URL"] == "https://images.example.com"
        assert merged[replica]["environment"]["RECEIVER_SECRET_KEY"] == env["RECEIVER_SECRET_KEY"]
