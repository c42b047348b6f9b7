"""The Katana client: the calls syncd makes, each a typed method over :class:`ServiceClient`.

Every list walks all of its pages (``limit=250``, following ``X-Pagination``) and returns
the records as :mod:`syncd.adapters.katana.models` structs. Array filters repeat the key
(``ids=1&ids=2``) and are sent in chunks so that a long id list cannot overflow a URL.
Creates are POSTs without idempotency keys, so :class:`ServiceClient` never retries them
blindly: callers look the natural key (``order_no``, ``reference_id``, ``sku``) up first.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import httpx
import msgspec

from syncd.adapters._http import ServiceClient, WritePlan, format_time
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
    NewVariant,
    NewWebhook,
    Product,
    SalesOrder,
    SalesOrderRow,
    Variant,
    Webhook,
    encode_request,
)

__all__ = ["KatanaClient"]


_Record = TypeVar("_Record")


class KatanaClient(ServiceClient):
    """Katana's public API, as syncd uses it.

    :param base_url: the API root, ``https://api.katanamrp.com/v1`` in production.
    :param token: the API key.
    :param budget: the daemon-wide request budget; Katana allows 60 requests per 60 s.
    :param transport: an httpx transport, for tests.
    :param kwargs: the rest of :class:`ServiceClient`'s (``timeout``, ``attempts``, ...).
    """

    service = "katana"
    default_limit = (60, 60.0)
    remaining_header = "X-Ratelimit-Remaining"
    reset_header = "X-Ratelimit-Reset"
    #: Katana's largest page; asking for more is silently cut to this.
    page_size = 250

    # -- envelope and filter style -----------------------------------------------------

    def _records(self, response: httpx.Response, endpoint: str) -> list[msgspec.Raw]:
        # Every list comes as ``{"data": [...]}``.
        return self.decode(response.content, ListEnvelope[msgspec.Raw], "GET", endpoint).data

    def _array_filter(self, name: str, values: Sequence[str | int]) -> dict[str, Any]:
        # An array filter repeats its key: ``ids=1&ids=2``.
        return {name: list(values)}

    # -- a shadow run's planned writes --------------------------------------------------

    def _placeholder(
        self, plan: WritePlan, method: str, endpoint: str, path: str, body: Any
    ) -> Any:
        # What Katana would answer, with placeholder ids; webhooks are never planned (a
        # shadow run registers none).
        if method != "POST" or not isinstance(body, dict):
            return None
        now = format_time(datetime.now(UTC))
        if endpoint == "/customers":
            return {**body, "id": plan.new_id()}
        if endpoint == "/products":
            product_id = plan.new_id()
            variants = [
                {**variant, "id": plan.new_id(), "product_id": product_id}
                for variant in body.get("variants", [])
            ]
            return {**body, "id": product_id, "variants": variants}
        if endpoint == "/sales_orders":
            order_id = plan.new_id()
            rows = [
                {**row, "id": plan.new_id(), "sales_order_id": order_id}
                for row in body.get("sales_order_rows", [])
            ]
            return {
                **body,
                "id": order_id,
                "status": "NOT_SHIPPED",
                "sales_order_rows": rows,
                "created_at": now,
                "updated_at": now,
            }
        if endpoint == "/manufacturing_order_make_to_order":
            # The variant is the row's, which the request does not name: 0, never read.
            return {
                "id": plan.new_id(),
                "status": "NOT_STARTED",
                "variant_id": 0,
                "sales_order_row_id": body.get("sales_order_row_id"),
                "created_at": now,
                "updated_at": now,
            }
        return None

    # -- factory -----------------------------------------------------------------------

    async def get_factory(self) -> Factory:
        """The account's base currency and default locations."""
        return await self.fetch("GET", "/factory", Factory)

    # -- customers ---------------------------------------------------------------------

    async def list_customers(
        self, *, name: str | None = None, reference_id: str | None = None
    ) -> list[Customer]:
        """Live customers matching the given name and/or reference id (all when neither)."""
        params: dict[str, Any] = {}
        if name is not None:
            params["name"] = name
        if reference_id is not None:
            params["reference_id"] = reference_id
        return await self.list_all("/customers", Customer, params)

    async def create_customer(
        self, *, name: str, reference_id: str | None = None, currency: str | None = None
    ) -> Customer:
        """Create a customer. Not retried: look ``reference_id`` up first."""
        body = encode_request(NewCustomer(name=name, reference_id=reference_id, currency=currency))
        return await self.fetch("POST", "/customers", Customer, body=body)

    # -- variants and products ---------------------------------------------------------

    async def list_variants(
        self, *, skus: Sequence[str], include_deleted: bool = False
    ) -> list[Variant]:
        """Variants whose ``sku`` is one of ``skus`` (none without a request when empty).

        A sku may also exist on deleted variants (with ``include_deleted``); callers should
        prefer the one whose ``deleted_at`` is ``None``.
        """
        params: dict[str, Any] = {"include_deleted": "true"} if include_deleted else {}
        return await self.list_matching("/variants", Variant, "sku", skus, params)

    async def create_product(
        self,
        *,
        name: str,
        sku: str,
        sales_price: Decimal | None = None,
        purchase_price: Decimal | None = None,
    ) -> Product:
        """Create a product with one variant. Not retried: look ``sku`` up first."""
        variant = NewVariant(sku=sku, sales_price=sales_price, purchase_price=purchase_price)
        body = encode_request(NewProduct(name=name, variants=[variant]))
        return await self.fetch("POST", "/products", Product, body=body)

    # -- sales orders ------------------------------------------------------------------

    async def list_sales_orders(
        self,
        *,
        ids: Sequence[int] | None = None,
        order_no: str | None = None,
        ecommerce_order_id: str | None = None,
        ecommerce_store_name: str | None = None,
        ecommerce_order_type: str | None = None,
        updated_at_min: datetime | None = None,
        include_deleted: bool = False,
    ) -> list[SalesOrder]:
        """Sales orders matching every given filter, newest first, all pages.

        An empty ``ids`` returns an empty list without a request.
        """
        filters = {
            "order_no": order_no,
            "ecommerce_order_id": ecommerce_order_id,
            "ecommerce_store_name": ecommerce_store_name,
            "ecommerce_order_type": ecommerce_order_type,
        }
        params: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
        return await self._list_changed(
            "/sales_orders", SalesOrder, ids, updated_at_min, include_deleted, params
        )

    async def get_sales_order(self, sales_order_id: int) -> SalesOrder:
        """One sales order with its live rows.

        :raises syncd.errors.NotFound: when Katana has no such order.
        """
        path = f"/sales_orders/{int(sales_order_id)}"
        return await self.fetch("GET", path, SalesOrder, template="/sales_orders/{id}")

    async def create_sales_order(self, order: NewSalesOrder) -> SalesOrder:
        """Create a sales order. Not retried: after a failed attempt, look it up first (by
        ``ecommerce_order_id``)."""
        return await self.fetch("POST", "/sales_orders", SalesOrder, body=encode_request(order))

    async def delete_sales_order(self, sales_order_id: int) -> None:
        """Delete a sales order (``DELETE /sales_orders/{id}``, idempotent).

        :raises syncd.errors.NotFound: Katana has no such order (or it is deleted already).
        :raises syncd.errors.ApiError: status 412: Katana refuses while the order has linked
            records (manufacturing orders, return orders).
        """
        path = f"/sales_orders/{int(sales_order_id)}"
        await self.request("DELETE", path, template="/sales_orders/{id}")

    async def list_sales_order_rows(
        self, sales_order_ids: Sequence[int], *, include_deleted: bool = False
    ) -> list[SalesOrderRow]:
        """The rows of the given sales orders (deleted ones too with ``include_deleted``)."""
        params: dict[str, Any] = {"include_deleted": "true"} if include_deleted else {}
        return await self.list_matching(
            "/sales_order_rows", SalesOrderRow, "sales_order_ids", sales_order_ids, params
        )

    # -- manufacturing and stock -------------------------------------------------------

    async def list_manufacturing_orders(
        self,
        *,
        ids: Sequence[int] | None = None,
        updated_at_min: datetime | None = None,
        include_deleted: bool = False,
    ) -> list[ManufacturingOrder]:
        """Manufacturing orders matching every given filter, all pages.

        An empty ``ids`` returns an empty list without a request.
        """
        return await self._list_changed(
            "/manufacturing_orders", ManufacturingOrder, ids, updated_at_min, include_deleted
        )

    async def _list_changed(
        self,
        path: str,
        kind: type[_Record],
        ids: Sequence[int] | None,
        updated_at_min: datetime | None,
        include_deleted: bool,
        params: dict[str, Any] | None = None,
    ) -> list[_Record]:
        """A list endpoint's records with these ``ids`` (all when ``None``), changed since
        ``updated_at_min``, deleted ones too with ``include_deleted``; ``params`` filter more."""
        params = dict(params or {})
        if updated_at_min is not None:
            params["updated_at_min"] = format_time(updated_at_min)
        if include_deleted:
            params["include_deleted"] = "true"
        if ids is not None:
            return await self.list_matching(path, kind, "ids", ids, params)
        return await self.list_all(path, kind, params)

    async def make_to_order(
        self, sales_order_row_id: int, *, create_subassemblies: bool = False
    ) -> ManufacturingOrder:
        """Make a manufacturing order for one sales order row ("Make to order"). Not
        retried: read the row's ``linked_manufacturing_order_id`` first."""
        body = encode_request(
            NewMakeToOrder(
                sales_order_row_id=sales_order_row_id, create_subassemblies=create_subassemblies
            )
        )
        return await self.fetch(
            "POST", "/manufacturing_order_make_to_order", ManufacturingOrder, body=body
        )

    async def list_bom_rows(self, product_variant_id: int) -> list[BomRow]:
        """The recipe (bill of materials) of one product variant; empty when it has none."""
        params = {"product_variant_id": int(product_variant_id)}
        return await self.list_all("/bom_rows", BomRow, params)

    async def list_inventory(self, variant_ids: Sequence[int]) -> list[InventoryRecord]:
        """Stock and average cost of the given variants, one record per location.

        Katana spells this filter ``variant_id`` (repeated), not ``variant_ids``.
        """
        return await self.list_matching("/inventory", InventoryRecord, "variant_id", variant_ids)

    # -- webhooks ----------------------------------------------------------------------

    async def list_webhooks(self) -> list[Webhook]:
        """Every webhook subscription of the account."""
        return await self.list_all("/webhooks", Webhook)

    async def create_webhook(
        self, url: str, events: Sequence[str], *, description: str | None = None
    ) -> Webhook:
        """Subscribe ``url`` (``https://``) to ``events``; the answer carries the token.

        Not retried: list the webhooks first.
        """
        body = encode_request(
            NewWebhook(url=url, subscribed_events=list(events), description=description)
        )
        return await self.fetch("POST", "/webhooks", Webhook, body=body)
