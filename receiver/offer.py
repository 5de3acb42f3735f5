"""What this deployment offers, as GET /v1/providers answers it: `schema.ProviderList`, built from the
provider registry and the settings (which keys are set, which pacing overrides apply).

Apps and the console build their forms from it. A provider describes what each model takes as plain
data (`Takes.as_json`: a provider module imports no shell module); it becomes the schema's
`ModelTakes` here, checked by msgspec, so the answer cannot drift from what the OpenAPI document says.
"""

from __future__ import annotations

import msgspec

from receiver.config import Settings
from receiver.prices import prices_json
from receiver.providers import REGISTRY
from receiver.providers import Provider
from receiver.schema import ModelInputs
from receiver.schema import ModelPrice
from receiver.schema import ModelTakes
from receiver.schema import ProviderInfo
from receiver.schema import ProviderLimits
from receiver.schema import ProviderList
from receiver.schema import ProviderName


def offered(settings: Settings) -> ProviderList:
    """The providers this deployment offers: those whose key is set, and the sandbox (always set)."""
    return ProviderList(
        items=[
            provider_info(REGISTRY[name], settings)
            for name in sorted(REGISTRY)
            if settings.provider(name).api_key
        ]
    )


def provider_info(provider: Provider, settings: Settings) -> ProviderInfo:
    """One provider: what it sells, what each model takes, and the limits the receiver paces it by (a
    pace group's are its owner's, as in pacing)."""
    owner = REGISTRY.get(provider.pace_group or provider.name, provider)
    configured = settings.provider(owner.name)
    per_window, window = owner.rate_limit or (None, None)
    if configured.max_per_minute:
        per_window, window = configured.max_per_minute, 60.0
    models = {}
    for model in (*provider.models, *provider.native_models):
        least, most = provider.image_range(model)
        models[model] = ModelInputs(
            min_images=least,
            max_images=most,
            # The provider's own id for it, without and with input images (a native id is itself).
            text_to_image=provider.native_model(model, False) if least == 0 else None,
            edit=provider.native_model(model, True) if most > 0 else None,
        )
    return ProviderInfo(
        name=ProviderName(provider.name),
        models=list(provider.models),
        default_model=provider.default_model,
        accepts_any_model=provider.accepts_any_model,
        fields=sorted(provider.fields),
        min_images=provider.min_images,
        max_images=provider.max_images,
        native_models=list(provider.native_models),
        other_models=provider.native_hint or None,
        model_inputs=models,
        takes={model: msgspec.convert(provider.takes(model).as_json(), ModelTakes) for model in models},
        data_uris="sent inline" if provider.inline_images else "sent as signed links",
        synchronous=provider.synchronous,
        limits=ProviderLimits(
            max_concurrent=configured.max_concurrent or owner.max_concurrent,
            max_concurrent_by_model=dict(provider.max_concurrent_by_model),
            new_tasks_per_window=per_window,
            window_seconds=window,
            shared_with=sorted(
                other.name
                for other in REGISTRY.values()
                if provider.pace_group and other.pace_group == provider.pace_group and other is not provider
            ),
        ),
        prices=msgspec.convert(prices_json(settings.prices, provider.name), dict[str, ModelPrice]),
        cooldown_until=None,  # the store's, filled in at each answer (receiver.api)
    )
