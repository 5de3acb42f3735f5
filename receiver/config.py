"""Settings read once from the environment; one clear line for each mistake."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import importlib.util
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from urllib.parse import SplitResult
from urllib.parse import urlsplit

from receiver.webhooks import MIN_SECRET_BYTES
from receiver.webhooks import secret_bytes


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
    notify_slots: int = 16  # notifications delivered at once by one worker process
    notify_per_tenant: int = 4  # RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT: of those, one tenant's at most
    reconcile_interval: float = 60.0
    sandbox_delay: float = 1.0
    http_timeout: float = 30.0
    sync_timeout: float = 300.0  # a synchronous provider's submit: the whole generation happens in it
    download_concurrency: int = 4
    download_timeout: float = (
        300.0  # RECEIVER_DOWNLOAD_TIMEOUT: one download attempt in all, trickling or not
    )
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
    max_waits_per_tenant: int = 50  # RECEIVER_MAX_WAITS_PER_TENANT: a tenant's open ?wait long-polls
    max_header_bytes: int = 16 * 1024
    database_url: str | None = None  # postgresql://…; None: SQLite in the data dir
    job_lease: float = 60.0  # seconds a claimed job stays with its process before others may take it
    download_process: bool = False  # RECEIVER_DOWNLOAD_PROCESS: downloads in a child process (fetcher.py)

    @property
    def max_waits(self) -> int | None:
        """Open ?wait long-polls of all tenants together: half the connections at most, so the other
        half is always there for lookups, callbacks and health checks."""
        return None if self.max_connections is None else max(1, self.max_connections // 2)

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


MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
# Numbers as an operator writes them: ASCII digits, a point, an exponent of a few digits. Not what
# float() also takes ("nan", "inf", "1_000", other scripts' digits).
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
_WHOLE = re.compile(r"[+-]?[0-9]{1,18}")
# A host name (underscores allowed: container networks use them) or an IPv4 address.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
# Where a variable's value is not UTF-8 text (the environment held other bytes), it is refused whole;
# RECEIVER_DATA_DIR is a path and may be any bytes.
OUR_PREFIXES = ("RECEIVER_", "KIE_", "APIMART_", "APICORE_", "FAL_", "SANDBOX_", "AWS_")


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0, maximum: float
) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not _DECIMAL.fullmatch(raw.strip()):
        raise ConfigError(f"{name} must be a number of seconds, got {_shown(raw)}")
    value = float(raw)
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be from {minimum:g} to {maximum:g} seconds, got {_shown(raw)}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not _WHOLE.fullmatch(raw.strip()):
        raise ConfigError(f"{name} must be a whole number, got {_shown(raw)}")
    value = int(raw)
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be from {minimum} to {maximum}, got {_shown(raw)}")
    return value


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = env.get(name) or default
    for value in allowed:
        if raw.lower() == value.lower():
            return value
    raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {_shown(raw)}")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {_shown(raw)}")


def _split(raw: str) -> SplitResult | None:
    """The URL's parts, its port checked (1 to 65535), or None when it is not one."""
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:  # "http://[", "http://h:abc", "http://h:99999"
        return None
    if port == 0 or parts.netloc.endswith(":"):
        return None
    return parts


def _url_problem(raw: str) -> str | None:
    """What is wrong with a base URL of ours or a provider's, or None."""
    if not raw.isascii() or any(char.isspace() or not char.isprintable() for char in raw):
        return "ASCII without spaces or control characters (an international name in its xn-- form)"
    parts = _split(raw)
    if parts is None:
        return "a host and, if any, a port from 1 to 65535"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "http:// or https:// and a host"
    if parts.query or parts.fragment or "?" in raw or "#" in raw:
        return "no query or fragment: paths are added to it"
    if "@" in parts.netloc:
        return "no user or password in it"
    host = parts.hostname
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "a host"
    elif not _HOST.fullmatch(host) or len(host) > 253:
        return "a host"
    return None


def _url(name: str, raw: str) -> str:
    problem = _url_problem(raw)
    if problem is not None:
        shown = _shown(raw) if "@" not in raw else "a URL with a user or password (not shown)"
        raise ConfigError(f"{name} must be an http(s) URL with {problem}, got {shown}")
    return raw.rstrip("/")


def _plain(name: str, value: str) -> str:
    """A key or token that goes into a header or a signature: printable ASCII, no spaces."""
    if not value.isascii() or any(char.isspace() or not char.isprintable() for char in value):
        raise ConfigError(f"{name} must be printable ASCII without spaces")
    return value


def _secret_key(value: str, origin: str) -> str:
    """RECEIVER_SECRET_KEY (or the one kept in the data dir): 32 characters or more, spaces aside."""
    if sum(not char.isspace() for char in value) < 32:
        raise ConfigError(f"{origin} must be at least 32 characters, not counting whitespace")
    return value


def _notify_secrets(value: str, origin: str) -> tuple[str, ...]:
    """RECEIVER_NOTIFY_SECRET (or the one kept): whsec_<base64> secrets of 24 bytes or more."""
    found = tuple(value.split())
    for secret in found:
        try:
            key = secret_bytes(secret) if secret.startswith("whsec_") else b""
        except ValueError:
            key = b""
        if len(key) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"{origin} must hold whsec_<base64> secrets of {MIN_SECRET_BYTES} bytes or more,"
                " separated by spaces"
            )
    if not found:
        raise ConfigError(f"{origin} names no whsec_ secret")
    return found


def _undecodable(env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if name.startswith(OUR_PREFIXES) and name != "RECEIVER_DATA_DIR":
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ConfigError(f"{name} is not UTF-8 text") from None


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
    parts = _split(raw)
    prefix = parts.path.strip("/") if parts else ""
    if (
        parts is None
        or parts.scheme != "s3"
        or not _BUCKET.match(parts.netloc)
        or (prefix and (not _PREFIX.match(prefix) or ".." in prefix.split("/")))
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(f"RECEIVER_MEDIA_URL must be s3://bucket or s3://bucket/prefix, got {_shown(raw)}")
    if "AWS_ENDPOINT_URL" in aws:
        aws["AWS_ENDPOINT_URL"] = _url("AWS_ENDPOINT_URL", aws["AWS_ENDPOINT_URL"])
    for name in AWS_VARIABLES[1:]:
        if name in aws:
            _plain(name, aws[name])
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
        key = key.strip()
        if not sep or not name.strip() or len(key) < 16 or not key.isascii() or not key.isprintable():
            raise ConfigError(
                "RECEIVER_API_KEYS must be name:key pairs separated by commas, keys of 16+ characters"
            )
        _plain("RECEIVER_API_KEYS", key)
        if key in keys:
            raise ConfigError("RECEIVER_API_KEYS lists the same key twice")
        keys[key] = name.strip()
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


def _delays(
    env: Mapping[str, str], name: str, default: tuple[float, ...], *, maximum: float
) -> tuple[float, ...]:
    raw = env.get(name)
    if not raw:
        return default
    parts = raw.split(",")
    if len(parts) > 100 or not all(_DECIMAL.fullmatch(part.strip()) for part in parts):
        raise ConfigError(f"{name} must be up to 100 comma-separated seconds, got {_shown(raw)}")
    values = tuple(float(part) for part in parts)
    if not all(0 <= value <= maximum for value in values):
        raise ConfigError(f"{name} must hold delays from 0 to {maximum:g} seconds, got {_shown(raw)}")
    return values


def _database_url(raw: str) -> str:
    """A PostgreSQL URL; the message never repeats it (it may hold a password)."""
    try:
        scheme = urlsplit(raw).scheme
    except ValueError:
        scheme = ""
    parts = _split(raw)
    if parts is None or parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        shown = f"{scheme}://…" if scheme else "a value that is not a URL"
        if parts is None and scheme:
            shown += " (its host or port cannot be read; a port is a number from 1 to 65535)"
        raise ConfigError(
            f"RECEIVER_DATABASE_URL must be postgresql://user:password@host:port/dbname, got {shown}"
        )
    return raw


SHARED_SECRETS = ("RECEIVER_SECRET_KEY", "RECEIVER_NOTIFY_SECRET", "RECEIVER_API_KEYS")


def _pacing(env: Mapping[str, str], provider: str) -> tuple[int | None, int | None]:
    """<NAME>_MAX_CONCURRENT and <NAME>_MAX_PER_MINUTE for a provider, when set."""
    prefix = provider.upper().replace("-", "_")
    concurrent, per_minute = (f"{prefix}_MAX_CONCURRENT", f"{prefix}_MAX_PER_MINUTE")
    return (
        _integer(env, concurrent, 0, minimum=1, maximum=10_000) if env.get(concurrent) else None,
        _integer(env, per_minute, 0, minimum=1, maximum=1_000_000) if env.get(per_minute) else None,
    )


def data_dir_of(env: Mapping[str, str]) -> Path:
    """RECEIVER_DATA_DIR as an absolute path, as it is (load_settings creates it; backup must not)."""
    return Path(env.get("RECEIVER_DATA_DIR") or "./data").resolve()


def load_settings(env: Mapping[str, str], *, host: str = "127.0.0.1", port: int = 8000) -> Settings:
    """Read every setting; create the data dir and the kept secrets. Raises ConfigError on a bad value."""
    _undecodable(env)
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

    listening = f"[{host}]" if ":" in host else host
    public_url = _url("RECEIVER_PUBLIC_URL", env.get("RECEIVER_PUBLIC_URL") or f"http://{listening}:{port}")

    if env.get("RECEIVER_SECRET_KEY"):
        secret_key = _secret_key(env["RECEIVER_SECRET_KEY"], "RECEIVER_SECRET_KEY")
    else:
        kept = _kept_secret(data_dir, "secret_key", secrets.token_urlsafe(48))
        secret_key = _secret_key(kept, f"RECEIVER_SECRET_KEY (kept in {data_dir / 'secret_key'})")

    dev_key_created = False
    if env.get("RECEIVER_API_KEYS"):
        api_keys = _api_keys(env["RECEIVER_API_KEYS"])
    else:
        dev_key = _kept_secret(data_dir, "dev_api_key", "dev_" + secrets.token_urlsafe(24))
        api_keys = {dev_key: "dev"}
        dev_key_created = True

    if env.get("RECEIVER_NOTIFY_SECRET"):
        notify_secrets = _notify_secrets(env["RECEIVER_NOTIFY_SECRET"], "RECEIVER_NOTIFY_SECRET")
    else:
        kept = _kept_secret(
            data_dir, "notify_secret", "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        )
        origin = f"RECEIVER_NOTIFY_SECRET (kept in {data_dir / 'notify_secret'})"
        notify_secrets = _notify_secrets(kept, origin)

    providers: dict[str, ProviderSettings] = {}
    for name, (key_var, base_var, base_default, extras) in PROVIDER_ENV.items():
        base = _url(base_var, env.get(base_var) or base_default)
        extra = {var: _plain(var, env[var]) for var in extras if env.get(var)}
        if name == "fal":
            extra["FAL_JWKS_URL"] = _url("FAL_JWKS_URL", env.get("FAL_JWKS_URL") or FAL_JWKS_DEFAULT)
        if name == "apicore":
            extra["APICORE_REQUIRE_SIGNATURE"] = "1" if _flag(env, "APICORE_REQUIRE_SIGNATURE") else "0"
        concurrent, per_minute = _pacing(env, name)
        providers[name] = ProviderSettings(
            api_key=_plain(key_var, env[key_var]) if env.get(key_var) else None,
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
    max_connections = _integer(env, "RECEIVER_MAX_CONNECTIONS", 1000, maximum=1_000_000) or None
    reconcile_after = _number(env, "RECEIVER_RECONCILE_AFTER", 300.0, minimum=0.0, maximum=30 * DAY)
    task_deadline = _number(env, "RECEIVER_TASK_DEADLINE", 3600.0, minimum=1.0, maximum=30 * DAY)
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
        max_image_bytes=_integer(env, "RECEIVER_MAX_IMAGE_BYTES", 52_428_800, minimum=1024, maximum=2**30),
        link_ttl=_integer(env, "RECEIVER_LINK_TTL", 604_800, minimum=1, maximum=int(365 * DAY)),
        providers=providers,
        submit_retries=_integer(env, "RECEIVER_SUBMIT_RETRIES", 5, maximum=100),
        retry_base=_number(env, "RECEIVER_RETRY_BASE", 1.0, maximum=HOUR),
        download_retry_delays=_delays(
            env, "RECEIVER_DOWNLOAD_RETRY_DELAYS", Settings.download_retry_delays, maximum=DAY
        ),
        reconcile_interval=_number(env, "RECEIVER_RECONCILE_INTERVAL", 60.0, minimum=0.01, maximum=DAY),
        sandbox_delay=_number(env, "RECEIVER_SANDBOX_DELAY", 1.0, maximum=HOUR),
        http_timeout=_number(env, "RECEIVER_HTTP_TIMEOUT", 30.0, minimum=0.1, maximum=HOUR),
        sync_timeout=_number(env, "RECEIVER_SYNC_TIMEOUT", 300.0, minimum=0.1, maximum=HOUR),
        download_concurrency=_integer(env, "RECEIVER_DOWNLOAD_CONCURRENCY", 4, minimum=1, maximum=256),
        download_timeout=_number(env, "RECEIVER_DOWNLOAD_TIMEOUT", 300.0, minimum=0.1, maximum=DAY),
        notify_schedule=_delays(env, "RECEIVER_NOTIFY_SCHEDULE", Settings.notify_schedule, maximum=7 * DAY),
        notify_timeout=_number(env, "RECEIVER_NOTIFY_TIMEOUT", 10.0, minimum=0.1, maximum=5 * MINUTE),
        dev_api_key_created=dev_key_created,
        log_level=_choice(env, "RECEIVER_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        log_format=_choice(env, "RECEIVER_LOG_FORMAT", ("auto", "json", "text"), "auto"),
        shutdown_grace=_number(env, "RECEIVER_SHUTDOWN_GRACE", 20.0, maximum=HOUR),
        key_set_refresh=_number(env, "RECEIVER_KEY_SET_REFRESH", 60.0, maximum=DAY),
        media_url=media_url,
        media_redirect=media_redirect,
        aws=aws,
        metrics_token=_metrics_token(env),
        body_timeout=_number(env, "RECEIVER_BODY_TIMEOUT", 30.0, minimum=0.1, maximum=HOUR),
        keep_alive=_number(env, "RECEIVER_KEEP_ALIVE", 5.0, minimum=0.1, maximum=HOUR),
        max_connections=max_connections,
        max_waits_per_tenant=_max_waits_per_tenant(env, max_connections),
        notify_per_tenant=_notify_per_tenant(env),
        max_header_bytes=_integer(
            env, "RECEIVER_MAX_HEADER_BYTES", 16 * 1024, minimum=1024, maximum=1024 * 1024
        ),
        database_url=database_url,
        job_lease=_number(env, "RECEIVER_JOB_LEASE", 60.0, minimum=1.0, maximum=DAY),
        download_process=_download_process(env),
    )


def _max_waits_per_tenant(env: Mapping[str, str], max_connections: int | None) -> int:
    """RECEIVER_MAX_WAITS_PER_TENANT: at least 1, and no more than all tenants' waits together may hold
    (half of RECEIVER_MAX_CONNECTIONS); unset, the default within that."""
    name = "RECEIVER_MAX_WAITS_PER_TENANT"
    most = None if max_connections is None else max(1, max_connections // 2)
    if not env.get(name):
        return Settings.max_waits_per_tenant if most is None else min(Settings.max_waits_per_tenant, most)
    value = _integer(env, name, Settings.max_waits_per_tenant, minimum=1, maximum=1_000_000)
    if most is not None and value > most:
        raise ConfigError(
            f"{name} must be at most half of RECEIVER_MAX_CONNECTIONS ({most}), got {env[name]!r}:"
            " long-polls must leave connections for everything else"
        )
    return value


def _notify_per_tenant(env: Mapping[str, str]) -> int:
    """RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT: from 1 to one less than the notification slots, so that
    no tenant's hanging hosts can take every slot."""
    name = "RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT"
    value = _integer(env, name, Settings.notify_per_tenant, minimum=1, maximum=1_000_000)
    if value >= Settings.notify_slots:
        raise ConfigError(
            f"{name} must be under {Settings.notify_slots} (the notifications delivered at once),"
            f" so one tenant never takes them all, got {env[name]!r}"
        )
    return value


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
    return _plain("RECEIVER_METRICS_TOKEN", token) if token is not None else None
