"""The TradeGecko API client: the calls syncd makes, on top of the shared HTTP plumbing.

:class:`TradeGeckoClient` adds TradeGecko's conventions to
:class:`~syncd.adapters._http.ServiceClient`: the ``X-Rate-Limit-*`` headers (reset in epoch
seconds, 300 requests per 300 s), record envelopes, Rails-style array filters
(``ids[]=1&ids[]=2``) and paging by ``limit``/``page`` with the JSON ``X-Pagination`` header.
List calls walk every page. Id and SKU filters are sent in batches so that a long filter
never makes a URL the API refuses (414); an empty filter returns nothing rather than
listing everything. Naive datetimes given as filters are taken to be UTC.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import msgspec

from syncd.adapters._http import ServiceClient, WritePlan, chunks, format_time
from syncd.adapters.tradegecko.models import (
    Account,
    AccountEnvelope,
    Company,
    Currency,
    Procurement,
    ProcurementEnvelope,
    PurchaseOrder,
    PurchaseOrderEnvelope,
    PurchaseOrderLineItem,
    Variant,
    Webhook,
    WebhookEnvelope,
)

__all__ = ["TradeGeckoClient"]


class TradeGeckoClient(ServiceClient):
    """The TradeGecko API v1, as syncd uses it.

    :param base_url: the API root, ``https://api.tradegecko.com`` in production.
    :param token: a privileged access token (or an OAuth2 access token).
    :param budget: the daemon's shared TradeGecko budget; 300 per 300 s by default.
    :param transport: an httpx transport, for tests.
    :param kwargs: the rest of :class:`~syncd.adapters._http.ServiceClient`'s
        (``timeout``, ``attempts``, ``max_rate_wait``, ``on_response``).
    """

    service = "tradegecko"
    default_limit = (300, 300.0)
    remaining_header = "X-Rate-Limit-Remaining"
    reset_header = "X-Rate-Limit-Reset"
    fixed_window = True
    #: The largest page TradeGecko serves; more is a 400.
    page_size = 250

    # -- envelope and filter style -----------------------------------------------------

    def _records(self, response: httpx.Response, endpoint: str) -> list[msgspec.Raw]:
        # A list comes under its resource's name: ``/purchase_orders`` answers
        # ``{"purchase_orders": [...], "meta": ...}``.
        key = endpoint.rsplit("/", 1)[-1]
        body = self.decode(response.content, dict[str, msgspec.Raw], "GET", endpoint)
        if key not in body:
            raise self.decode_error("GET", endpoint, f"no {key!r} list in the answer")
        return self.decode(body[key], list[msgspec.Raw], "GET", endpoint)

    def _array_filter(self, name: str, values: Sequence[str | int]) -> dict[str, Any]:
        # Rails arrays, ``sku[]=a&sku[]=b``; one value goes as ``sku=a``. A filter TradeGecko
        # documents only as an array (``ids[]``) is named so and always sent as one.
        if name.endswith("[]"):
            return {name: list(values)}
        if len(values) == 1:
            return {name: values[0]}
        return {f"{name}[]": list(values)}

    # -- a shadow run's planned writes --------------------------------------------------

    def _placeholder(
        self, plan: WritePlan, method: str, endpoint: str, path: str, body: Any
    ) -> Any:
        # What TradeGecko would answer, with placeholder ids; webhooks are never planned.
        item_id = _path_id(path)
        if (method, endpoint) == ("PUT", "/purchase_order_line_items/{id}") and item_id:
            line = body.get("purchase_order_line_item", {}) if isinstance(body, dict) else {}
            return {"purchase_order_line_item": {**line, "id": item_id}}
        if (method, endpoint) == ("POST", "/purchase_orders/{id}/actions/receive") and item_id:
            procurement = {
                "id": plan.new_id(),
                "purchase_order_id": item_id,
                "purchase_order_line_item_ids": [],
            }
            return {"procurement": procurement}
        return None

    # -- reads -------------------------------------------------------------------------

    async def get_current_account(self) -> Account:
        """The account the token belongs to (its base currency is ``default_currency_id``)."""
        envelope = await self.fetch("GET", "/accounts/current", AccountEnvelope)
        return envelope.account

    async def list_companies(self, *, company_type: str | None = None) -> list[Company]:
        """Every company, or those of one ``company_type`` (``supplier``, ``business``...).

        TradeGecko has no name filter: match ``name`` yourself.
        """
        params: dict[str, Any] = {}
        if company_type is not None:
            params["company_type"] = company_type
        return await self.list_all("/companies", Company, params)

    async def list_currencies(self) -> list[Currency]:
        """Every currency of the account."""
        return await self.list_all("/currencies", Currency)

    async def list_variants(
        self, *, ids: Sequence[int] | None = None, skus: Sequence[str] | None = None
    ) -> list[Variant]:
        """Variants by id and/or SKU (both filters apply when both are given).

        An empty ``ids`` or ``skus`` returns an empty list without a request.
        """
        if (ids is not None and not ids) or (skus is not None and not skus):
            return []
        # Both filters chunked: every chunk of one with every chunk of the other.
        size = self.chunk_size
        id_filters = [self._array_filter("ids[]", c) for c in chunks(ids, size)] if ids else [{}]
        sku_filters = [self._array_filter("sku", c) for c in chunks(skus, size)] if skus else [{}]
        found: dict[int, Variant] = {}
        for id_filter in id_filters:
            for sku_filter in sku_filters:
                params = {**id_filter, **sku_filter}
                for variant in await self.list_all("/variants", Variant, params):
                    found.setdefault(variant.id, variant)
        return list(found.values())

    async def list_purchase_orders(
        self,
        *,
        ids: Sequence[int] | None = None,
        company_ids: Sequence[int] | None = None,
        status: str | None = None,
        order_number: str | None = None,
        created_at_min: datetime | None = None,
        updated_at_min: datetime | None = None,
    ) -> list[PurchaseOrder]:
        """Purchase orders matching every filter given, newest first, all pages.

        An empty ``ids`` or ``company_ids`` returns an empty list without a request.
        """
        if company_ids is not None and not company_ids:
            return []
        params: dict[str, Any] = {}
        if company_ids is not None:
            params.update(self._array_filter("company_id", company_ids))
        if status is not None:
            params["status"] = status
        if order_number is not None:
            params["order_number"] = order_number
        if created_at_min is not None:
            params["created_at_min"] = format_time(created_at_min)
        if updated_at_min is not None:
            params["updated_at_min"] = format_time(updated_at_min)
        if ids is not None:
            return await self.list_matching("/purchase_orders", PurchaseOrder, "ids[]", ids, params)
        return await self.list_all("/purchase_orders", PurchaseOrder, params)

    async def get_purchase_order(
        self, purchase_order_id: int
    ) -> tuple[PurchaseOrder, list[PurchaseOrderLineItem]]:
        """One purchase order with its lines (side-loaded in the same request).

        :raises syncd.errors.NotFound: the purchase order does not exist.
        """
        envelope = await self.fetch(
            "GET",
            f"/purchase_orders/{purchase_order_id}",
            PurchaseOrderEnvelope,
            params={"include": "purchase_order_line_items"},
            template="/purchase_orders/{id}",
        )
        lines = [
            line
            for line in envelope.purchase_order_line_items
            if line.purchase_order_id == envelope.purchase_order.id
        ]
        wanted = set(envelope.purchase_order.purchase_order_line_item_ids)
        if wanted - {line.id for line in lines}:
            # A side-load may be cut short (assumed at one page of 250, unverified): page
            # through the lines instead.
            lines = await self.list_purchase_order_line_items(purchase_order_id)
        return envelope.purchase_order, lines

    async def list_purchase_order_line_items(
        self, purchase_order_id: int
    ) -> list[PurchaseOrderLineItem]:
        """Every line of one purchase order."""
        return await self.list_all(
            "/purchase_order_line_items",
            PurchaseOrderLineItem,
            {"purchase_order_id": purchase_order_id},
        )

    async def lines_of_purchase_orders(
        self, purchase_order_ids: Sequence[int]
    ) -> dict[int, list[PurchaseOrderLineItem]]:
        """The lines of several purchase orders in one read (250 a page, chunked), by PO
        id; every id asked for is a key, a PO without lines (or unknown) has none."""
        found: dict[int, list[PurchaseOrderLineItem]] = {po_id: [] for po_id in purchase_order_ids}
        lines = await self.list_matching(
            "/purchase_order_line_items",
            PurchaseOrderLineItem,
            "purchase_order_id",
            sorted(found),
        )
        for line in lines:
            if line.purchase_order_id in found:
                found[line.purchase_order_id].append(line)
        return found

    # -- writes ------------------------------------------------------------------------

    async def update_line_item_price(
        self, line_item_id: int, price: Decimal, *, idempotency_key: str | None = None
    ) -> None:
        """Set one purchase order line's unit price (a PUT: safe to retry).

        :raises syncd.errors.ValidationFailed: TradeGecko refused the price.
        """
        body = json.dumps({"purchase_order_line_item": {"price": format(price, "f")}})
        await self.request(
            "PUT",
            f"/purchase_order_line_items/{line_item_id}",
            body=body.encode(),
            idempotency_key=idempotency_key,
            template="/purchase_order_line_items/{id}",
        )

    async def receive_purchase_order(
        self, purchase_order_id: int, *, idempotency_key: str
    ) -> Procurement:
        """Receive the whole purchase order into stock; answers the new procurement.

        The idempotency key makes the POST safe to retry: TradeGecko replays the first
        answer for a key it has seen in the last 24 h.

        :raises syncd.errors.ValidationFailed: the order cannot be received (not active).
        """
        template = "/purchase_orders/{id}/actions/receive"
        envelope = await self.fetch(
            "POST",
            f"/purchase_orders/{purchase_order_id}/actions/receive",
            ProcurementEnvelope,
            idempotency_key=idempotency_key,
            template=template,
        )
        return envelope.procurement

    # -- webhooks ----------------------------------------------------------------------

    async def list_webhooks(self) -> list[Webhook]:
        """Every webhook subscription of the OAuth application."""
        return await self.list_all("/webhooks", Webhook)

    async def create_webhook(self, address: str, event: str) -> Webhook:
        """Subscribe ``address`` to one ``event``. Not retried: list the webhooks first."""
        body = json.dumps({"webhook": {"address": address, "event": event}}).encode()
        envelope = await self.fetch("POST", "/webhooks", WebhookEnvelope, body=body)
        return envelope.webhook


def _path_id(path: str) -> int | None:
    """The record id in a path such as ``/purchase_orders/12/actions/receive``."""
    parts = path.strip("/").split("/")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
