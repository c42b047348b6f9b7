"""The simulated services: TradeGecko and Katana MRP, true to their public contracts.

They stand in for the real services in the demo, the tests and the benchmarks; they share
nothing with syncd's API clients. :func:`running_simulators` serves both on loopback;
:mod:`syncd.sim.katana` and :mod:`syncd.sim.tradegecko` serve one (``syncd sim``).
"""

from syncd.sim._harness import (
    CHAIR_LINE,
    FactoryTokens,
    Simulators,
    catalogue_lines,
    free_port,
    free_ports,
    running_simulators,
)
from syncd.sim._katana_world import KatanaWorld
from syncd.sim._tradegecko_world import TradeGeckoWorld
from syncd.sim.katana import API_PREFIX as KATANA_API_PREFIX
from syncd.sim.tradegecko import DEFAULT_WEBHOOK_SECRET as TRADEGECKO_WEBHOOK_SECRET

__all__ = [
    "CHAIR_LINE",
    "KATANA_API_PREFIX",
    "TRADEGECKO_WEBHOOK_SECRET",
    "FactoryTokens",
    "KatanaWorld",
    "Simulators",
    "TradeGeckoWorld",
    "catalogue_lines",
    "free_port",
    "free_ports",
    "running_simulators",
]
