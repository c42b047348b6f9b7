"""The Katana client: the calls syncd makes, each a typed method over :class:`ServiceClient`.

Every list walks all of its pages (``limit=250``, following ``X-Pagination``) and returns
the records as :mod:`syncd.adapters.katana.models` structs. Array filters repeat the key
(``ids=1&ids=2``) and are sent in chunks so that a long id list cannot overflow a URL.
Creates are POSTs without idempotency keys, so :class:`ServiceClient` never retries them
blindly: callers look the natural key (``order_no``, ``reference_id``, ``sku``) up first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import httpx
import msgspec

from syncd.adapters._http import Params, ServiceClient
from syncd.adapters.katana.models import (
    Customer,
    Factory,
    InventoryRecord,
    ListEnvelope,
    ManufacturingOrder,
    NewCustomer,
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

__all__ = ["PAGE_SIZE", "KatanaClient", "format_time"]

T = TypeVar("T")

#: Katana's largest page; asking for more is silently cut to this.
PAGE_SIZE = 250
#: Values per array filter in one request, to keep URLs short.
_CHUNK = 100


def format_time(moment: datetime) -> str:
    """A timestamp as Katana writes them (UTC, milliseconds, ``Z``); naive means UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _chunks(values: Sequence[T]) -> list[list[T]]:
    unique = list(dict.fromkeys(values))
    return [unique[i : i + _CHUNK] for i in range(0, len(unique), _CHUNK)]


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

    # -- plumbing ----------------------------------------------------------------------

    def _decode(self, method: str, endpoint: str, response: httpx.Response, kind: type[T]) -> T:
        try:
            return msgspec.json.decode(response.content, type=kind)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise self.decode_error(method, endpoint, str(exc)) from None

    async def _get_all(
        self, path: str, kind: type[T], params: dict[str, Any] | None = None
    ) -> list[T]:
        """Every record of a list endpoint, following its pages to the last one."""
        items: list[T] = []
        page = 1
        while True:
            query: Params = {**(params or {}), "limit": PAGE_SIZE, "page": page}
            response = await self.request("GET", path, params=query)
            envelope = self._decode("GET", path, response, ListEnvelope[msgspec.Raw])
            items.extend(self.decode_each(envelope.data, kind, "GET", path))
            if self._is_last_page(response, page, len(envelope.data)):
                return items
            page += 1

    def _is_last_page(self, response: httpx.Response, page: int, count: int) -> bool:
        if count == 0:
            return True
        header = response.headers.get("X-Pagination")
        if header:
            try:
                facts = json.loads(header)
            except (ValueError, RecursionError):
                facts = None
            if isinstance(facts, dict):
                if str(facts.get("last_page", "")).lower() == "true":
                    return True
                try:
                    return page >= int(str(facts["total_pages"]))
                except (KeyError, ValueError):
                    pass
        # No usable header: a short page is the last one.
        return count < PAGE_SIZE

    async def _get_chunked(
        self,
        path: str,
        kind: type[T],
        key: str,
        values: Sequence[Any],
        params: dict[str, Any],
    ) -> list[T]:
        found: list[T] = []
        for chunk in _chunks(values):
            found.extend(await self._get_all(path, kind, {**params, key: chunk}))
        return found

    # -- factory -----------------------------------------------------------------------

    async def get_factory(self) -> Factory:
        """The account's base currency and default locations."""
        response = await self.request("GET", "/factory")
        return self._decode("GET", "/factory", response, Factory)

    # -- customers ---------------------------------------------------------------------

    async def find_customers(
        self, *, name: str | None = None, reference_id: str | None = None
    ) -> list[Customer]:
        """Live customers matching the given name and/or reference id (all when neither)."""
        params: dict[str, Any] = {}
        if name is not None:
            params["name"] = name
        if reference_id is not None:
            params["reference_id"] = reference_id
        return await self._get_all("/customers", Customer, params)

    async def create_customer(
        self, *, name: str, reference_id: str | None = None, currency: str | None = None
    ) -> Customer:
        """Create a customer. Not retried: look ``reference_id`` up first."""
        body = encode_request(NewCustomer(name=name, reference_id=reference_id, currency=currency))
        response = await self.request("POST", "/customers", body=body)
        return self._decode("POST", "/customers", response, Customer)

    # -- variants and products ---------------------------------------------------------

    async def find_variants(
        self, skus: Sequence[str], *, include_deleted: bool = False
    ) -> list[Variant]:
        """Variants whose ``sku`` is one of ``skus``.

        A sku may also exist on deleted variants (with ``include_deleted``); callers should
        prefer the one whose ``deleted_at`` is ``None``.
        """
        if not skus:
            return []
        params: dict[str, Any] = {"include_deleted": "true"} if include_deleted else {}
        return await self._get_chunked("/variants", Variant, "sku", skus, params)

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
        response = await self.request("POST", "/products", body=body)
        return self._decode("POST", "/products", response, Product)

    # -- sales orders ------------------------------------------------------------------

    async def list_sales_orders(
        self,
        *,
        ids: Sequence[int] | None = None,
        order_no: str | None = None,
        updated_at_min: datetime | None = None,
        include_deleted: bool = False,
    ) -> list[SalesOrder]:
        """Sales orders matching every given filter, newest first, all pages."""
        params: dict[str, Any] = {}
        if order_no is not None:
            params["order_no"] = order_no
        if updated_at_min is not None:
            params["updated_at_min"] = format_time(updated_at_min)
        if include_deleted:
            params["include_deleted"] = "true"
        if ids is not None:
            if not ids:
                return []
            return await self._get_chunked("/sales_orders", SalesOrder, "ids", ids, params)
        return await self._get_all("/sales_orders", SalesOrder, params)

    async def get_sales_order(self, sales_order_id: int) -> SalesOrder:
        """One sales order with its live rows.

        :raises syncd.errors.NotFound: when Katana has no such order.
        """
        template = "/sales_orders/{id}"
        response = await self.request(
            "GET", f"/sales_orders/{int(sales_order_id)}", template=template
        )
        return self._decode("GET", template, response, SalesOrder)

    async def create_sales_order(self, order: NewSalesOrder) -> SalesOrder:
        """Create a sales order. Not retried: look ``order_no`` up first."""
        response = await self.request("POST", "/sales_orders", body=encode_request(order))
        return self._decode("POST", "/sales_orders", response, SalesOrder)

    async def list_sales_order_rows(
        self, sales_order_ids: Sequence[int], *, include_deleted: bool = False
    ) -> list[SalesOrderRow]:
        """The rows of the given sales orders (deleted ones too with ``include_deleted``)."""
        if not sales_order_ids:
            return []
        params: dict[str, Any] = {"include_deleted": "true"} if include_deleted else {}
        return await self._get_chunked(
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
        """Manufacturing orders matching every given filter, all pages."""
        params: dict[str, Any] = {}
        if updated_at_min is not None:
            params["updated_at_min"] = format_time(updated_at_min)
        if include_deleted:
            params["include_deleted"] = "true"
        path = "/manufacturing_orders"
        if ids is not None:
            if not ids:
                return []
            return await self._get_chunked(path, ManufacturingOrder, "ids", ids, params)
        return await self._get_all(path, ManufacturingOrder, params)

    async def get_inventory(self, variant_ids: Sequence[int]) -> list[InventoryRecord]:
        """Stock and average cost of the given variants, one record per location.

        Katana spells this filter ``variant_id`` (repeated), not ``variant_ids``.
        """
        if not variant_ids:
            return []
        return await self._get_chunked("/inventory", InventoryRecord, "variant_id", variant_ids, {})

    # -- webhooks ----------------------------------------------------------------------

    async def list_webhooks(self) -> list[Webhook]:
        """Every webhook subscription of the account."""
        return await self._get_all("/webhooks", Webhook)

    async def create_webhook(
        self, url: str, events: Sequence[str], *, description: str | None = None
    ) -> Webhook:
        """Subscribe ``url`` (``https://``) to ``events``; the answer carries the token.

        Not retried: list the webhooks first.
        """
        body = encode_request(
            NewWebhook(url=url, subscribed_events=list(events), description=description)
        )
        response = await self.request("POST", "/webhooks", body=body)
        return self._decode("POST", "/webhooks", response, Webhook)
