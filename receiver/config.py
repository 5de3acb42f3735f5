"""Settings read once from the environment; one clear line for each mistake."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import importlib.util
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A bad setting. The message names the variable and is meant for one line on stderr."""


@dataclass(frozen=True)
class ProviderSettings:
    """What the operator set for one provider; `api_key` None means the provider is not offered."""

    api_key: str | None
    base_url: str
    extra: Mapping[str, str] = field(default_factory=dict)
    max_concurrent: int | None = None  # <NAME>_MAX_CONCURRENT, overriding the provider's own default
    max_per_minute: int | None = None  # <NAME>_MAX_PER_MINUTE, likewise


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    public_url: str
    secret_key: str
    data_dir: Path
    api_keys: Mapping[str, str]  # key -> tenant name
    notify_secrets: tuple[str, ...]
    allow_private_urls: bool
    reconcile_after: float
    task_deadline: float
    max_image_bytes: int
    link_ttl: int
    providers: Mapping[str, ProviderSettings]
    # Schedules. Tests shrink these; operators rarely need to.
    submit_retries: int = 5
    retry_base: float = 1.0
    download_retry_delays: tuple[float, ...] = (2.0, 5.0, 15.0, 60.0, 300.0, 900.0)
    notify_schedule: tuple[float, ...] = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    notify_timeout: float = 10.0
    reconcile_interval: float = 60.0
    sandbox_delay: float = 1.0
    http_timeout: float = 30.0
    sync_timeout: float = 300.0  # a synchronous provider's submit: the whole generation happens in it
    download_concurrency: int = 4
    max_callback_bytes: int = 1024 * 1024
    dev_api_key_created: bool = False
    log_level: str = "INFO"
    log_format: str = "auto"
    shutdown_grace: float = 20.0
    key_set_refresh: float = 60.0  # least seconds between two fetches of a provider's key set (fal JWKS)
    media_url: str | None = None  # s3://bucket[/prefix]; None: the media directory under data_dir
    media_redirect: bool = False
    aws: Mapping[str, str] = field(default_factory=dict)  # the AWS_* variables the bucket is reached with
    metrics_token: str | None = None  # RECEIVER_METRICS_TOKEN: when set, /metrics wants it as a bearer
    # What one client may hold of the server (uvicorn's limits, and the body read in the app).
    body_timeout: float = 30.0
    keep_alive: float = 5.0
    max_connections: int | None = None
    max_header_bytes: int = 16 * 1024
    database_url: str | None = None  # postgresql://…; None: SQLite in the data dir
    job_lease: float = 60.0  # seconds a claimed job stays with its process before others may take it
    download_process: bool = False  # RECEIVER_DOWNLOAD_PROCESS: downloads in a child process (fetcher.py)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "receiver.db"

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    def provider(self, name: str) -> ProviderSettings:
        return self.providers.get(name, ProviderSettings(api_key=None, base_url=""))


# Each provider's variables: (key variable, base-url variable, default base URL, extra variables).
PROVIDER_ENV: Mapping[str, tuple[str, str, str, tuple[str, ...]]] = {
    "kie": ("KIE_API_KEY", "KIE_BASE_URL", "https://api.kie.ai", ("KIE_WEBHOOK_HMAC_KEY",)),
    "kie-market": ("KIE_API_KEY", "KIE_BASE_URL", "https://api.kie.ai", ("KIE_WEBHOOK_HMAC_KEY",)),
    "apimart": ("APIMART_API_KEY", "APIMART_BASE_URL", "https://api.apimart.ai", ()),
    "apicore": (
        "APICORE_API_KEY",
        "APICORE_BASE_URL",
        "https://api.apicore.ai",
        ("APICORE_REQUIRE_SIGNATURE",),
    ),
    "fal": ("FAL_KEY", "FAL_QUEUE_URL", "https://queue.fal.run", ("FAL_JWKS_URL",)),
}
FAL_JWKS_DEFAULT = "https://rest.fal.ai/.well-known/jwks.json"


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value < minimum or value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = env.get(name) or default
    for value in allowed:
        if raw.lower() == value.lower():
            return value
    raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def _url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
# S3's rules for a bucket name; a prefix is a plain relative path.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*$")


def _media(env: Mapping[str, str]) -> tuple[str | None, bool, dict[str, str]]:
    """RECEIVER_MEDIA_URL, RECEIVER_MEDIA_REDIRECT and the AWS_* variables, checked together."""
    raw = env.get("RECEIVER_MEDIA_URL") or ""
    redirect = _flag(env, "RECEIVER_MEDIA_REDIRECT")
    aws = {name: env[name] for name in AWS_VARIABLES if env.get(name)}
    if not raw:
        if redirect:
            raise ConfigError(
                "RECEIVER_MEDIA_REDIRECT=1 needs RECEIVER_MEDIA_URL (a bucket to presign links for)"
            )
        return None, False, {}
    parts = urlsplit(raw)
    prefix = parts.path.strip("/")
    if (
        parts.scheme != "s3"
        or not _BUCKET.match(parts.netloc)
        or (prefix and (not _PREFIX.match(prefix) or ".." in prefix.split("/")))
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(f"RECEIVER_MEDIA_URL must be s3://bucket or s3://bucket/prefix, got {raw!r}")
    if "AWS_ENDPOINT_URL" in aws:
        aws["AWS_ENDPOINT_URL"] = _url("AWS_ENDPOINT_URL", aws["AWS_ENDPOINT_URL"])
    if ("AWS_ACCESS_KEY_ID" in aws) != ("AWS_SECRET_ACCESS_KEY" in aws):
        raise ConfigError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together")
    return f"s3://{parts.netloc}" + (f"/{prefix}" if prefix else ""), redirect, aws


def _api_keys(raw: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, key = item.partition(":")
        if not sep or not name.strip() or len(key.strip()) < 16:
            raise ConfigError(
                "RECEIVER_API_KEYS must be name:key pairs separated by commas, keys of 16+ characters"
            )
        if key.strip() in keys:
            raise ConfigError("RECEIVER_API_KEYS lists the same key twice")
        keys[key.strip()] = name.strip()
    if not keys:
        raise ConfigError("RECEIVER_API_KEYS is set but names no key")
    return keys


def _kept_secret(data_dir: Path, filename: str, make: str) -> str:
    """A secret generated on first start and kept in the data dir, readable by the owner only."""
    path = data_dir / filename
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if value:
        return value
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(make + "\n")
    return make


def _delays(env: Mapping[str, str], name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = env.get(name)
    if not raw:
        return default
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated seconds, got {raw!r}") from None
    if any(v < 0 for v in values):
        raise ConfigError(f"{name} must not contain negative delays")
    return values


def _database_url(raw: str) -> str:
    """A PostgreSQL URL; the message never repeats it (it may hold a password)."""
    parts = urlsplit(raw)
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        shown = f"{parts.scheme}://…" if parts.scheme else "a value that is not a URL"
        raise ConfigError(
            f"RECEIVER_DATABASE_URL must be postgresql://user:password@host:port/dbname, got {shown}"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError("RECEIVER_DATABASE_URL has a port that is not a number") from None
    return raw


SHARED_SECRETS = ("RECEIVER_SECRET_KEY", "RECEIVER_NOTIFY_SECRET", "RECEIVER_API_KEYS")


def _base64_key(text: str) -> bytes:
    """The key bytes of a whsec_ secret (standard base64, padding optional); empty when it is not one."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        return b""


def _pacing(env: Mapping[str, str], provider: str) -> tuple[int | None, int | None]:
    """<NAME>_MAX_CONCURRENT and <NAME>_MAX_PER_MINUTE for a provider, when set."""
    prefix = provider.upper().replace("-", "_")
    concurrent, per_minute = (f"{prefix}_MAX_CONCURRENT", f"{prefix}_MAX_PER_MINUTE")
    return (
        _integer(env, concurrent, 0, minimum=1) if env.get(concurrent) else None,
        _integer(env, per_minute, 0, minimum=1) if env.get(per_minute) else None,
    )


def data_dir_of(env: Mapping[str, str]) -> Path:
    """RECEIVER_DATA_DIR as an absolute path, as it is (load_settings creates it; backup must not)."""
    return Path(env.get("RECEIVER_DATA_DIR") or "./data").resolve()


def load_settings(env: Mapping[str, str], *, host: str = "127.0.0.1", port: int = 8000) -> Settings:
    """Read every setting; create the data dir and the kept secrets. Raises ConfigError on a bad value."""
    data_dir = data_dir_of(env)
    try:
        (data_dir / "media").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"RECEIVER_DATA_DIR {str(data_dir)!r} cannot be created: {exc.strerror}") from None
    if not os.access(data_dir, os.W_OK):
        raise ConfigError(f"RECEIVER_DATA_DIR {str(data_dir)!r} is not writable")
    _private(data_dir)

    database_url = _database_url(env["RECEIVER_DATABASE_URL"]) if env.get("RECEIVER_DATABASE_URL") else None
    if database_url is not None and importlib.util.find_spec("asyncpg") is None:
        raise ConfigError("RECEIVER_DATABASE_URL needs asyncpg: pip install 'flux-receiver[postgres]'")
    missing = [name for name in SHARED_SECRETS if not env.get(name)]
    if database_url is not None and missing:
        # Replicas cannot each generate their own: a link signed by one must verify on every other.
        raise ConfigError(
            f"with RECEIVER_DATABASE_URL, set {' and '.join(missing)} (shared by every replica)"
        )

    public_url = _url("RECEIVER_PUBLIC_URL", env.get("RECEIVER_PUBLIC_URL") or f"http://{host}:{port}")

    secret_key = env.get("RECEIVER_SECRET_KEY") or ""
    if secret_key and len(secret_key) < 32:
        raise ConfigError("RECEIVER_SECRET_KEY must be at least 32 characters")
    if not secret_key:
        secret_key = _kept_secret(data_dir, "secret_key", secrets.token_urlsafe(48))

    dev_key_created = False
    if env.get("RECEIVER_API_KEYS"):
        api_keys = _api_keys(env["RECEIVER_API_KEYS"])
    else:
        dev_key = _kept_secret(data_dir, "dev_api_key", "dev_" + secrets.token_urlsafe(24))
        api_keys = {dev_key: "dev"}
        dev_key_created = True

    notify_raw = env.get("RECEIVER_NOTIFY_SECRET") or ""
    if not notify_raw:
        notify_raw = _kept_secret(
            data_dir, "notify_secret", "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        )
    notify_secrets = tuple(notify_raw.split())
    for secret in notify_secrets:
        if not secret.startswith("whsec_") or not _base64_key(secret.removeprefix("whsec_")):
            raise ConfigError("RECEIVER_NOTIFY_SECRET must hold whsec_<base64> secrets separated by spaces")

    providers: dict[str, ProviderSettings] = {}
    for name, (key_var, base_var, base_default, extras) in PROVIDER_ENV.items():
        base = _url(base_var, env.get(base_var) or base_default)
        extra = {var: env[var] for var in extras if env.get(var)}
        if name == "fal":
            extra["FAL_JWKS_URL"] = _url("FAL_JWKS_URL", env.get("FAL_JWKS_URL") or FAL_JWKS_DEFAULT)
        if name == "apicore":
            extra["APICORE_REQUIRE_SIGNATURE"] = "1" if _flag(env, "APICORE_REQUIRE_SIGNATURE") else "0"
        concurrent, per_minute = _pacing(env, name)
        providers[name] = ProviderSettings(
            api_key=env.get(key_var) or None,
            base_url=base,
            extra=extra,
            max_concurrent=concurrent,
            max_per_minute=per_minute,
        )

    # The built-in sandbox is always offered; it lives under our own URL, keyed by our own secret.
    sandbox_key = hmac.new(secret_key.encode(), b"receiver.sandbox", hashlib.sha256).hexdigest()
    concurrent, per_minute = _pacing(env, "sandbox")
    providers["sandbox"] = ProviderSettings(
        api_key=sandbox_key, base_url=public_url, max_concurrent=concurrent, max_per_minute=per_minute
    )

    media_url, media_redirect, aws = _media(env)
    reconcile_after = _number(env, "RECEIVER_RECONCILE_AFTER", 300.0, minimum=0.0)
    task_deadline = _number(env, "RECEIVER_TASK_DEADLINE", 3600.0, minimum=1.0)
    return Settings(
        host=host,
        port=port,
        public_url=public_url,
        secret_key=secret_key,
        data_dir=data_dir,
        api_keys=api_keys,
        notify_secrets=notify_secrets,
        allow_private_urls=_flag(env, "RECEIVER_ALLOW_PRIVATE_URLS"),
        reconcile_after=reconcile_after,
        task_deadline=task_deadline,
        max_image_bytes=_integer(env, "RECEIVER_MAX_IMAGE_BYTES", 52_428_800, minimum=1024),
        link_ttl=_integer(env, "RECEIVER_LINK_TTL", 604_800, minimum=1),
        providers=providers,
        submit_retries=_integer(env, "RECEIVER_SUBMIT_RETRIES", 5),
        retry_base=_number(env, "RECEIVER_RETRY_BASE", 1.0),
        download_retry_delays=_delays(
            env, "RECEIVER_DOWNLOAD_RETRY_DELAYS", (2.0, 5.0, 15.0, 60.0, 300.0, 900.0)
        ),
        reconcile_interval=_number(env, "RECEIVER_RECONCILE_INTERVAL", 60.0, minimum=0.01),
        sandbox_delay=_number(env, "RECEIVER_SANDBOX_DELAY", 1.0),
        http_timeout=_number(env, "RECEIVER_HTTP_TIMEOUT", 30.0, minimum=0.1),
        sync_timeout=_number(env, "RECEIVER_SYNC_TIMEOUT", 300.0, minimum=0.1),
        download_concurrency=_integer(env, "RECEIVER_DOWNLOAD_CONCURRENCY", 4, minimum=1),
        notify_schedule=_delays(env, "RECEIVER_NOTIFY_SCHEDULE", Settings.notify_schedule),
        notify_timeout=_number(env, "RECEIVER_NOTIFY_TIMEOUT", 10.0, minimum=0.1),
        dev_api_key_created=dev_key_created,
        log_level=_choice(env, "RECEIVER_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        log_format=_choice(env, "RECEIVER_LOG_FORMAT", ("auto", "json", "text"), "auto"),
        shutdown_grace=_number(env, "RECEIVER_SHUTDOWN_GRACE", 20.0),
        key_set_refresh=_number(env, "RECEIVER_KEY_SET_REFRESH", 60.0),
        media_url=media_url,
        media_redirect=media_redirect,
        aws=aws,
        metrics_token=_metrics_token(env),
        body_timeout=_number(env, "RECEIVER_BODY_TIMEOUT", 30.0, minimum=0.1),
        keep_alive=_number(env, "RECEIVER_KEEP_ALIVE", 5.0, minimum=0.1),
        max_connections=_integer(env, "RECEIVER_MAX_CONNECTIONS", 1000, minimum=0) or None,
        max_header_bytes=_integer(env, "RECEIVER_MAX_HEADER_BYTES", 16 * 1024, minimum=1024),
        database_url=database_url,
        job_lease=_number(env, "RECEIVER_JOB_LEASE", 60.0, minimum=1.0),
        download_process=_download_process(env),
    )


def _download_process(env: Mapping[str, str]) -> bool:
    """RECEIVER_DOWNLOAD_PROCESS: auto (a child when this process may use two cores or more), 1 or 0."""
    chosen = _choice(env, "RECEIVER_DOWNLOAD_PROCESS", ("auto", "1", "0"), "auto")
    if chosen == "auto":
        return (
            len(os.sched_getaffinity(0)) >= 2
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1) >= 2
        )
    return chosen == "1"


def _private(data_dir: Path) -> None:
    """The database holds per-task webhook secrets, media holds tenants' images: the service's user
    only. The data and media directories become 0700 and the database file 0600 (made here, empty,
    if new: SQLite keeps its mode for the -wal and -shm files). `serve` also sets umask 077."""
    for folder in (data_dir, data_dir / "media"):
        with contextlib.suppress(PermissionError):  # not ours to change: the operator chose its modes
            folder.chmod(0o700)
    database = data_dir / "receiver.db"
    with contextlib.suppress(PermissionError):
        os.close(os.open(database, os.O_CREAT | os.O_WRONLY, 0o600))
        database.chmod(0o600)


def _metrics_token(env: Mapping[str, str]) -> str | None:
    token = env.get("RECEIVER_METRICS_TOKEN") or None
    if token is not None and len(token) < 16:
        raise ConfigError("RECEIVER_METRICS_TOKEN must be at least 16 characters")
    return token
