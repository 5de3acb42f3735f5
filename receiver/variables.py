"""The settings table's vocabulary: one environment variable declared once, and the parsers that check it.

A `Variable` names a variable, the parser that reads it (its range included, so the range is written
once and the docs show it), its default, its help line, whether it is a secret and which deployments
it applies to. `receiver/config.py` holds the service's table and builds `Settings` from it; each
provider module declares its own variables (`ProviderVariables`); the docs' configuration tables and
`receiver config` are rendered from the same declarations.

This module is a leaf (it imports only `receiver.webhooks`), so provider modules may import it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import Protocol
from urllib.parse import SplitResult
from urllib.parse import urlsplit

from receiver.webhooks import MIN_SECRET_BYTES
from receiver.webhooks import secret_bytes

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
# Numbers as an operator writes them: ASCII digits, a point, an exponent of a few digits. Not what
# float() also takes ("nan", "inf", "1_000", other scripts' digits).
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
_WHOLE = re.compile(r"[+-]?[0-9]{1,18}")
# A host name (underscores allowed: container networks use them) or an IPv4 address.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


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


class Parser(Protocol):
    """Reads a variable's text (never empty: empty means unset) or raises ConfigError naming it."""

    def __call__(self, name: str, raw: str) -> Any: ...

    def span(self) -> str:
        """The values it takes, for the docs ("" when the help line says it)."""
        ...


def shown(raw: str) -> str:
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


def seconds_text(value: float) -> str:
    """A number of seconds as a reader says it: 30 days, 1 hour, 0.1 s."""
    for size, unit in ((DAY, "day"), (HOUR, "hour"), (MINUTE, "minute")):
        if value >= size and value % size == 0:
            count = value / size
            return f"{count:g} {unit}" + ("s" if count != 1 else "")
    return f"{value:g} s"


@dataclass(frozen=True)
class Seconds:
    minimum: float
    maximum: float

    def __call__(self, name: str, raw: str) -> float:
        if not _DECIMAL.fullmatch(raw.strip()):
            raise ConfigError(f"{name} must be a number of seconds, got {shown(raw)}")
        value = float(raw)
        if not self.minimum <= value <= self.maximum:
            raise ConfigError(
                f"{name} must be from {self.minimum:g} to {self.maximum:g} seconds, got {shown(raw)}"
            )
        return value

    def span(self) -> str:
        return f"{seconds_text(self.minimum)} to {seconds_text(self.maximum)}"


_DURATION = re.compile(r"([0-9]{1,9})([smhd])")
_UNITS = {"s": 1.0, "m": MINUTE, "h": HOUR, "d": DAY}


@dataclass(frozen=True)
class Duration:
    """A whole number and a unit: `90s`, `15m`, `12h`, `30d`; in seconds, within the range."""

    minimum: float = 1.0
    maximum: float = 100 * 365 * DAY

    def __call__(self, name: str, raw: str) -> float:
        match = _DURATION.fullmatch(raw.strip())
        if match is None:
            raise ConfigError(
                f"{name} must be a duration: a whole number and s, m, h or d (90s, 15m, 12h, 30d),"
                f" got {shown(raw)}"
            )
        value = int(match.group(1)) * _UNITS[match.group(2)]
        if not self.minimum <= value <= self.maximum:
            raise ConfigError(
                f"{name} must be from {seconds_text(self.minimum)} to {seconds_text(self.maximum)},"
                f" got {shown(raw)}"
            )
        return value

    def span(self) -> str:
        low, high = seconds_text(self.minimum), seconds_text(self.maximum)
        return f"a whole number and `s`, `m`, `h` or `d` (`90s`, `15m`, `12h`, `30d`), {low} to {high}"


@dataclass(frozen=True)
class Whole:
    minimum: int
    maximum: int
    unit: str = ""  # "s": the span is shown in seconds, minutes, days

    def __call__(self, name: str, raw: str) -> int:
        if not _WHOLE.fullmatch(raw.strip()):
            raise ConfigError(f"{name} must be a whole number, got {shown(raw)}")
        value = int(raw)
        if not self.minimum <= value <= self.maximum:
            raise ConfigError(f"{name} must be from {self.minimum} to {self.maximum}, got {shown(raw)}")
        return value

    def span(self) -> str:
        if self.unit == "s":
            return f"{seconds_text(self.minimum)} to {seconds_text(self.maximum)}"
        return f"{self.minimum} to {self.maximum}"


@dataclass(frozen=True)
class Choice:
    allowed: tuple[str, ...]

    def __call__(self, name: str, raw: str) -> str:
        for value in self.allowed:
            if raw.lower() == value.lower():
                return value
        raise ConfigError(f"{name} must be one of {', '.join(self.allowed)}, got {shown(raw)}")

    def span(self) -> str:
        return ", ".join(f"`{value}`" for value in self.allowed)


@dataclass(frozen=True)
class Flag:
    def __call__(self, name: str, raw: str) -> bool:
        folded = raw.strip().lower()
        if folded in ("1", "true", "yes", "on"):
            return True
        if folded in ("", "0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be 1 or 0, got {shown(folded)}")

    def span(self) -> str:
        return ""  # its help line says what `1` does


@dataclass(frozen=True)
class Delays:
    """Comma-separated seconds, each in range, at most 100 of them."""

    maximum: float

    def __call__(self, name: str, raw: str) -> tuple[float, ...]:
        parts = raw.split(",")
        if len(parts) > 100 or not all(_DECIMAL.fullmatch(part.strip()) for part in parts):
            raise ConfigError(f"{name} must be up to 100 comma-separated seconds, got {shown(raw)}")
        values = tuple(float(part) for part in parts)
        if not all(0 <= value <= self.maximum for value in values):
            raise ConfigError(f"{name} must hold delays from 0 to {self.maximum:g} seconds, got {shown(raw)}")
        return values

    def span(self) -> str:
        return f"up to 100, each 0 s to {seconds_text(self.maximum)}"


def split_url(raw: str) -> SplitResult | None:
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
    parts = split_url(raw)
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


@dataclass(frozen=True)
class Url:
    """An http(s) base URL of ours or a provider's, without its trailing slash."""

    def __call__(self, name: str, raw: str) -> str:
        problem = _url_problem(raw)
        if problem is not None:
            said = shown(raw) if "@" not in raw else "a URL with a user or password (not shown)"
            raise ConfigError(f"{name} must be an http(s) URL with {problem}, got {said}")
        return raw.rstrip("/")

    def span(self) -> str:
        return ""


@dataclass(frozen=True)
class Plain:
    """A key or token that goes into a header or a signature: printable ASCII, no spaces."""

    least: int = 0  # characters at least

    def __call__(self, name: str, raw: str) -> str:
        if len(raw) < self.least:
            raise ConfigError(f"{name} must be at least {self.least} characters")
        if not raw.isascii() or any(char.isspace() or not char.isprintable() for char in raw):
            raise ConfigError(f"{name} must be printable ASCII without spaces")
        return raw

    def span(self) -> str:
        return ""


@dataclass(frozen=True)
class Check:
    """A parser written as a function, for a variable with a shape of its own."""

    read: Callable[[str, str], Any]

    def __call__(self, name: str, raw: str) -> Any:
        return self.read(name, raw)

    def span(self) -> str:
        return ""


def secret_key(name: str, value: str) -> str:
    """RECEIVER_SECRET_KEY (or the one kept in the data dir): 32 characters or more, spaces aside."""
    if sum(not char.isspace() for char in value) < 32:
        raise ConfigError(f"{name} must be at least 32 characters, not counting whitespace")
    return value


def notify_secrets(name: str, value: str) -> tuple[str, ...]:
    """RECEIVER_NOTIFY_SECRET (or the one kept): whsec_<base64> secrets of 24 bytes or more."""
    found = tuple(value.split())
    for secret in found:
        try:
            key = secret_bytes(secret) if secret.startswith("whsec_") else b""
        except ValueError:
            key = b""
        if len(key) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"{name} must hold whsec_<base64> secrets of {MIN_SECRET_BYTES} bytes or more,"
                " separated by spaces"
            )
    if not found:
        raise ConfigError(f"{name} names no whsec_ secret")
    return found


@dataclass(frozen=True)
class Kept:
    """How a secret the environment does not give is generated on first start and kept in the data dir,
    readable by the owner only; `use` reads the kept text when it is not written like the variable."""

    filename: str
    make: Callable[[], str]
    use: Callable[[str, str], Any] | None = None

    def read(self, name: str, data_dir: Path) -> str | None:
        path = data_dir / self.filename
        try:
            return path.read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ConfigError(f"{name} (kept in {path}) cannot be read: {exc.strerror}") from None

    def keep(self, name: str, data_dir: Path) -> None:
        if self.read(name, data_dir) is None:
            fd = os.open(data_dir / self.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(self.make() + "\n")


@dataclass(frozen=True)
class Variable:
    """One environment variable, declared once. `default` is the value when it is unset or empty;
    `shown_default` is the docs' default cell where the value alone does not say it (a default made at
    start, or computed from another setting)."""

    name: str
    parse: Parser
    default: Any = None
    help: str = ""
    shown_default: str = ""
    secret: bool = False  # masked by `receiver config`, never logged
    backends: tuple[str, ...] = ()  # the deployments it applies to ("PostgreSQL", "S3 media"); () all
    field: str = ""  # the Settings field it fills, when that is not its name without RECEIVER_, lowered
    kept: Kept | None = None  # unset: generated once and kept in the data dir

    def read(self, env: Mapping[str, str]) -> tuple[Any, str]:
        """Its value and where it came from: "environment" or "default"."""
        raw = env.get(self.name)
        if raw is None or raw == "":
            return self.default, "default"
        return self.parse(self.name, raw), "environment"

    def meaning(self) -> str:
        """The docs' meaning cell: the help line, then the range its parser takes."""
        span = self.parse.span()
        return f"{self.help}; {span}" if span else self.help

    def default_cell(self) -> str:
        if self.shown_default:
            return self.shown_default
        if self.default is None:
            return "none"
        return f"`{as_text(self.default)}`"


def as_text(value: Any) -> str:
    """A value as it would be written in the environment."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(as_text(part) for part in value)
    return str(value)


@dataclass(frozen=True)
class ProviderVariables:
    """A provider's own variables: the key that offers it, where its API lives, and any others, which
    reach it in `ProviderSettings.extra` as text (a flag as "1" or "0")."""

    key: Variable | None = None  # None: always offered (the built-in sandbox)
    base_url: Variable | None = None
    extra: tuple[Variable, ...] = ()

    def all(self) -> tuple[Variable, ...]:
        return tuple(var for var in (self.key, self.base_url, *self.extra) if var is not None)
