"""Katana MRP: the client syncd calls and the records it exchanges.

:class:`KatanaClient` wraps the endpoints syncd needs; :mod:`.models` holds the msgspec
structs for what Katana answers and what syncd sends.
"""

from syncd.adapters.katana.client import KatanaClient
from syncd.adapters.katana.models import (
    BomRow,
    Customer,
    Factory,
    InventoryRecord,
    ListEnvelope,
    ManufacturingOrder,
    NewCustomer,
    NewMakeToOrder,
    NewProduct,
    NewSalesOrder,
    NewSalesOrderRow,
    NewVariant,
    NewWebhook,
    Product,
    SalesOrder,
    SalesOrderRow,
    Variant,
    Webhook,
    encode_request,
)

__all__ = [
    "BomRow",
    "Customer",
    "Factory",
    "InventoryRecord",
    "KatanaClient",
    "ListEnvelope",
    "ManufacturingOrder",
    "NewCustomer",
    "NewMakeToOrder",
    "NewProduct",
    "NewSalesOrder",
    "NewSalesOrderRow",
    "NewVariant",
    "NewWebhook",
    "Product",
    "SalesOrder",
    "SalesOrderRow",
    "Variant",
    "Webhook",
    "encode_request",
]
