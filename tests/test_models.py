"""One model vocabulary: the shared names reach each provider as its own id, text-to-image or editing by
whether images are given; native ids still work; a model a provider does not sell is a 422 naming
`model`; GET /v1/providers lists what each configured provider sells. Over real HTTP against the fakes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.fakes.apimart import GENERATIONS
from tests.fakes.apimart import ApimartFake
from tests.fakes.fal import FalFake
from tests.fakes.kie_market import CREATE_TASK
from tests.fakes.kie_market import KieMarketFake
from tests.harness import Receiver


@pytest.fixture
def fakes(start_fake: Callable[..., Any]) -> tuple[FalFake, KieMarketFake, ApimartFake]:
    return start_fake(FalFake), start_fake(KieMarketFake), start_fake(ApimartFake)


@pytest.fixture
def receiver(
    fakes: tuple[FalFake, KieMarketFake, ApimartFake], start_receiver: Callable[..., Receiver]
) -> Receiver:
    env: dict[str, str] = {}
    for fake in fakes:
        env.update(fake.receiver_env())
    return start_receiver(**env)


def last_post(fake: Any, path: str | None = None) -> Any:
    posts = [r for r in fake.requests if r.method == "POST" and (path is None or r.path == path)]
    return posts[-1]


def test_fal_maps_the_shared_names_by_images(
    fakes: tuple[FalFake, KieMarketFake, ApimartFake], receiver: Receiver
) -> None:
    fal = fakes[0]
    one, two = fal.host("a.png"), fal.host("b.png")
    cases: list[tuple[str, list[str], str]] = [
        ("flux-2-pro", [], "/fal-ai/flux-2-pro"),
        ("flux-2-pro", [one, two], "/fal-ai/flux-2-pro/edit"),
        ("flux-2-flex", [], "/fal-ai/flux-2-flex"),
        ("flux-2-flex", [one], "/fal-ai/flux-2-flex/edit"),
        ("flux-kontext-max", [], "/fal-ai/flux-pro/kontext/max/text-to-image"),
        ("flux-kontext-max", [one], "/fal-ai/flux-pro/kontext/max"),
        ("fal-ai/flux-pro/kontext/max/multi", [one, two], "/fal-ai/flux-pro/kontext/max/multi"),  # native
    ]
    for model, images, path in cases:
        task = receiver.submit(provider="fal", prompt="p", model=model, images=images)
        assert task["model"] == model  # the task keeps the name the app used
        receiver.wait_status(str(task["id"]), "submitted")
        sent = last_post(fal)
        assert sent.path == path, (model, images)
        body = sent.json()
        if path.endswith(("/edit", "/multi")):
            assert body["image_urls"] == images and "image_url" not in body
        elif images:
            assert body["image_url"] == images[0]
        else:
            assert "image_url" not in body and "image_urls" not in body


def test_kie_market_and_apimart_map_the_shared_names(
    fakes: tuple[FalFake, KieMarketFake, ApimartFake], receiver: Receiver
) -> None:
    _, market, apimart = fakes
    image = market.host("in.png")
    cases: list[tuple[str | None, list[str], str]] = [
        ("flux-2-pro", [], "flux-2/pro-text-to-image"),
        ("flux-2-pro", [image], "flux-2/pro-image-to-image"),
        ("flux-2-flex", [], "flux-2/flex-text-to-image"),
        ("flux-2-flex", [image, image], "flux-2/flex-image-to-image"),
        ("flux-2/flex-image-to-image", [image], "flux-2/flex-image-to-image"),  # native
        (None, [], "flux-2/pro-text-to-image"),  # the default follows the images too
        (None, [image], "flux-2/pro-image-to-image"),
    ]
    for model, images, native in cases:
        body: dict[str, Any] = {"provider": "kie-market", "prompt": "a fine prompt", "images": images}
        if model:
            body["model"] = model
        task = receiver.submit(**body)
        receiver.wait_status(str(task["id"]), "submitted")
        sent = last_post(market, CREATE_TASK).json()
        assert sent["model"] == native, (model, images)
        assert sent["input"].get("input_urls", []) == images

    for model in ("flux-2-pro", "flux-2-flex"):
        task = receiver.submit(provider="apimart", prompt="p", model=model)
        receiver.wait_status(str(task["id"]), "submitted")
        assert last_post(apimart, GENERATIONS).json()["model"] == model


def test_a_model_the_provider_does_not_sell_is_a_422_listing_what_it_sells(
    fakes: tuple[FalFake, KieMarketFake, ApimartFake], receiver: Receiver
) -> None:
    image = fakes[1].host("in.png")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"provider": "apimart", "model": "flux-2-max"}, "apimart sells flux-kontext-pro, flux-kontext-max"),
        ({"provider": "kie-market", "model": "flux-kontext-pro"}, "kie-market sells flux-2-pro, flux-2-flex"),
        ({"provider": "fal", "model": "not a model"}, "fal sells flux-kontext-pro"),
        ({"provider": "kie-market", "model": "flux-2/pro-text-to-image", "images": [image]}, "0 to 0 images"),
        ({"provider": "kie-market", "model": "flux-2/pro-image-to-image"}, "1 to 8 images"),
        ({"provider": "fal", "model": "flux-kontext-pro", "images": [image, image]}, "0 to 1 images"),
    ]
    for body, says in cases:
        answer = receiver.alice.post("/v1/tasks", json={"prompt": "a fine prompt", **body})
        assert answer.status_code == 422, (body, answer.text)
        fields = answer.json()["error"]["fields"]
        field = "model" if "sells" in says else "images"
        assert says in fields[field], (body, fields)


def test_providers_lists_models_limits_and_input_rules(receiver: Receiver) -> None:
    items = {item["name"]: item for item in receiver.alice.get("/v1/providers").json()["items"]}
    assert set(items) == {"fal", "kie", "kie-market", "apimart", "sandbox"}  # kie shares kie-market's key
    fal = items["fal"]
    assert fal["models"] == ["flux-kontext-pro", "flux-kontext-max", "flux-2-pro", "flux-2-flex"]
    assert fal["model_inputs"]["flux-2-pro"] == {
        "min_images": 0,
        "max_images": 8,
        "text_to_image": "fal-ai/flux-2-pro",
        "edit": "fal-ai/flux-2-pro/edit",
    }
    assert fal["model_inputs"]["flux-kontext-pro"]["max_images"] == 1
    assert fal["other_models"].startswith("a fal endpoint id")
    market = items["kie-market"]
    assert market["model_inputs"]["flux-2/pro-image-to-image"]["min_images"] == 1
    assert market["limits"]["new_tasks_per_window"] == 20 and market["limits"]["window_seconds"] == 10.0
    assert market["limits"]["shared_with"] == ["kie"]
    assert items["apimart"]["data_uris"] == "sent as signed links"
    assert "flux-2-flex" in items["apimart"]["models"]
