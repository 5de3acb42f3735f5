"""FLUX 2 as each provider really takes it: the shared fields become each provider's own (fal's
image_size, apimart's size and resolution, kie Market's input), values a provider's schema would refuse
or silently change are a 422 naming the field, and GET /v1/providers lists the very table requests are
checked against. Over real HTTP, through the service, against fakes that check bodies like the real
schemas do."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.fakes.apimart import GENERATIONS
from tests.fakes.apimart import ApimartFake
from tests.fakes.common import png
from tests.fakes.fal import FalFake
from tests.fakes.kie_market import CREATE_TASK
from tests.fakes.kie_market import KieMarketFake
from tests.harness import Receiver
from tests.test_console import CHROMIUM
from tests.test_console import CHROMIUM_ARGS
from tests.test_console import note_console
from tests.test_console import sign_in

Fakes = tuple[FalFake, KieMarketFake, ApimartFake]
PROMPT = "a lighthouse at dusk"


@pytest.fixture
def fakes(start_fake: Callable[..., Any]) -> Fakes:
    return start_fake(FalFake), start_fake(KieMarketFake), start_fake(ApimartFake)


@pytest.fixture
def receiver(fakes: Fakes, start_receiver: Callable[..., Receiver]) -> Receiver:
    env: dict[str, str] = {}
    for fake in fakes:
        env.update(fake.receiver_env())
    return start_receiver(**env)


def sent(receiver: Receiver, fake: Any, path_prefix: str, **body: Any) -> tuple[str, dict[str, Any]]:
    """Create a task, wait until it is submitted, and return the path and JSON body the fake got."""
    before = len(fake.requests)
    task = receiver.submit(prompt=PROMPT, **body)
    done = receiver.wait_status(str(task["id"]), "submitted")
    assert done["status"] == "submitted", done
    posts = [r for r in fake.requests[before:] if r.method == "POST" and r.path.startswith(path_prefix)]
    assert len(posts) == 1, [r.path for r in fake.requests[before:]]
    return posts[0].path, posts[0].json()


def refused(receiver: Receiver, **body: Any) -> dict[str, str]:
    answer = receiver.alice.post("/v1/tasks", json={"prompt": PROMPT, **body})
    assert answer.status_code == 422, (body, answer.text)
    fields: dict[str, str] = answer.json()["error"]["fields"]
    return fields


def data_uri(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(width, height)).decode()


# -- fal -------------------------------------------------------------------------------------------


def test_fal_flux2_gets_image_size_never_aspect_ratio_or_num_images(fakes: Fakes, receiver: Receiver) -> None:
    fal = fakes[0]
    one, two = fal.host("a.png"), fal.host("b.png")
    cases: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
        (  # a named size where fal has one; num_images 1 means what fal does anyway, so it is not sent
            {
                "model": "flux-2-pro",
                "aspect_ratio": "16:9",
                "num_images": 1,
                "safety_tolerance": 5,
                "seed": 7,
            },
            "/fal-ai/flux-2-pro",
            {"prompt": PROMPT, "image_size": "landscape_16_9", "safety_tolerance": "5", "seed": 7},
        ),
        (  # no ratio: the square megapixel every provider makes, not fal's landscape_4_3 default
            {"model": "flux-2-pro", "output_format": "png"},
            "/fal-ai/flux-2-pro",
            {"prompt": PROMPT, "image_size": "square_hd", "output_format": "png"},
        ),
        (  # a ratio without a named size: {width, height} near one megapixel, sides multiples of 16
            {"model": "flux-2-flex", "aspect_ratio": "3:2", "prompt_upsampling": False},
            "/fal-ai/flux-2-flex",
            {
                "prompt": PROMPT,
                "image_size": {"width": 1248, "height": 832},
                "enable_prompt_expansion": False,
            },
        ),
        (
            {"model": "flux-2-flex", "aspect_ratio": "9:21", "options": {"guidance_scale": 4.5}},
            "/fal-ai/flux-2-flex",
            {"prompt": PROMPT, "image_size": {"width": 672, "height": 1568}, "guidance_scale": 4.5},
        ),
        (  # an edit naming no ratio keeps fal's auto: sized like its input
            {"model": "flux-2-pro", "images": [one, two]},
            "/fal-ai/flux-2-pro/edit",
            {"prompt": PROMPT, "image_size": "auto", "image_urls": [one, two]},
        ),
        (
            {
                "model": "flux-2-flex",
                "images": [one],
                "aspect_ratio": "3:4",
                "options": {"num_inference_steps": 30, "guidance_scale": 2},
            },
            "/fal-ai/flux-2-flex/edit",
            {
                "prompt": PROMPT,
                "image_size": "portrait_4_3",
                "image_urls": [one],
                "num_inference_steps": 30,
                "guidance_scale": 2,
            },
        ),
    ]
    for request, path, body in cases:
        got_path, got = sent(receiver, fal, "/fal-ai/", provider="fal", **request)
        assert (got_path, got) == (path, body), request
    assert fal.ignored == []  # nothing fal's FLUX 2 schema would have dropped without a word


def test_every_ratio_fal_flux2_takes_reaches_fal_as_a_size_near_one_megapixel(
    fakes: Fakes, receiver: Receiver
) -> None:
    fal = fakes[0]
    takes = receiver.alice.get("/v1/providers").json()["items"]
    ratios = next(item for item in takes if item["name"] == "fal")["takes"]["flux-2-pro"]["aspect_ratios"]
    named = {"1:1": "square_hd", "4:3": "landscape_4_3", "3:4": "portrait_4_3"}
    named |= {"16:9": "landscape_16_9", "9:16": "portrait_16_9"}
    for ratio in ratios:
        _, body = sent(receiver, fal, "/fal-ai/", provider="fal", model="flux-2-pro", aspect_ratio=ratio)
        size = body["image_size"]
        if ratio in named:
            assert size == named[ratio]
            continue
        across, down = (int(part) for part in ratio.split(":"))
        assert size["width"] % 16 == 0 and size["height"] % 16 == 0, size
        assert size["width"] * down == size["height"] * across, (ratio, size)  # exactly that ratio
        assert 0.9 < size["width"] * size["height"] / 2**20 < 1.1, (ratio, size)
    assert fal.order and len(fal.order) == len(ratios)  # fal's schema took every one


def test_fal_flux2_refuses_what_fal_would_refuse_or_change(fakes: Fakes, receiver: Receiver) -> None:
    fal = fakes[0]
    image = fal.host("a.png")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"model": "flux-2-pro", "num_images": 2}, "num_images", "fal's flux-2-pro makes one image per task"),
        ({"model": "flux-2-flex", "safety_tolerance": 6}, "safety_tolerance", "takes 1 to 5"),
        ({"model": "flux-2-pro", "aspect_ratio": "auto"}, "aspect_ratio", "auto follows the input image"),
        ({"model": "flux-2-pro", "aspect_ratio": "5:4"}, "aspect_ratio", "takes one of 21:9"),
        ({"model": "flux-2-flex", "options": {"guidance_scale": 11}}, "options.guidance_scale", "1.5 to 10"),
        (
            {"model": "flux-2-flex", "options": {"num_inference_steps": 2.5}},
            "options.num_inference_steps",
            "a whole number from 2 to 50",
        ),
        ({"model": "flux-2-pro", "options": {"guidance_scale": 3}}, "options.guidance_scale", "flex does"),
        ({"model": "flux-2-pro", "prompt_upsampling": True}, "prompt_upsampling", "does not take"),
        ({"model": "flux-2-flex", "options": {"aspect_ratio": "16:9"}}, "options.aspect_ratio", "image_size"),
        ({"model": "flux-2-pro", "options": {"num_images": 2}}, "options.num_images", "one image"),
        (
            {"model": "fal-ai/flux-2-pro/edit", "images": [image], "safety_tolerance": 6},
            "safety_tolerance",
            "1 to 5",
        ),
    ]
    for request, field, says in cases:
        fields = refused(receiver, provider="fal", **request)
        assert list(fields) == [field] and says in fields[field], (request, fields)
    assert receiver.alice.get("/v1/tasks").json()["items"] == []
    assert [r for r in fal.requests if r.method == "POST"] == []


def test_fal_kontext_keeps_its_fields_and_takes_prompt_upsampling_as_enhance_prompt(
    fakes: Fakes, receiver: Receiver
) -> None:
    fal = fakes[0]
    image = fal.host("a.png")
    request = {"aspect_ratio": "21:9", "num_images": 2, "safety_tolerance": 6, "prompt_upsampling": True}
    path, body = sent(receiver, fal, "/fal-ai/", provider="fal", model="flux-kontext-max", **request)
    assert path == "/fal-ai/flux-pro/kontext/max/text-to-image"
    assert body == {
        "prompt": PROMPT,
        "aspect_ratio": "21:9",
        "num_images": 2,
        "safety_tolerance": "6",
        "enhance_prompt": True,
    }
    path, body = sent(receiver, fal, "/fal-ai/", provider="fal", images=[image], prompt_upsampling=False)
    assert (path, body) == (
        "/fal-ai/flux-pro/kontext",
        {"prompt": PROMPT, "enhance_prompt": False, "image_url": image},
    )


def test_the_fal_fake_answers_a_flux2_body_fal_refuses_with_fals_422(
    fakes: Fakes, receiver: Receiver
) -> None:
    # options pass through: a value only fal's schema knows is wrong reaches the fake, which answers as
    # fal does, and the task ends provider_rejected with fal's words.
    fal = fakes[0]
    task = receiver.submit(provider="fal", model="flux-2-pro", prompt=PROMPT, options={"image_size": "huge"})
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "failed" and done["error"]["code"] == "provider_rejected", done
    assert "image_size" in done["error"]["message"]
    assert fal.order == []  # the fake queued nothing


# -- apimart ---------------------------------------------------------------------------------------


def test_apimart_flux2_gets_size_resolution_and_every_reference_image(
    fakes: Fakes, receiver: Receiver
) -> None:
    apimart = fakes[2]
    urls = [apimart.host(f"ref{i}.png") for i in range(8)]
    upload = receiver.alice.post("/v1/uploads", content=png(48, 64), headers={"Content-Type": "image/png"})
    assert upload.status_code == 201, upload.text
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (
            {"model": "flux-2-pro", "aspect_ratio": "3:2", "resolution": "2K"},
            {"model": "flux-2-pro", "prompt": PROMPT, "size": "3:2", "resolution": "2K"},
        ),
        (
            {"model": "flux-2-flex", "aspect_ratio": "16:9", "images": urls},
            {"model": "flux-2-flex", "prompt": PROMPT, "size": "16:9", "image_urls": urls},
        ),
        (  # an edit naming no ratio: our own upload's ratio (48 x 64 is 3:4), not apimart's 1:1
            {"model": "flux-2-pro", "images": [upload.json()["url"]], "resolution": "1K"},
            {
                "model": "flux-2-pro",
                "prompt": PROMPT,
                "size": "3:4",
                "resolution": "1K",
                "image_urls": "<upload>",
            },
        ),
    ]
    for request, expected in cases:
        _, body = sent(receiver, apimart, GENERATIONS, provider="apimart", **request)
        assert body.pop("webhook").startswith(receiver.url + "/callbacks/apimart/")
        assert body.pop("language") == "en"
        if expected.get("image_urls") == "<upload>":
            assert [url.split("?")[0] for url in body["image_urls"]] == [upload.json()["url"].split("?")[0]]
            expected["image_urls"] = body["image_urls"]
        assert body == expected, request
    # A data URI is measured when it is kept: 64 x 48 is 4:3; it reaches apimart as a signed link.
    _, body = sent(
        receiver, apimart, GENERATIONS, provider="apimart", model="flux-2-flex", images=[data_uri(64, 48)]
    )
    assert body["size"] == "4:3" and body["image_urls"][0].startswith(receiver.url + "/uploads/")


def test_apimart_flux2_refuses_what_apimart_would_refuse_or_change(fakes: Fakes, receiver: Receiver) -> None:
    apimart = fakes[2]
    remote = apimart.host("remote.png")
    cases: list[tuple[dict[str, Any], str, str]] = [
        (
            {"model": "flux-2-pro", "aspect_ratio": "21:9"},
            "aspect_ratio",
            "1:1, 4:3, 3:4, 16:9, 9:16, 3:2, 2:3",
        ),
        ({"model": "flux-2-flex", "resolution": "4K"}, "resolution", "1K or 2K"),
        ({"model": "flux-2-pro", "images": [remote] * 9}, "images", "8 images"),
        ({"model": "flux-2-pro", "seed": 3}, "seed", "does not take"),
        ({"model": "flux-2-pro", "safety_tolerance": 2}, "safety_tolerance", "does not take"),
        # a remote image's size is unknown here, and apimart's FLUX 2 would make 1:1 of it
        ({"model": "flux-2-pro", "images": [remote]}, "aspect_ratio", "name one of 1:1"),
        ({"model": "flux-2-flex", "images": [data_uri(100, 37)]}, "aspect_ratio", "100x37"),
        ({"model": "flux-kontext-pro", "resolution": "2K"}, "resolution", "does not take"),  # Kontext: none
    ]
    for request, field, says in cases:
        fields = refused(receiver, provider="apimart", **request)
        assert list(fields) == [field] and says in fields[field], (request, fields)
    assert apimart.calls(GENERATIONS) == []


# -- kie Market ------------------------------------------------------------------------------------


def test_kie_market_auto_needs_an_input_image(fakes: Fakes, receiver: Receiver) -> None:
    market = fakes[1]
    image = market.host("in.png")
    fields = refused(receiver, provider="kie-market", model="flux-2-pro", aspect_ratio="auto")
    assert "auto follows the input image, and there is none" in fields["aspect_ratio"]
    _, body = sent(
        receiver,
        market,
        CREATE_TASK,
        provider="kie-market",
        model="flux-2-flex",
        images=[image],
        aspect_ratio="auto",
    )
    assert body.pop("callBackUrl").startswith(receiver.url + "/callbacks/kie-market/")
    assert body == {
        "model": "flux-2/flex-image-to-image",
        "input": {"aspect_ratio": "auto", "resolution": "1K", "input_urls": [image], "prompt": PROMPT},
    }
    _, body = sent(receiver, market, CREATE_TASK, provider="kie-market", model="flux-2-pro", resolution="2K")
    body.pop("callBackUrl")
    assert body == {
        "model": "flux-2/pro-text-to-image",
        "input": {"aspect_ratio": "1:1", "resolution": "2K", "prompt": PROMPT},
    }


def test_a_market_failcode_is_not_moderation_so_the_task_falls_back(fakes: Fakes, receiver: Receiver) -> None:
    fal, market, _ = fakes
    image = market.host("in.png")
    task = receiver.submit(
        provider="kie-market", model="flux-2-pro", prompt=PROMPT, images=[image], fallback=["fal"]
    )
    receiver.wait_status(str(task["id"]), "submitted")
    kie_id = market.provider_task_id()
    answer = market.send(kie_id, market.failure_body(kie_id, "400", "Image generation failed, please retry"))
    assert answer.status_code == 200
    fal.wait_for(lambda: bool(fal.order))  # the next provider got it
    moved = receiver.alice.get(f"/v1/tasks/{task['id']}").json()
    assert moved["provider"] == "fal"
    assert moved["attempts"][0]["error"] == {
        "code": "generation_failed",
        "message": "Image generation failed, please retry",
        "provider_code": "400",
    }
    # A message that says a content check stopped it is moderation, and ends the task there.
    second = receiver.submit(
        provider="kie-market", model="flux-2-pro", prompt=PROMPT, images=[image], fallback=["fal"]
    )
    receiver.wait_status(str(second["id"]), "submitted")
    kie_id = market.provider_task_id()
    flagged = "Your prompt was flagged by the content moderation system"
    market.send(kie_id, market.failure_body(kie_id, "400", flagged))
    done = receiver.wait(str(second["id"]))
    assert done["error"] == {"code": "content_moderated", "message": flagged, "provider_code": "400"}
    assert done["provider"] == "kie-market" and len(fal.order) == 1


# -- one table for validation, fallback and the listing ----------------------------------------------


def test_fallback_providers_are_held_to_the_same_tables(fakes: Fakes, receiver: Receiver) -> None:
    remote = fakes[2].host("remote.png")
    fields = refused(receiver, provider="fal", model="flux-2-pro", images=[remote], fallback=["apimart"])
    assert list(fields) == ["fallback[0]"] and "aspect_ratio" in fields["fallback[0]"], fields
    fields = refused(receiver, provider="apimart", model="flux-2-pro", safety_tolerance=6, fallback=["fal"])
    assert set(fields) == {"safety_tolerance"}  # apimart's own refusal first
    fields = refused(
        receiver,
        provider="kie-market",
        model="flux-2-pro",
        num_images=1,
        aspect_ratio="21:9",
        fallback=["fal"],
    )
    assert set(fields) == {"aspect_ratio"}


def test_providers_lists_the_tables_requests_are_checked_against(fakes: Fakes, receiver: Receiver) -> None:
    items = {item["name"]: item for item in receiver.alice.get("/v1/providers").json()["items"]}
    fal = items["fal"]["takes"]
    assert fal["flux-2-pro"]["safety_tolerance"] == {"min": 1, "max": 5, "whole": True}
    assert fal["flux-2-pro"]["edit_aspect_ratios"] == ["auto"]
    assert fal["flux-2-pro"]["num_images"] == {"min": 1, "max": 1, "whole": True}
    assert fal["flux-2-pro"]["options"] == {}
    assert fal["flux-2-flex"]["options"] == {
        "guidance_scale": {"min": 1.5, "max": 10, "whole": False},
        "num_inference_steps": {"min": 2, "max": 50, "whole": True},
    }
    assert fal["flux-kontext-pro"]["safety_tolerance"]["max"] == 6
    assert fal["flux-kontext-pro"]["num_images"]["max"] == 4
    assert "prompt_upsampling" in fal["flux-kontext-pro"]["fields"]
    assert "prompt_upsampling" not in fal["flux-2-pro"]["fields"]
    apimart = items["apimart"]["takes"]["flux-2-pro"]
    assert apimart["resolutions"] == ["1K", "2K"]
    assert apimart["aspect_ratios"] == ["1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3"]
    assert items["apimart"]["model_inputs"]["flux-2-pro"]["max_images"] == 8
    assert items["apimart"]["takes"]["flux-kontext-pro"]["resolutions"] is None
    market = items["kie-market"]["takes"]["flux-2-pro"]
    assert market["edit_aspect_ratios"] == ["auto"] and "auto" not in market["aspect_ratios"]
    # One source: every ratio the listing shows for a model is taken, and the 422 for one it does not
    # show lists exactly those.
    for provider, model in (("fal", "flux-2-pro"), ("apimart", "flux-2-flex"), ("kie-market", "flux-2-pro")):
        listed = items[provider]["takes"][model]["aspect_ratios"]
        fields = refused(receiver, provider=provider, model=model, aspect_ratio="7:5")
        assert fields["aspect_ratio"].endswith(
            ", ".join(listed + items[provider]["takes"][model]["edit_aspect_ratios"])
        ), fields
    openapi = receiver.anon.get("/openapi.json").json()
    assert "ModelTakes" in json.dumps(openapi["components"]["schemas"])


def test_the_console_form_offers_the_ratios_of_the_model_chosen(fakes: Fakes, receiver: Receiver) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not found ({CHROMIUM}): install Debian's chromium package to run it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    problems: list[str] = []

    def offered() -> list[str]:
        return [
            value
            for value in page.eval_on_selector_all("#aspect-ratio option", "os => os.map(o => o.value)")
            if value
        ]

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: note_console(message, problems))
            sign_in(page, receiver)
            page.click("a[data-nav=new]")
            page.wait_for_selector("#task-form")
            page.select_option("#provider", "apimart")
            page.fill("#model", "flux-2-pro")
            assert offered() == ["1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3"]
            page.fill("#model", "flux-kontext-pro")
            assert "21:9" in offered() and "match_input_image" in offered()
            page.select_option("#provider", "fal")
            page.fill("#model", "flux-2-flex")
            assert offered()[-1] == "auto" and "21:9" in offered()
        finally:
            browser.close()
    assert problems == []
