"""syncd links TradeGecko purchase orders with Katana MRP sales orders."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("syncd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
