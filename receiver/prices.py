"""What a task costs: the price table per provider and model, as data, and the estimate for one request.

A price is per image, or per megapixel where the provider prices that way (fal's FLUX 2), or per
resolution (apimart's `1K`/`2K`). The built-in table below says where and when each price was taken
from; RECEIVER_PRICES names a JSON or TOML file in the contract's shape that replaces it, provider by
provider: `{"<provider>": {"<model>": {"per_image": 0.04} | {"per_megapixel": 0.03}}}`, models by their
shared or native names. This module is a leaf beside `receiver.models`: it does no I/O but reading
that one file at start, and it knows no provider module.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from receiver.models import TaskRequest
from receiver.variables import ConfigError

# A megapixel as fal counts its sizes: `square_hd` (1024 x 1024) is one.
MEGAPIXEL = 1024 * 1024
# Resolutions named by the shared `resolution` field, in megapixels of output (a square at that side).
RESOLUTION_MEGAPIXELS = {"1K": 1.0, "2K": 4.0}
MAX_PRICE = 1000.0  # USD per unit: anything above is a typo in the file, refused at start
MAX_FILE_BYTES = 1024 * 1024
# The fields a price entry may have, besides its documentation fields (source, taken, verified).
PRICE_FIELDS = ("per_image", "per_megapixel", "first_megapixel", "per_resolution")


@dataclass(frozen=True)
class Price:
    """One model's price at one provider, in USD. Exactly one of `per_image`, `per_megapixel` or
    `per_resolution` is set. `first_megapixel`, with `per_megapixel`, is the price of the first
    megapixel when it differs from the further ones (fal's FLUX 2 pro)."""

    per_image: float | None = None
    per_megapixel: float | None = None
    first_megapixel: float | None = None
    per_resolution: Mapping[str, float] = field(default_factory=dict)
    source: str = ""  # where it was read
    taken: str = ""  # when (YYYY-MM-DD)
    verified: bool = True  # False: read from a secondary source, not the provider's own page

    def as_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            name: value
            for name, value in (
                ("per_image", self.per_image),
                ("per_megapixel", self.per_megapixel),
                ("first_megapixel", self.first_megapixel),
                ("per_resolution", dict(self.per_resolution) or None),
            )
            if value is not None
        }
        return shown | {"source": self.source or None, "taken": self.taken or None, "verified": self.verified}


PriceTable = Mapping[str, Mapping[str, Price]]

_BFL = "https://docs.bfl.ml/quick_start/pricing"
_FAL_FLUX2 = "https://fal.ai/models/fal-ai/flux-2-pro and https://fal.ai/models/fal-ai/flux-2-flex (pricing)"
_FAL_KONTEXT = "https://fal.ai/models/fal-ai/flux-pro/kontext/max"
_APIMART = "https://docs.apimart.ai/en/api-reference/images/flux-kontext/generation (apimart model pages)"
_FLUX2_PRO = Price(per_megapixel=0.015, first_megapixel=0.03, source=_FAL_FLUX2, taken="2026-12-08")
_FLUX2_FLEX = Price(per_megapixel=0.05, source=_FAL_FLUX2, taken="2026-12-08")

# The built-in prices (docs/keys.md shows them with their sources). A provider or model missing here
# has no known price: its tasks cost null unless the provider reports the charge, and `auto` ranks it
# last. kie's and apicore's prices could not be verified from a public page, so none is assumed.
DEFAULT_PRICES: PriceTable = {
    "fal": {
        # fal resells BFL's Kontext at BFL's list price; max is on fal's model page, pro is BFL's list
        # price, not read on fal's own page.
        "flux-kontext-pro": Price(per_image=0.04, source=_BFL, taken="2026-12-08", verified=False),
        "flux-kontext-max": Price(per_image=0.08, source=_FAL_KONTEXT, taken="2026-12-08"),
        "flux-2-pro": _FLUX2_PRO,
        "fal-ai/flux-2-pro": _FLUX2_PRO,
        "fal-ai/flux-2-pro/edit": _FLUX2_PRO,
        "flux-2-flex": _FLUX2_FLEX,
        "fal-ai/flux-2-flex": _FLUX2_FLEX,
        "fal-ai/flux-2-flex/edit": _FLUX2_FLEX,
    },
    "apimart": {
        # "from $0.032 per image" (pro) and "$0.064" (max, 1K), observed 2026-10-12 on copies of
        # apimart's model pages; apimart's own page says only "fixed price".
        "flux-kontext-pro": Price(per_image=0.032, source=_APIMART, taken="2026-10-12", verified=False),
        "flux-kontext-max": Price(per_image=0.064, source=_APIMART, taken="2026-10-12", verified=False),
    },
    # The built-in sandbox makes its pictures locally: it costs nothing.
    "sandbox": {"sandbox": Price(per_image=0.0, source="built in", taken="2026-12-08")},
}


def price_of(table: PriceTable, provider: str, model: str) -> Price | None:
    return table.get(provider, {}).get(model)


def output_megapixels(request: TaskRequest) -> float:
    """The megapixels one output image of `request` has, as far as the request says: an explicit
    `options.image_size` {width, height} (fal), a `resolution` (1K, 2K), the input's size for an edit
    that follows it; else one megapixel (every shared aspect ratio is sized near one)."""
    size = request.options.get("image_size")
    if isinstance(size, Mapping):
        width, height = size.get("width"), size.get("height")
        if (
            isinstance(width, int | float)
            and isinstance(height, int | float)
            and _positive(width)
            and _positive(height)
        ):
            return float(width) * float(height) / MEGAPIXEL
    resolution = request.params.get("resolution")
    if resolution in RESOLUTION_MEGAPIXELS:
        return RESOLUTION_MEGAPIXELS[resolution]
    follows = request.params.get("aspect_ratio") in (None, "auto", "match_input_image")
    first = request.image_sizes[0] if request.image_sizes else None
    if request.images and follows and first is not None:
        return first[0] * first[1] / MEGAPIXEL
    return 1.0


def input_megapixels(request: TaskRequest) -> float:
    """The megapixels of the input images: their sizes where known, one megapixel each otherwise."""
    sizes = list(request.image_sizes) + [None] * (len(request.images) - len(request.image_sizes))
    return sum(size[0] * size[1] / MEGAPIXEL if size else 1.0 for size in sizes[: len(request.images)])


def estimate_usd(table: PriceTable, provider: str, model: str, request: TaskRequest) -> float | None:
    """What `request` should cost at `provider` with `model` (the model as the task records it), or
    None when no price is known. Per megapixel counts input and output together, each started
    megapixel whole (fal's FLUX 2); per image multiplies by `num_images`."""
    price = price_of(table, provider, model)
    if price is None:
        return None
    count = request.params.get("num_images", 1)
    images = count if isinstance(count, int) and count > 0 else 1
    if price.per_image is not None:
        return round(price.per_image * images, 6)
    if price.per_resolution:
        unit = price.per_resolution.get(str(request.params.get("resolution", "1K")))
        return None if unit is None else round(unit * images, 6)
    if price.per_megapixel is not None:
        megapixels = max(1, math.ceil(output_megapixels(request) * images + input_megapixels(request) - 1e-9))
        first = price.per_megapixel if price.first_megapixel is None else price.first_megapixel
        return round(first + (megapixels - 1) * price.per_megapixel, 6)
    return None


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 100_000


def _amount(where: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= MAX_PRICE:
        raise ConfigError(f"{where} must be a number of USD from 0 to {MAX_PRICE:g}, got {value!r}")
    if value != value:  # NaN (TOML has `nan`)
        raise ConfigError(f"{where} must be a number of USD, got nan")
    return float(value)


def read_price(where: str, entry: Any) -> Price:
    """One `{"per_image": …}` entry of a prices file, checked."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f'{where} must be a table such as {{"per_image": 0.04}}')
    unknown = sorted(set(entry) - {*PRICE_FIELDS, "source", "taken", "verified"})
    if unknown:
        raise ConfigError(
            f"{where} has {unknown[0]!r}; a price has one of per_image, per_megapixel, per_resolution"
        )
    kinds = [name for name in ("per_image", "per_megapixel", "per_resolution") if name in entry]
    if len(kinds) != 1:
        raise ConfigError(f"{where} must have exactly one of per_image, per_megapixel or per_resolution")
    if "first_megapixel" in entry and "per_megapixel" not in entry:
        raise ConfigError(f"{where}.first_megapixel goes with per_megapixel")
    by_resolution = entry.get("per_resolution", {})
    if "per_resolution" in entry and (not isinstance(by_resolution, Mapping) or not by_resolution):
        raise ConfigError(f'{where}.per_resolution must be a table such as {{"1K": 0.03, "2K": 0.06}}')
    source, taken, verified = entry.get("source", ""), entry.get("taken", ""), entry.get("verified", True)
    if not isinstance(source, str) or not isinstance(taken, str) or not isinstance(verified, bool):
        raise ConfigError(f"{where}: source and taken are text, verified is true or false")
    return Price(
        per_image=_amount(f"{where}.per_image", entry["per_image"]) if "per_image" in entry else None,
        per_megapixel=_amount(f"{where}.per_megapixel", entry["per_megapixel"])
        if "per_megapixel" in entry
        else None,
        first_megapixel=_amount(f"{where}.first_megapixel", entry["first_megapixel"])
        if "first_megapixel" in entry
        else None,
        per_resolution={
            str(name): _amount(f"{where}.per_resolution.{name}", value)
            for name, value in by_resolution.items()
        },
        source=source,
        taken=taken,
        verified=verified,
    )


def read_table(where: str, data: Any) -> dict[str, dict[str, Price]]:
    """A whole prices document, checked: providers, each with its models' prices."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must hold a table of providers, each a table of models")
    table: dict[str, dict[str, Price]] = {}
    for provider, models in data.items():
        if not isinstance(models, Mapping):
            raise ConfigError(f"{where}: {provider} must be a table of models")
        table[str(provider)] = {
            str(model): read_price(f"{where}: {provider}.{model}", entry) for model, entry in models.items()
        }
    return table


def load_prices(name: str, raw: str) -> PriceTable:
    """RECEIVER_PRICES: the file's table over the built-in one, provider by provider (a provider the
    file names has exactly the file's models). JSON unless the name ends in `.toml`."""
    path = Path(raw)
    try:
        with path.open("rb") as handle:
            body = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {raw}: {exc.strerror or exc}") from None
    if len(body) > MAX_FILE_BYTES:
        raise ConfigError(f"{name}: {raw} is over {MAX_FILE_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{name}: {raw} is not {kind}: {first}") from None
    return {**DEFAULT_PRICES, **read_table(f"{name} ({raw})", data)}


def prices_json(table: PriceTable, provider: str) -> dict[str, Any]:
    """A provider's prices as GET /v1/providers shows them."""
    return {model: price.as_json() for model, price in table.get(provider, {}).items()}
