"""The registry: the only way the shell reaches a provider."""

from __future__ import annotations

from receiver.providers.base import Context, Provider
from receiver.providers.kie import Kie
from receiver.providers.sandbox import Sandbox

REGISTRY: dict[str, Provider] = {provider.name: provider for provider in (Kie(), Sandbox())}

__all__ = ["REGISTRY", "Context", "Provider"]
