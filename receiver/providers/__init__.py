"""The registry: the only way the shell reaches a provider."""

from __future__ import annotations

from receiver.providers.apicore import Apicore
from receiver.providers.apimart import Apimart
from receiver.providers.base import Context
from receiver.providers.base import Provider
from receiver.providers.fal import Fal
from receiver.providers.kie import Kie
from receiver.providers.kie_market import KieMarket
from receiver.providers.sandbox import Sandbox

REGISTRY: dict[str, Provider] = {
    provider.name: provider
    for provider in (
        Kie(),
        KieMarket(),
        Apimart(),
        Apicore(),
        Fal(),
        Sandbox(),
    )
}

__all__ = ["REGISTRY", "Context", "Provider"]
