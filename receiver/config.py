"""Settings: the table of every variable the service reads, and `Settings` built from it.

Each variable is declared once below (or, for a provider's own, in its provider module) with its parser
and range, default, help line and section; `load_settings` reads and checks them, one clear line for
each mistake, and writes nothing. `prepare_settings` is `serve`'s step that also makes the data dir,
the media dir and the secrets kept there. The docs' configuration tables (scripts/docs_hooks.py) and
`receiver config` (`effective`) are rendered from the same table.
"""

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
from typing import Any
from urllib.parse import urlsplit

from receiver.prices import DEFAULT_PRICES
from receiver.prices import PriceTable
from receiver.prices import load_prices
from receiver.providers import REGISTRY
from receiver.providers import Provider
from receiver.variables import DAY
from receiver.variables import HOUR
from receiver.variables import MINUTE
from receiver.variables import Check
from receiver.variables import Choice
from receiver.variables import ConfigError
from receiver.variables import Delays
from receiver.variables import Flag
from receiver.variables import Kept
from receiver.variables import Plain
from receiver.variables import ProviderSettings
from receiver.variables import Seconds
from receiver.variables import Url
from receiver.variables import Variable
from receiver.variables import Whole
from receiver.variables import as_text
from receiver.variables import notify_secrets
from receiver.variables import secret_key
from receiver.variables import shown
from receiver.variables import split_url

__all__ = ["ConfigError", "ProviderSettings", "Settings", "load_settings", "prepare_settings"]

NOTIFY_SLOTS = 16  # notifications delivered at once by one worker process (not a setting)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting, read from the table below; field names follow the variables' (RECEIVER_LINK_TTL is
    `link_ttl`). No field has a default here: the table states each one."""

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
    submit_retries: int
    retry_base: float
    download_retry_delays: tuple[float, ...]
    notify_schedule: tuple[float, ...]
    notify_timeout: float
    notify_per_tenant: int  # of the notification slots, one tenant's at most
    reconcile_interval: float
    sandbox_delay: float
    http_timeout: float
    sync_timeout: float  # a synchronous provider's submit: the whole generation happens in it
    download_concurrency: int
    download_timeout: float  # one download attempt in all, trickling or not
    dev_api_key_created: bool  # RECEIVER_API_KEYS unset: `serve` prints the development key
    log_level: str
    log_format: str
    shutdown_grace: float
    key_set_refresh: float  # least seconds between two fetches of a provider's key set (fal JWKS)
    media_url: str | None  # s3://bucket[/prefix]; None: the media directory under data_dir
    media_redirect: bool
    aws: Mapping[str, str]  # the AWS_* variables the bucket is reached with
    metrics_token: str | None  # when set, /metrics wants it as a bearer
    admin_key: str | None  # when set, /v1/admin/* wants it as a bearer; unset, /v1/admin/* is a 404
    # What one client may hold of the server (uvicorn's limits, and the body read in the app).
    body_timeout: float
    keep_alive: float
    max_connections: int | None  # None: no limit
    max_waits_per_tenant: int  # a tenant's open ?wait long-polls
    max_header_bytes: int
    database_url: str | None  # postgresql://…; None: SQLite in the data dir
    job_lease: float  # seconds a claimed job stays with its process before others may take it
    download_process: bool  # downloads in a child process (fetcher.py)
    prices: PriceTable = field(default_factory=lambda: DEFAULT_PRICES)  # RECEIVER_PRICES over the built-in
    cooldown_failures: int = 3  # provider-side failures in a row that start a provider's cooldown
    cooldown_seconds: float = 60.0  # how long `auto` routing skips a provider in cooldown
    # Constants of the service, not settings.
    notify_slots: int = NOTIFY_SLOTS
    max_callback_bytes: int = 1024 * 1024  # a callback body's cap (CONTRACT: 413 over 1 MiB)

    @property
    def max_waits(self) -> int | None:
        """Open ?wait long-polls of all tenants together: half the connections at most, so the other
        half is always there for lookups, callbacks and health checks."""
        return waits_cap(self.max_connections)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "receiver.db"

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    def provider(self, name: str) -> ProviderSettings:
        return self.providers.get(name, ProviderSettings(api_key=None, base_url=""))


def waits_cap(max_connections: int | None) -> int | None:
    """Half the connections at most, so the other half is always there for everything else."""
    return None if max_connections is None else max(1, max_connections // 2)


# -- the parsers with a shape of their own ----------------------------------------------------------

# S3's rules for a bucket name; a prefix is a plain relative path.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*$")


def _media_url(name: str, raw: str) -> str:
    parts = split_url(raw)
    prefix = parts.path.strip("/") if parts else ""
    if (
        parts is None
        or parts.scheme != "s3"
        or not _BUCKET.match(parts.netloc)
        or (prefix and (not _PREFIX.match(prefix) or ".." in prefix.split("/")))
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(f"{name} must be s3://bucket or s3://bucket/prefix, got {shown(raw)}")
    return f"s3://{parts.netloc}" + (f"/{prefix}" if prefix else "")


def _api_keys(name: str, raw: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        key = key.strip()
        if not sep or not tenant.strip() or len(key) < 16 or not key.isascii() or not key.isprintable():
            raise ConfigError(f"{name} must be name:key pairs separated by commas, keys of 16+ characters")
        Plain()(name, key)
        if key in keys:
            raise ConfigError(f"{name} lists the same key twice")
        keys[key] = tenant.strip()
    if not keys:
        raise ConfigError(f"{name} is set but names no key")
    return keys


def _database_url(name: str, raw: str) -> str:
    """A PostgreSQL URL; the message never repeats it (it may hold a password)."""
    try:
        scheme = urlsplit(raw).scheme
    except ValueError:
        scheme = ""
    parts = split_url(raw)
    if parts is None or parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        said = f"{scheme}://…" if scheme else "a value that is not a URL"
        if parts is None and scheme:
            said += " (its host or port cannot be read; a port is a number from 1 to 65535)"
        raise ConfigError(f"{name} must be postgresql://user:password@host:port/dbname, got {said}")
    return raw


def _notify_per_tenant(name: str, raw: str) -> int:
    """From 1 to one less than the notification slots, so that no tenant's hanging hosts can take every
    slot."""
    value: int = Whole(1, 1_000_000)(name, raw)
    if value >= NOTIFY_SLOTS:
        raise ConfigError(
            f"{name} must be under {NOTIFY_SLOTS} (the notifications delivered at once),"
            f" so one tenant never takes them all, got {raw!r}"
        )
    return value


# -- the table --------------------------------------------------------------------------------------

KEPT_IN_DATA_DIR = "generated once, kept in the data dir"
SERVICE = (
    Variable(
        "RECEIVER_PUBLIC_URL",
        Url(),
        help="base URL at which providers and browsers reach this service (https in production)",
        shown_default="`http://HOST:PORT`",
    ),
    Variable(
        "RECEIVER_SECRET_KEY",
        Check(secret_key),
        help="key for callback tokens and signed links (≥ 32 characters, whitespace not counted)",
        shown_default=KEPT_IN_DATA_DIR,
        secret=True,
        kept=Kept("secret_key", lambda: secrets.token_urlsafe(48)),
    ),
    Variable("RECEIVER_DATA_DIR", Check(lambda name, raw: raw), "./data", "database and media"),
    Variable(
        "RECEIVER_API_KEYS",
        Check(_api_keys),
        help="`name:key,name:key` — each name is a tenant; keys ≥ 16 chars",
        shown_default="none: `serve` creates a dev key, prints it and keeps it in"
        " `$RECEIVER_DATA_DIR/dev_api_key`",
        secret=True,
        # The development key alone is kept (the file is what a developer reads it from).
        kept=Kept("dev_api_key", lambda: "dev_" + secrets.token_urlsafe(24), lambda name, key: {key: "dev"}),
    ),
    Variable(
        "RECEIVER_NOTIFY_SECRET",
        Check(notify_secrets),
        help="`whsec_…` secret(s) for outbound [notifications](notifications.md), space-separated for"
        " rotation; each `whsec_` + base64 of 24 bytes or more",
        shown_default=KEPT_IN_DATA_DIR,
        secret=True,
        field="notify_secrets",
        kept=Kept("notify_secret", lambda: "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()),
    ),
    Variable(
        "RECEIVER_ALLOW_PRIVATE_URLS",
        Flag(),
        False,
        "`1` lets downloads, input image URLs and notify URLs reach loopback/private addresses (local"
        " testing only)",
    ),
    Variable(
        "RECEIVER_RECONCILE_AFTER",
        Seconds(0.0, 30 * DAY),
        300.0,
        "seconds without a callback, counted from the provider's acceptance, before its status endpoint"
        " is asked",
    ),
    Variable(
        "RECEIVER_TASK_DEADLINE",
        Seconds(1.0, 30 * DAY),
        3600.0,
        "seconds after which an unfinished task fails with `timed_out`",
    ),
    Variable(
        "RECEIVER_MAX_IMAGE_BYTES",
        Whole(1024, 2**30),
        52_428_800,
        "largest image downloaded or uploaded",
    ),
    Variable(
        "RECEIVER_LINK_TTL",
        Whole(1, int(365 * DAY), unit="s"),
        604_800,
        "seconds a signed image or upload link stays valid",
    ),
    Variable(
        "RECEIVER_METRICS_TOKEN",
        Plain(least=16),
        help="when set (≥ 16 chars), `GET /metrics` wants `Authorization: Bearer <token>` and answers"
        " 401 otherwise; unset, `/metrics` is open (keep it behind your proxy)",
        secret=True,
    ),
    Variable(
        "RECEIVER_ADMIN_KEY",
        Plain(least=32),
        help="when set (≥ 32 chars), the [admin API](keys.md) (`/v1/admin/*`: keys in the database,"
        " every tenant's usage) wants `Authorization: Bearer <key>`; unset, `/v1/admin/*` is a 404",
        secret=True,
    ),
    Variable(
        "RECEIVER_LOG_LEVEL", Choice(("DEBUG", "INFO", "WARNING", "ERROR")), "INFO", "the least level logged"
    ),
    Variable(
        "RECEIVER_LOG_FORMAT",
        Choice(("auto", "json", "text")),
        "auto",
        "`auto` is text on a terminal, JSON elsewhere",
    ),
    Variable(
        "RECEIVER_SHUTDOWN_GRACE",
        Seconds(0.0, HOUR),
        20.0,
        "seconds in-flight work may finish after SIGTERM",
    ),
)

SCHEDULES = (
    Variable(
        "RECEIVER_SUBMIT_RETRIES",
        Whole(0, 100),
        5,
        "retries of a submit that surely never reached the provider (connection error, 429, 5xx; see"
        " [Submits that may have run](how-it-works.md#submits-that-may-have-run)), before"
        " `provider_unavailable`",
    ),
    Variable(
        "RECEIVER_RETRY_BASE",
        Seconds(0.0, HOUR),
        1.0,
        "first submit backoff in seconds (doubles each try, +0 to 25 % jitter; `Retry-After` wins when"
        " longer)",
    ),
    Variable(
        "RECEIVER_DOWNLOAD_RETRY_DELAYS",
        Delays(DAY),
        (2.0, 5.0, 15.0, 60.0, 300.0, 900.0),
        "comma-separated seconds between download tries; the first three within 30 s",
    ),
    Variable(
        "RECEIVER_RECONCILE_INTERVAL",
        Seconds(0.01, DAY),
        60.0,
        "first interval between status queries (doubles, at most 600 s)",
    ),
    Variable("RECEIVER_HTTP_TIMEOUT", Seconds(0.1, HOUR), 30.0, "seconds for each outbound HTTP call"),
    Variable(
        "RECEIVER_SYNC_TIMEOUT",
        Seconds(0.1, HOUR),
        300.0,
        "seconds a synchronous provider's submit (apicore: the whole generation happens inside it) may take",
    ),
    Variable(
        "RECEIVER_KEY_SET_REFRESH",
        Seconds(0.0, DAY),
        60.0,
        "least seconds between two fetches of a provider's key set (fal's JWKS) when no key verifies",
    ),
    Variable(
        "RECEIVER_DOWNLOAD_CONCURRENCY",
        Whole(1, 256),
        4,
        "downloads at once (kept small so callbacks stay fast)",
    ),
    Variable(
        "RECEIVER_DOWNLOAD_TIMEOUT",
        Seconds(0.1, DAY),
        300.0,
        "seconds one download try may take in all, however steadily the bytes come"
        " (`RECEIVER_HTTP_TIMEOUT` bounds each read); past it the try counts as a timeout and is retried"
        " on `RECEIVER_DOWNLOAD_RETRY_DELAYS`",
    ),
    Variable(
        "RECEIVER_DOWNLOAD_PROCESS",
        Choice(("auto", "1", "0")),
        "auto",
        "`1`: downloads (HTTP, sha256, the write to the media store) run in a child process that the"
        " worker starts with the first download, so they never share a core with the answers to"
        " callbacks; the child writes no database, the worker records what it stored (see"
        " [Benchmarks](benchmarks.md)). `0`: on the worker's own event loop. `auto`: `1` when the"
        " process may use two cores or more",
    ),
    Variable("RECEIVER_SANDBOX_DELAY", Seconds(0.0, HOUR), 1.0, 'seconds the sandbox takes to "generate"'),
    Variable(
        "RECEIVER_NOTIFY_SCHEDULE",
        Delays(7 * DAY),
        (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0),
        "comma-separated seconds between notify attempts (the first is immediate); its length + 1 is"
        " the number of attempts",
    ),
    Variable(
        "RECEIVER_NOTIFY_TIMEOUT",
        Seconds(0.1, 5 * MINUTE),
        10.0,
        "seconds one notify attempt may take, all in",
    ),
    Variable(
        "RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT",
        Check(_notify_per_tenant),
        4,
        f"notifications of one tenant delivered at once, of the worker's {NOTIFY_SLOTS} (1 to"
        f" {NOTIFY_SLOTS - 1}; see [Fairness between tenants](how-it-works.md#fairness-between-tenants))",
        field="notify_per_tenant",
    ),
)

LIMITS = (
    Variable(
        "RECEIVER_BODY_TIMEOUT",
        Seconds(0.1, HOUR),
        30.0,
        "seconds a request body (create, upload, callback) may take to arrive, whole; then a 408"
        " `body_timeout`",
    ),
    Variable(
        "RECEIVER_KEEP_ALIVE",
        Seconds(0.1, HOUR),
        5.0,
        "seconds an idle keep-alive connection is kept open (uvicorn's `timeout_keep_alive`)",
    ),
    Variable(
        "RECEIVER_MAX_CONNECTIONS",
        Whole(0, 1_000_000),
        1000,
        "open connections at once; past it a new request is answered 503 at once (uvicorn's"
        " `limit_concurrency`); `0` for no limit",
    ),
    Variable(
        "RECEIVER_MAX_WAITS_PER_TENANT",
        Whole(1, 1_000_000),
        50,
        "`?wait` long-polls one tenant may hold open at once (per process); past it `?wait` answers at"
        " once. At most half of `RECEIVER_MAX_CONNECTIONS`",
        shown_default="`50` (or that half, if smaller)",
    ),
    Variable(
        "RECEIVER_MAX_HEADER_BYTES",
        Whole(1024, 1024 * 1024),
        16 * 1024,
        "bytes of an unfinished request head (uvicorn's `h11_max_incomplete_event_size`; with the `fast`"
        " extra httptools applies its own limit)",
    ),
)

# Prices and `"provider": "auto"` routing (docs/keys.md).
ROUTING = (
    Variable(
        "RECEIVER_PRICES",
        Check(load_prices),
        help="a JSON or TOML file (`.toml`) of prices per provider and model, in USD, over the built-in"
        ' ones: `{"fal": {"flux-kontext-pro": {"per_image": 0.04}}}`; see'
        " [Prices](keys.md#prices)",
        shown_default="the built-in prices",
    ),
    Variable(
        "RECEIVER_COOLDOWN_FAILURES",
        Whole(1, 1000),
        3,
        "provider-side failures in a row (unavailable, timeouts, 5xx; not a 429 pacing hold, not a"
        " refused request) after which `auto` routing skips the provider for `RECEIVER_COOLDOWN_SECONDS`",
    ),
    Variable(
        "RECEIVER_COOLDOWN_SECONDS",
        Seconds(0.1, DAY),
        60.0,
        "seconds a provider stays in cooldown for `auto` routing; then the next `auto` task tries it",
    ),
)

STORAGE = (
    Variable(
        "RECEIVER_DATABASE_URL",
        Check(_database_url),
        help="`postgresql://user:password@host:port/dbname`; needs the `postgres` extra (`pip install"
        " '.[postgres]'`; in the Docker image)",
        shown_default="unset: SQLite at `$RECEIVER_DATA_DIR/receiver.db`",
        secret=True,  # it may hold a password
        backends=("PostgreSQL",),
    ),
    Variable(
        "RECEIVER_JOB_LEASE",
        Seconds(1.0, DAY),
        60.0,
        "seconds a claimed job stays with the process that claimed it; a process that died loses its"
        " jobs to the others after this",
    ),
    Variable(
        "RECEIVER_MEDIA_URL",
        Check(_media_url),
        help="`s3://bucket` or `s3://bucket/prefix`: images, uploads (and the sandbox's pictures) in that"
        " bucket, under the prefix",
        shown_default="unset: `$RECEIVER_DATA_DIR/media/`",
        backends=("S3 media",),
    ),
    Variable(
        "RECEIVER_MEDIA_REDIRECT",
        Flag(),
        False,
        "`1`: an image or upload link answers `302` to a presigned URL of the object, valid 5 minutes,"
        " instead of streaming the bytes through the service; needs `RECEIVER_MEDIA_URL` and an endpoint"
        " your users can reach",
        backends=("S3 media",),
    ),
)
# Read only with RECEIVER_MEDIA_URL set.
AWS = (
    Variable(
        "AWS_ENDPOINT_URL",
        Url(),
        help="the S3 API's base URL, for MinIO, Cloudflare R2, Ceph … (`http://` is allowed for a private"
        " endpoint)",
        shown_default="AWS for `AWS_REGION`",
        backends=("S3 media",),
    ),
    Variable(
        "AWS_REGION", Plain(), help="the bucket's region", shown_default="`us-east-1`", backends=("S3 media",)
    ),
    Variable(
        "AWS_ACCESS_KEY_ID",
        Plain(),
        help="credentials; set both or neither (neither: the usual AWS chain, e.g. an instance role)",
        backends=("S3 media",),
    ),
    Variable(
        "AWS_SECRET_ACCESS_KEY",
        Plain(),
        help="the secret of `AWS_ACCESS_KEY_ID`",
        secret=True,
        backends=("S3 media",),
    ),
    Variable(
        "AWS_SESSION_TOKEN",
        Plain(),
        help="a session token for temporary credentials",
        secret=True,
        backends=("S3 media",),
    ),
)


def _pacing_default(provider: Provider, kind: str) -> str:
    """The documented limit a <NAME>_MAX_* variable overrides, as the provider declares it."""
    if provider.pace_group not in (None, provider.name):
        return f"{provider.pace_group}'s (one account): set `{_prefix(provider.pace_group)}_{kind}`"
    if kind == "MAX_PER_MINUTE":
        if provider.rate_limit is None:
            return "none"
        count, seconds = provider.rate_limit
        return f"{count} per {seconds:g} s"
    if provider.max_concurrent is None:
        return "none"
    by_model = "; ".join(
        f"{count} for `{model}`" for model, count in provider.max_concurrent_by_model.items()
    )
    return f"{provider.max_concurrent}" + (f" ({by_model})" if by_model else "")


def _prefix(provider: str) -> str:
    return provider.upper().replace("-", "_")


def pacing_variables(provider: Provider) -> tuple[Variable, Variable]:
    """<NAME>_MAX_CONCURRENT and <NAME>_MAX_PER_MINUTE: every provider's, overriding its own limits."""
    prefix = _prefix(provider.name)
    return (
        Variable(
            f"{prefix}_MAX_CONCURRENT",
            Whole(1, 10_000),
            help=f"tasks {provider.name} may have accepted and unfinished at once",
            shown_default=_pacing_default(provider, "MAX_CONCURRENT"),
        ),
        Variable(
            f"{prefix}_MAX_PER_MINUTE",
            Whole(1, 1_000_000),
            help=f"new tasks {provider.name} may be sent per minute",
            shown_default=_pacing_default(provider, "MAX_PER_MINUTE"),
        ),
    )


def provider_variables() -> tuple[Variable, ...]:
    """The providers' own variables, each once (kie and kie-market share kie's), in registry order."""
    found: dict[str, Variable] = {}
    for provider in REGISTRY.values():
        for var in provider.variables.all():
            found.setdefault(var.name, var)
    return tuple(found.values())


PACING = tuple(var for provider in REGISTRY.values() for var in pacing_variables(provider))
# Sections in the order the docs show them (docs/operations.md has a marker for each).
SECTIONS: Mapping[str, tuple[Variable, ...]] = {
    "service": SERVICE,
    "providers": provider_variables(),
    "pacing": PACING,
    "routing": ROUTING,
    "schedules": SCHEDULES,
    "limits": LIMITS,
    "storage": (*STORAGE, *AWS),
}
VARIABLES: Mapping[str, Variable] = {var.name: var for section in SECTIONS.values() for var in section}


KEPT = tuple(var for var in SERVICE if var.kept is not None)  # secrets generated once, kept in the data dir
SHARED_SECRETS = tuple(var.name for var in KEPT)  # every replica must be given the same


# -- reading ----------------------------------------------------------------------------------------

# Where a variable's value is not UTF-8 text (the environment held other bytes), it is refused whole;
# RECEIVER_DATA_DIR is a path and may be any bytes.
OUR_PREFIXES = ("RECEIVER_", "KIE_", "APIMART_", "APICORE_", "FAL_", "SANDBOX_", "AWS_")


def _undecodable(env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if name.startswith(OUR_PREFIXES) and name != "RECEIVER_DATA_DIR":
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ConfigError(f"{name} is not UTF-8 text") from None


@dataclass
class Reading:
    """Every variable's value and where it came from: "environment", "default", "data dir" (a kept
    secret) or "generated" (one not kept yet: `prepare_settings` keeps it)."""

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def take(self, var: Variable, env: Mapping[str, str]) -> Any:
        self.values[var.name], self.origins[var.name] = var.read(env)
        return self.values[var.name]


def data_dir_of(env: Mapping[str, str]) -> Path:
    """RECEIVER_DATA_DIR as an absolute path, as it is (prepare_settings creates it; backup must not)."""
    return Path(VARIABLES["RECEIVER_DATA_DIR"].read(env)[0]).resolve()


def _read(env: Mapping[str, str], host: str, port: int) -> tuple[Settings, Reading]:
    _undecodable(env)
    reading = Reading()
    for var in VARIABLES.values():
        if var not in AWS:  # those only with a bucket (below): elsewhere they may be other programs'
            reading.take(var, env)
    values = reading.values
    data_dir = data_dir_of(env)

    database_url = values["RECEIVER_DATABASE_URL"]
    if database_url is not None and importlib.util.find_spec("asyncpg") is None:
        raise ConfigError("RECEIVER_DATABASE_URL needs asyncpg: pip install 'flux-receiver[postgres]'")
    missing = [name for name in SHARED_SECRETS if reading.origins[name] == "default"]
    if database_url is not None and missing:
        # Replicas cannot each generate their own: a link signed by one must verify on every other.
        raise ConfigError(
            f"with RECEIVER_DATABASE_URL, set {' and '.join(missing)} (shared by every replica)"
        )
    for var in KEPT:
        if reading.origins[var.name] == "default" and var.kept is not None:
            found = var.kept.read(var.name, data_dir)
            reading.origins[var.name] = "data dir" if found else "generated"
            origin = f"{var.name} (kept in {data_dir / var.kept.filename})"
            values[var.name] = (var.kept.use or var.parse)(origin, found or var.kept.make())

    listening = f"[{host}]" if ":" in host else host
    public_url = values["RECEIVER_PUBLIC_URL"] or f"http://{listening}:{port}"
    values["RECEIVER_PUBLIC_URL"] = public_url
    media_url, redirect = values["RECEIVER_MEDIA_URL"], values["RECEIVER_MEDIA_REDIRECT"]
    if redirect and media_url is None:
        raise ConfigError(
            "RECEIVER_MEDIA_REDIRECT=1 needs RECEIVER_MEDIA_URL (a bucket to presign links for)"
        )
    aws = _aws(env, reading) if media_url is not None else {}

    max_connections = values["RECEIVER_MAX_CONNECTIONS"] or None
    fields = {
        var.field or var.name.removeprefix("RECEIVER_").lower(): values[var.name]
        for var in (*SERVICE, *SCHEDULES, *LIMITS, *STORAGE, *ROUTING)
    }
    fields["prices"] = values["RECEIVER_PRICES"] or DEFAULT_PRICES
    fields |= {
        "data_dir": data_dir,
        "public_url": public_url,
        "max_connections": max_connections,
        "max_waits_per_tenant": _max_waits_per_tenant(env, reading, max_connections),
        "download_process": _download_process(values["RECEIVER_DOWNLOAD_PROCESS"]),
    }
    settings = Settings(
        host=host,
        port=port,
        providers=_providers(reading, public_url),
        aws=aws,
        dev_api_key_created=reading.origins["RECEIVER_API_KEYS"] != "environment",
        **fields,
    )
    return settings, reading


def _aws(env: Mapping[str, str], reading: Reading) -> dict[str, str]:
    """The AWS_* variables the bucket is reached with, checked together."""
    aws = {var.name: value for var in AWS if (value := reading.take(var, env)) is not None}
    if ("AWS_ACCESS_KEY_ID" in aws) != ("AWS_SECRET_ACCESS_KEY" in aws):
        raise ConfigError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together")
    return aws


def _providers(reading: Reading, public_url: str) -> dict[str, ProviderSettings]:
    values = reading.values
    providers: dict[str, ProviderSettings] = {}
    for name, provider in REGISTRY.items():
        declared = provider.variables
        concurrent, per_minute = (values[var.name] for var in pacing_variables(provider))
        if declared.key is None or declared.base_url is None:
            # The built-in sandbox is always offered; it lives under our own URL, keyed by our own secret.
            secret = values["RECEIVER_SECRET_KEY"].encode()
            api_key: str | None = hmac.new(secret, b"receiver.sandbox", hashlib.sha256).hexdigest()
            base_url, extra = public_url, {}
        else:
            api_key, base_url = values[declared.key.name], values[declared.base_url.name]
            extra = {
                var.name: as_text(values[var.name]) for var in declared.extra if values[var.name] is not None
            }
        providers[name] = ProviderSettings(
            api_key=api_key,
            base_url=base_url,
            extra=extra,
            max_concurrent=concurrent,
            max_per_minute=per_minute,
        )
    return providers


def _max_waits_per_tenant(env: Mapping[str, str], reading: Reading, max_connections: int | None) -> int:
    """At least 1, and no more than all tenants' waits together may hold (half of
    RECEIVER_MAX_CONNECTIONS); unset, the default within that."""
    name = "RECEIVER_MAX_WAITS_PER_TENANT"
    value: int = reading.values[name]
    most = waits_cap(max_connections)
    if most is None or value <= most:
        return value
    if reading.origins[name] == "default":
        return most
    raise ConfigError(
        f"{name} must be at most half of RECEIVER_MAX_CONNECTIONS ({most}), got {env[name]!r}:"
        " long-polls must leave connections for everything else"
    )


def _download_process(chosen: str) -> bool:
    """auto: a child when this process may use two cores or more."""
    if chosen == "auto":
        return (
            len(os.sched_getaffinity(0)) >= 2
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1) >= 2
        )
    return chosen == "1"


def load_settings(env: Mapping[str, str], *, host: str = "127.0.0.1", port: int = 8000) -> Settings:
    """Read and check every setting; write nothing. A secret neither given nor kept in the data dir yet
    is made up for this Settings alone: `prepare_settings` keeps it. Raises ConfigError on a bad value."""
    return _read(env, host, port)[0]


def prepare_settings(env: Mapping[str, str], *, host: str = "127.0.0.1", port: int = 8000) -> Settings:
    """`serve`'s first step: check everything, then make the data dir and its media dir (the service's
    user only) and keep the secrets the environment does not give, and read them back."""
    load_settings(env, host=host, port=port)  # every check first: a bad setting makes nothing
    data_dir = data_dir_of(env)
    try:
        (data_dir / "media").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"RECEIVER_DATA_DIR {str(data_dir)!r} cannot be created: {exc.strerror}") from None
    if not os.access(data_dir, os.W_OK):
        raise ConfigError(f"RECEIVER_DATA_DIR {str(data_dir)!r} is not writable")
    _private(data_dir)
    for var in KEPT:
        if not env.get(var.name) and var.kept is not None:
            var.kept.keep(var.name, data_dir)
    return load_settings(env, host=host, port=port)


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


# -- receiver config --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Effective:
    """One row of `receiver config`: a variable, its value as text (masked when secret), its origin."""

    section: str
    name: str
    value: str
    origin: str


def mask(text: str) -> str:
    """A secret's first 4 characters and an ellipsis; a short one not even those."""
    return f"{text[:4]}…" if len(text) >= 12 else "…" if text else ""


def effective(env: Mapping[str, str], *, host: str = "127.0.0.1", port: int = 8000) -> list[Effective]:
    """Every variable in the table with the value the service would use and where it came from.
    Raises ConfigError, as `serve` would, on a bad value."""
    settings, reading = _read(env, host, port)
    rows = []
    for section, variables in SECTIONS.items():
        for var in variables:
            origin = reading.origins.get(var.name, "default")
            if var.name not in reading.origins and env.get(var.name):
                origin = "environment, unused without RECEIVER_MEDIA_URL"
            if origin.startswith("environment"):
                text = env[var.name]
            elif origin == "data dir":
                text = (var.kept.read(var.name, settings.data_dir) if var.kept else None) or ""
            elif origin == "generated":
                text, origin = "", "generated at the first serve"
            else:
                text = as_text(reading.values.get(var.name))
            rows.append(Effective(section, var.name, mask(text) if var.secret else text, origin))
    return rows
