"""The price table: built-in defaults, RECEIVER_PRICES in JSON and TOML, and the estimate of a request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from receiver.config import ConfigError
from receiver.config import load_settings
from receiver.models import TaskRequest
from receiver.prices import DEFAULT_PRICES
from receiver.prices import estimate_usd
from receiver.prices import load_prices


def request(**params: Any) -> TaskRequest:
    images = tuple(params.pop("images", ()))
    sizes = tuple(params.pop("image_sizes", ()))
    options = params.pop("options", {})
    return TaskRequest("fal", "a cat", params.pop("model", None), images, params, options, None, {}, sizes)


def test_every_default_price_says_where_and_when_it_was_taken() -> None:
    for provider, models in DEFAULT_PRICES.items():
        for model, price in models.items():
            assert price.source and price.taken, f"{provider} {model} has no source or date"
            assert len(price.taken) == 10 and price.taken[4] == "-", price.taken


def test_per_image_price_multiplies_by_num_images() -> None:
    assert estimate_usd(DEFAULT_PRICES, "fal", "flux-kontext-max", request()) == 0.08
    assert estimate_usd(DEFAULT_PRICES, "fal", "flux-kontext-max", request(num_images=3)) == pytest.approx(
        0.24
    )


def test_fal_flux2_pro_is_priced_by_megapixel_of_input_and_output() -> None:
    # text-to-image, one megapixel out: the first megapixel's price
    assert estimate_usd(DEFAULT_PRICES, "fal", "flux-2-pro", request()) == pytest.approx(0.03)
    # 2048 x 2048 asked natively: 4 MP, the first at 0.03 and three more at 0.015
    big = request(options={"image_size": {"width": 2048, "height": 2048}})
    assert estimate_usd(DEFAULT_PRICES, "fal", "flux-2-pro", big) == pytest.approx(0.03 + 3 * 0.015)
    # an edit of two 1 MP inputs, its output following them: 3 MP
    edit = request(images=["https://a/1.png", "https://a/2.png"], image_sizes=[(1024, 1024), (1024, 1024)])
    assert estimate_usd(DEFAULT_PRICES, "fal", "flux-2-pro", edit) == pytest.approx(0.03 + 2 * 0.015)
    # flex: 0.05 for each started megapixel
    assert estimate_usd(DEFAULT_PRICES, "fal", "flux-2-flex", big) == pytest.approx(4 * 0.05)


def test_a_model_with_no_known_price_has_none() -> None:
    assert estimate_usd(DEFAULT_PRICES, "kie", "flux-kontext-pro", request()) is None
    assert estimate_usd(DEFAULT_PRICES, "nobody", "flux-kontext-pro", request()) is None


def test_prices_from_json_replace_the_provider_and_keep_the_others(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        '{"kie": {"flux-kontext-pro": {"per_image": 0.025}},'
        ' "apimart": {"flux-2-pro": {"per_resolution": {"1K": 0.03, "2K": 0.06}}}}'
    )
    table = load_prices("RECEIVER_PRICES", str(path))
    assert estimate_usd(table, "kie", "flux-kontext-pro", request()) == 0.025
    assert estimate_usd(table, "apimart", "flux-2-pro", request(resolution="2K")) == 0.06
    assert estimate_usd(table, "apimart", "flux-kontext-pro", request()) is None  # apimart: the file's only
    assert estimate_usd(table, "fal", "flux-kontext-max", request()) == 0.08  # fal: the built-in


def test_prices_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '[fal."flux-2-flex"]\nper_megapixel = 0.04\nsource = "our contract"\ntaken = "2026-12-01"\n'
    )
    settings = load_settings({"RECEIVER_PRICES": str(path), "RECEIVER_DATA_DIR": str(tmp_path)})
    assert estimate_usd(settings.prices, "fal", "flux-2-flex", request()) == pytest.approx(0.04)
    assert settings.prices["fal"]["flux-2-flex"].source == "our contract"


@pytest.mark.parametrize(
    ("name", "body", "said"),
    [
        ("p.json", "{not json", "is not JSON"),
        ("p.toml", "fal = [", "is not TOML"),
        ("p.json", '{"fal": {"flux-2-pro": {"per_image": -1}}}', "fal.flux-2-pro.per_image must be a number"),
        ("p.json", '{"fal": {"flux-2-pro": {"per_image": NaN}}}', "must be a number"),
        ("p.json", '{"fal": {"flux-2-pro": {"per_image": 1, "per_megapixel": 1}}}', "exactly one of"),
        ("p.json", '{"fal": {"flux-2-pro": {"per_pixel": 1}}}', "'per_pixel'"),
        ("p.json", '{"fal": ["flux-2-pro"]}', "fal must be a table of models"),
        ("p.json", "[1]", "must hold a table of providers"),
    ],
)
def test_a_bad_prices_file_is_one_line_naming_the_variable(
    tmp_path: Path, name: str, body: str, said: str
) -> None:
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_settings({"RECEIVER_PRICES": str(path), "RECEIVER_DATA_DIR": str(tmp_path)})
    message = str(caught.value)
    assert message.startswith("RECEIVER_PRICES") and said in message and "\n" not in message


def test_a_missing_prices_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^RECEIVER_PRICES: cannot read .*nowhere\.json"):
        load_settings({"RECEIVER_PRICES": str(tmp_path / "nowhere.json"), "RECEIVER_DATA_DIR": str(tmp_path)})
