"""Provider fakes: small HTTP servers speaking each provider's wire format (providers.md).

FAKES lists every fake the shared end-to-end suite runs against; add a provider's fake here.
"""

from __future__ import annotations

from tests.fakes.apicore import ApicoreFake
from tests.fakes.apimart import ApimartFake
from tests.fakes.common import ProviderFake
from tests.fakes.fal import FalFake
from tests.fakes.kie import KieFake
from tests.fakes.kie_market import KieMarketFake

FAKES: list[type[ProviderFake]] = [KieFake, KieMarketFake, ApimartFake, ApicoreFake, FalFake]
