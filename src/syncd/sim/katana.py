"""A Katana MRP simulator: the public API syncd uses, plus a control panel for the people.

The API is served under ``/v1`` with Katana's paths, envelopes, field names, status values,
decimal strings, paging (``limit``/``page`` and the ``X-Pagination`` header), soft deletes,
bearer auth and a per-token sliding-window rate limit with Katana's headers. Every answer
validates against the published OpenAPI contract (the contract tests check this).

``/_sim`` is the control panel: no auth and no rate limit, because it plays the workshop's
people (pressing "Make to order", starting and finishing manufacturing orders, delivering)
and must not eat into syncd's API budget. ``GET /_sim/counters`` tells tests how often the
daemon called each endpoint and whether it created an order number twice.

It serves many accounts at once, one workshop per API token (see :mod:`syncd.sim._frame`):
``POST /_sim/accounts {"token": ...}`` adds one, whose workshop is seeded on first use; a
control call names its account with the ``X-Sim-Account`` header or ``?account=``. Each
account has its own webhooks (each with its own token), counters, rate budget and
revocation knob.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from syncd.sim._frame import (
    Account,
    Dialect,
    Frame,
    Page,
    Quota,
    SlidingWindow,
    json_response,
    serve,
)
from syncd.sim._katana_world import KatanaError, KatanaWorld
from syncd.sim.faults import Faults
from syncd.sim.webhooks import Subscription, WebhookSender, katana_sender, new_token

__all__ = [
    "API_PREFIX",
    "DEFAULT_LIMIT",
    "DIALECT",
    "MAX_LIMIT",
    "WEBHOOK_EVENTS",
    "KatanaError",
    "KatanaWorld",
    "WorldHandler",
    "create_app",
    "run",
]

API_PREFIX = "/v1"
DEFAULT_LIMIT = 50
MAX_LIMIT = 250

#: The webhook events Katana knows: the ``WebhookEvent`` enum of ``apis/katana/openapi.yaml``
#: (a test checks this copy against it). Creating a webhook for another is a 422.
WEBHOOK_EVENTS: tuple[str, ...] = (
    "sales_order.created",
    "sales_order.approved",
    "sales_order.updated",
    "sales_order.deleted",
    "sales_order.packed",
    "sales_order.delivered",
    "sales_order.availability_updated",
    "purchase_order.created",
    "purchase_order.approved",
    "purchase_order.updated",
    "purchase_order.deleted",
    "purchase_order.partially_received",
    "purchase_order.received",
    "purchase_order_row.created",
    "purchase_order_row.updated",
    "purchase_order_row.deleted",
    "purchase_order_row.received",
    "manufacturing_order.created",
    "manufacturing_order.updated",
    "manufacturing_order.deleted",
    "manufacturing_order.in_progress",
    "manufacturing_order.blocked",
    "manufacturing_order.done",
    "manufacturing_order_operation_row.created",
    "manufacturing_order_operation_row.updated",
    "manufacturing_order_operation_row.deleted",
    "manufacturing_order_operation_row.in_progress",
    "manufacturing_order_operation_row.paused",
    "manufacturing_order_operation_row.blocked",
    "manufacturing_order_operation_row.completed",
    "manufacturing_order_recipe_row.created",
    "manufacturing_order_recipe_row.updated",
    "manufacturing_order_recipe_row.deleted",
    "manufacturing_order_recipe_row.ingredients_in_stock",
    "current_inventory.product_updated",
    "current_inventory.material_updated",
    "current_inventory.product_out_of_stock",
    "current_inventory.material_out_of_stock",
    "product.created",
    "product.updated",
    "product.deleted",
    "material.created",
    "material.updated",
    "material.deleted",
    "variant.created",
    "variant.updated",
    "variant.deleted",
    "product_recipe_row.created",
    "product_recipe_row.updated",
    "product_recipe_row.deleted",
    "outsourced_purchase_order.created",
    "outsourced_purchase_order.approved",
    "outsourced_purchase_order.updated",
    "outsourced_purchase_order.deleted",
    "outsourced_purchase_order.received",
    "outsourced_purchase_order_row.created",
    "outsourced_purchase_order_row.updated",
    "outsourced_purchase_order_row.deleted",
    "outsourced_purchase_order_row.received",
    "outsourced_purchase_order_recipe_row.created",
    "outsourced_purchase_order_recipe_row.updated",
    "outsourced_purchase_order_recipe_row.deleted",
)

T = TypeVar("T")
#: An endpoint of this simulator: the request and the account it acts on.
WorldHandler = Callable[[Request, KatanaWorld], Awaitable[Any]]


# -- request bodies (unknown fields are refused, as Katana does) --------------------------


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class _CreateCustomer(_Body):
    name: str
    first_name: str | None = None
    last_name: str | None = None
    company: str | None = None
    email: str | None = None
    phone: str | None = None
    comment: str | None = None
    currency: str | None = None
    reference_id: str | None = None
    category: str | None = None
    discount_rate: Decimal | None = None
    addresses: list[dict[str, Any]] = []


class _CreateVariant(_Body):
    sku: str | None = None
    sales_price: Decimal | None = None
    purchase_price: Decimal | None = None
    product_id: int | None = None
    material_id: int | None = None
    supplier_item_codes: list[str] = []
    internal_barcode: str | None = None
    registered_barcode: str | None = None
    lead_time: int | None = None
    minimum_order_quantity: Decimal | None = None
    config_attributes: list[dict[str, Any]] = []
    custom_fields: list[dict[str, Any]] = []


class _CreateProduct(_Body):
    name: str
    variants: list[_CreateVariant]
    uom: str | None = None
    category_name: str | None = None
    is_sellable: bool | None = None
    is_producible: bool | None = None
    is_purchasable: bool | None = None
    is_auto_assembly: bool | None = None
    default_supplier_id: int | None = None
    additional_info: str | None = None
    batch_tracked: bool | None = None
    serial_tracked: bool | None = None
    operations_in_sequence: bool | None = None
    purchase_uom: str | None = None
    purchase_uom_conversion_rate: Decimal | None = None
    configs: list[dict[str, Any]] = []
    custom_field_collection_id: int | None = None


class _CreateRow(_Body):
    quantity: Decimal
    variant_id: int
    tax_rate_id: int | None = None
    location_id: int | None = None
    price_per_unit: Decimal | None = None
    total_discount: Decimal | None = None
    attributes: list[dict[str, Any]] = []
    custom_fields: dict[str, Any] | None = None


_UNSET: Any = msgspec.UNSET


class _CreateSalesOrder(_Body):
    customer_id: int
    sales_order_rows: list[_CreateRow]
    order_no: str | msgspec.UnsetType = _UNSET
    location_id: int | msgspec.UnsetType = _UNSET
    status: str | msgspec.UnsetType = _UNSET
    tracking_number: str | None = None
    tracking_number_url: str | None = None
    addresses: list[dict[str, Any]] = []
    order_created_date: str | None = None
    delivery_date: str | None = None
    currency: str | None = None
    additional_info: str | None = None
    customer_ref: str | None = None
    ecommerce_order_type: str | None = None
    ecommerce_store_name: str | None = None
    ecommerce_order_id: str | None = None
    custom_fields: dict[str, Any] | None = None


class _UpdateSalesOrder(_Body):
    order_no: str | msgspec.UnsetType = _UNSET
    customer_id: int | msgspec.UnsetType = _UNSET
    order_created_date: str | msgspec.UnsetType = _UNSET
    delivery_date: str | msgspec.UnsetType = _UNSET
    picked_date: str | msgspec.UnsetType = _UNSET
    location_id: int | msgspec.UnsetType = _UNSET
    status: str | msgspec.UnsetType = _UNSET
    currency: str | msgspec.UnsetType = _UNSET
    conversion_rate: Decimal | msgspec.UnsetType = _UNSET
    conversion_date: str | msgspec.UnsetType = _UNSET
    additional_info: str | msgspec.UnsetType | None = _UNSET
    customer_ref: str | msgspec.UnsetType | None = _UNSET
    tracking_number: str | msgspec.UnsetType | None = _UNSET
    tracking_number_url: str | msgspec.UnsetType | None = _UNSET
    custom_fields: dict[str, Any] | msgspec.UnsetType | None = _UNSET


class _UpdateManufacturingOrder(_Body):
    status: str | msgspec.UnsetType = _UNSET
    order_no: str | msgspec.UnsetType = _UNSET
    variant_id: int | msgspec.UnsetType = _UNSET
    location_id: int | msgspec.UnsetType = _UNSET
    planned_quantity: Decimal | msgspec.UnsetType = _UNSET
    actual_quantity: Decimal | msgspec.UnsetType | None = _UNSET
    order_created_date: str | msgspec.UnsetType = _UNSET
    production_deadline_date: str | msgspec.UnsetType | None = _UNSET
    done_date: str | msgspec.UnsetType | None = _UNSET
    additional_info: str | msgspec.UnsetType = _UNSET
    batch_transactions: list[dict[str, Any]] | msgspec.UnsetType = _UNSET
    serial_numbers: list[int] | msgspec.UnsetType = _UNSET


class _MakeToOrder(_Body):
    sales_order_row_id: int
    create_subassemblies: bool = False


# control bodies


class _CreateWebhook(_Body):
    url: str
    subscribed_events: list[str]
    enabled: bool = True
    description: str | None = None


class _SetStatus(_Body):
    status: str


class _RowEdit(_Body):
    id: int
    quantity: Decimal | None = None
    price_per_unit: Decimal | None = None
    delete: bool = False


class _EditSalesOrder(_Body):
    rows: list[_RowEdit] = []
    #: A person renames the order in Katana's UI.
    order_no: str | msgspec.UnsetType = _UNSET


class _RecipeRow(_Body):
    sku: str
    quantity: Decimal


class _OperationRow(_Body):
    name: str
    hours: Decimal
    cost_per_hour: Decimal


class _SimProduct(_Body):
    name: str
    sku: str
    sales_price: Decimal | None = None
    purchase_price: Decimal | None = None
    recipe: list[_RecipeRow] = []
    operations: list[_OperationRow] = []


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]+)`")
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]+)`")


def _validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> KatanaError:
    """Katana's Ajv-style 422 from a msgspec decoding error."""
    message = str(exc)
    at = _AT.search(message)
    path = at.group("path") if at else ""
    message = _AT.sub("", message)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return KatanaError(400, "BadRequest", f"Malformed JSON: {message}")
    if match := _UNKNOWN.match(message):
        return KatanaError.invalid(
            path,
            "additionalProperties",
            "should NOT have additional properties",
            additionalProperty=match.group("name"),
        )
    if match := _MISSING.match(message):
        return KatanaError.invalid(
            path,
            "required",
            f"should have required property '{match.group('name')}'",
            missingProperty=match.group("name"),
        )
    return KatanaError.invalid(path, "type", message)


async def _body(request: Request, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(await request.body(), type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _validation_error(exc) from None


# -- query helpers ------------------------------------------------------------------------


def _ints(request: Request, name: str) -> list[int] | None:
    values = request.query_params.getlist(name) or request.query_params.getlist(f"{name}[]")
    if not values:
        return None
    try:
        return [int(part) for value in values for part in value.split(",") if part]
    except ValueError:
        raise KatanaError.invalid(f"query.{name}", "type", "should be integer") from None


def _strings(request: Request, name: str) -> list[str] | None:
    values = request.query_params.getlist(name) or request.query_params.getlist(f"{name}[]")
    return values or None


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "false").lower() == "true"


def _time(request: Request, name: str) -> datetime | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise KatanaError.invalid(
            f"query.{name}", "format", "should match format date-time"
        ) from None


def _page(request: Request) -> tuple[int, int]:
    try:
        limit = int(request.query_params.get("limit", DEFAULT_LIMIT))
        page = int(request.query_params.get("page", 1))
    except ValueError:
        raise KatanaError.invalid("query.limit", "type", "should be integer") from None
    return max(1, min(limit, MAX_LIMIT)), max(1, page)


def _filtered(
    request: Request,
    records: list[dict[str, Any]],
    *,
    equal: Sequence[tuple[str, str]] = (),
    int_equal: Sequence[tuple[str, str]] = (),
    int_any: Sequence[tuple[str, str]] = (),
    str_any: Sequence[tuple[str, str]] = (),
    deletable: bool = True,
    timed: bool = True,
) -> list[dict[str, Any]]:
    """Apply Katana's common list filters and the endpoint's own (param, field) filters."""
    if deletable and not _flag(request, "include_deleted"):
        records = [r for r in records if r.get("deleted_at") is None]
    ids = _ints(request, "ids")
    if ids is not None:
        records = [r for r in records if r.get("id") in ids]
    if timed:
        for bound, key in (
            ("created_at_min", "created_at"),
            ("created_at_max", "created_at"),
            ("updated_at_min", "updated_at"),
            ("updated_at_max", "updated_at"),
        ):
            moment = _time(request, bound)
            if moment is None:
                continue
            later = bound.endswith("_min")
            records = [
                r
                for r in records
                if (stamp := datetime.fromisoformat(r[key].replace("Z", "+00:00")))
                and (stamp >= moment if later else stamp <= moment)
            ]
    for param, key in equal:
        value = request.query_params.get(param)
        if value is not None:
            records = [r for r in records if str(r.get(key)) == value]
    for param, key in int_equal:
        numbers = _ints(request, param)
        if numbers is not None:
            records = [r for r in records if r.get(key) == numbers[0]]
    for param, key in int_any:
        numbers = _ints(request, param)
        if numbers is not None:
            records = [r for r in records if r.get(key) in numbers]
    for param, key in str_any:
        texts = _strings(request, param)
        if texts is not None:
            records = [r for r in records if r.get(key) in texts]
    return records


def _paged(
    request: Request, records: list[dict[str, Any]], *, newest_first: bool = True
) -> Response:
    if newest_first:
        records = sorted(records, key=lambda r: r["id"], reverse=True)
    limit, number = _page(request)
    page = Page(number, limit, len(records))
    pagination = {
        "total_records": str(page.total),
        "total_pages": str(page.pages),
        "offset": str(page.offset),
        "page": str(number),
        "first_page": str(number == 1).lower(),
        "last_page": str(number >= page.pages).lower(),
    }
    headers = {"X-Pagination": msgspec.json.encode(pagination).decode()}
    return json_response({"data": page.of(records)}, headers=headers)


# -- API endpoints ------------------------------------------------------------------------


async def _factory(request: Request, world: KatanaWorld) -> Any:
    return world.factory()


async def _customers(request: Request, world: KatanaWorld) -> Any:
    if request.method == "POST":
        body = await _body(request, _CreateCustomer)
        extra = msgspec.structs.asdict(body)
        return world.create_customer(body.name, body.reference_id, body.currency, extra)
    records = _filtered(
        request,
        world.customer_list(),
        equal=[("name", "name"), ("reference_id", "reference_id"), ("currency", "currency")],
    )
    return _paged(request, records)


async def _variants(request: Request, world: KatanaWorld) -> Any:
    records = _filtered(
        request,
        world.variant_list(),
        str_any=[("sku", "sku")],
        int_equal=[("product_id", "product_id"), ("material_id", "material_id")],
        equal=[("type", "type")],
    )
    return _paged(request, records)


async def _products(request: Request, world: KatanaWorld) -> Any:
    body = await _body(request, _CreateProduct)
    if not body.variants:
        raise KatanaError.invalid(".variants", "minItems", "should NOT have fewer than 1 items")
    return world.create_product(
        body.name, [(v.sku, v.sales_price, v.purchase_price) for v in body.variants]
    )


async def _sales_orders(request: Request, world: KatanaWorld) -> Any:
    if request.method == "POST":
        body = await _body(request, _CreateSalesOrder)
        if not body.sales_order_rows:
            raise KatanaError.invalid(
                ".sales_order_rows", "minItems", "should NOT have fewer than 1 items"
            )
        if body.status is not msgspec.UNSET and body.status not in ("NOT_SHIPPED", "PENDING"):
            raise KatanaError.invalid(
                ".status", "enum", "should be equal to one of the allowed values"
            )
        extra = {
            key: getattr(body, key)
            for key in (
                "ecommerce_order_type",
                "ecommerce_store_name",
                "ecommerce_order_id",
                "tracking_number",
                "tracking_number_url",
            )
        }
        return world.create_sales_order(
            customer_id=body.customer_id,
            rows=[msgspec.structs.asdict(row) for row in body.sales_order_rows],
            order_no=None if body.order_no is msgspec.UNSET else body.order_no,
            location_id=None if body.location_id is msgspec.UNSET else body.location_id,
            status=None if body.status is msgspec.UNSET else body.status,
            currency=body.currency,
            customer_ref=body.customer_ref,
            additional_info=body.additional_info,
            delivery_date=body.delivery_date,
            extra=extra,
        )
    records = _filtered(
        request,
        world.sales_order_list(),
        equal=[
            ("order_no", "order_no"),
            ("status", "status"),
            ("production_status", "production_status"),
            ("currency", "currency"),
            ("ecommerce_order_id", "ecommerce_order_id"),
            ("ecommerce_store_name", "ecommerce_store_name"),
            ("ecommerce_order_type", "ecommerce_order_type"),
        ],
        int_equal=[("customer_id", "customer_id"), ("location_id", "location_id")],
    )
    return _paged(request, records)


async def _sales_order(request: Request, world: KatanaWorld) -> Any:
    sales_order_id = int(request.path_params["id"])
    if request.method == "PATCH":
        body = await _body(request, _UpdateSalesOrder)
        changes = {
            key: value
            for key, value in msgspec.structs.asdict(body).items()
            if value is not msgspec.UNSET
        }
        return world.update_sales_order(sales_order_id, changes)
    if request.method == "DELETE":
        world.delete_sales_order(sales_order_id, api=True)
        return Response(status_code=204)
    return world.sales_order_dict(world.get_sales_order(sales_order_id))


async def _sales_order_rows(request: Request, world: KatanaWorld) -> Any:
    records = _filtered(
        request,
        world.row_list(),
        int_any=[("sales_order_ids", "sales_order_id")],
        int_equal=[
            ("variant_id", "variant_id"),
            ("location_id", "location_id"),
            ("linked_manufacturing_order_id", "linked_manufacturing_order_id"),
        ],
    )
    return _paged(request, records)


async def _manufacturing_orders(request: Request, world: KatanaWorld) -> Any:
    records = _filtered(
        request,
        world.mo_list(),
        equal=[("status", "status"), ("order_no", "order_no")],
        int_equal=[("location_id", "location_id")],
    )
    linked = request.query_params.get("is_linked_to_sales_order")
    if linked is not None:
        want = linked.lower() == "true"
        records = [r for r in records if r["is_linked_to_sales_order"] == want]
    return _paged(request, records)


async def _manufacturing_order(request: Request, world: KatanaWorld) -> Any:
    mo_id = int(request.path_params["id"])
    body = await _body(request, _UpdateManufacturingOrder)
    if body.additional_info is not msgspec.UNSET:
        world.get_mo(mo_id).additional_info = body.additional_info
    if body.status is not msgspec.UNSET:
        return world.set_mo_status(mo_id, body.status)
    mo = world.get_mo(mo_id)
    world.touch_mo(mo)
    return world.mo_dict(mo)


async def _make_to_order(request: Request, world: KatanaWorld) -> Any:
    body = await _body(request, _MakeToOrder)
    return world.make_to_order(body.sales_order_row_id)


async def _bom_rows(request: Request, world: KatanaWorld) -> Any:
    records = _filtered(
        request,
        world.bom_row_list(),
        int_equal=[
            ("product_variant_id", "product_variant_id"),
            ("ingredient_variant_id", "ingredient_variant_id"),
            ("product_item_id", "product_item_id"),
        ],
        deletable=False,
    )
    return _paged(request, records, newest_first=False)


async def _inventory(request: Request, world: KatanaWorld) -> Any:
    records = _filtered(
        request,
        world.inventory_list(),
        int_any=[("variant_id", "variant_id")],
        int_equal=[("location_id", "location_id")],
        deletable=False,
        timed=False,
    )
    return _paged(request, records, newest_first=False)


# -- control panel ------------------------------------------------------------------------


async def _state(request: Request, world: KatanaWorld) -> Any:
    """Customers, sales orders and manufacturing orders as they stand."""
    return {
        "customers": world.customer_list(),
        "sales_orders": world.sales_order_list(),
        "manufacturing_orders": world.mo_list(),
    }


async def _sim_make_to_order(request: Request, world: KatanaWorld) -> Any:
    """A person presses "Make to order" on every row of the sales order."""
    return world.make_to_order_all(int(request.path_params["id"]))


async def _sim_start(request: Request, world: KatanaWorld) -> Any:
    """A person starts the manufacturing order."""
    return world.start_mo(int(request.path_params["id"]))


async def _sim_unlink(request: Request, world: KatanaWorld) -> Any:
    """A person unlinks the manufacturing order from its sales order (make to stock)."""
    return world.unlink_mo(int(request.path_params["id"]))


async def _sim_finish(request: Request, world: KatanaWorld) -> Any:
    """A person finishes the manufacturing order (stock and average cost move)."""
    return world.finish_mo(int(request.path_params["id"]))


async def _sim_deliver(request: Request, world: KatanaWorld) -> Any:
    """A person delivers the sales order."""
    return world.deliver(int(request.path_params["id"]))


async def _sim_status(request: Request, world: KatanaWorld) -> Any:
    """A person sets the sales order's status: {"status": "PARTIALLY_DELIVERED"}."""
    body = await _body(request, _SetStatus)
    return world.set_status(int(request.path_params["id"]), body.status, by_person=True)


async def _sim_sales_order(request: Request, world: KatanaWorld) -> Any:
    """PATCH: a person edits rows ({"rows": [{"id", "quantity", ...}]}) or the order's
    number ({"order_no": ...}); DELETE: deletes it."""
    sales_order_id = int(request.path_params["id"])
    if request.method == "DELETE":
        world.delete_sales_order(sales_order_id)
        return Response(status_code=204)
    body = await _body(request, _EditSalesOrder)
    if body.order_no is not msgspec.UNSET:
        renamed = world.rename_sales_order(sales_order_id, body.order_no)
        if not body.rows:
            return renamed
    return world.edit_rows(sales_order_id, [msgspec.structs.asdict(edit) for edit in body.rows])


async def _sim_product(request: Request, world: KatanaWorld) -> Any:
    """A person adds a product: {"name", "sku", "sales_price", "recipe", "operations"}."""
    body = await _body(request, _SimProduct)
    return world.create_product(
        body.name,
        [(body.sku, body.sales_price, body.purchase_price)],
        recipe=[(row.sku, row.quantity) for row in body.recipe],
        operations=[(op.name, op.hours, op.cost_per_hour) for op in body.operations],
    )


async def _sim_variant(request: Request, world: KatanaWorld) -> Any:
    """A person deletes a variant (its SKU then lives only on a deleted record)."""
    world.delete_variant(int(request.path_params["id"]))
    return Response(status_code=204)


async def _sim_currency(request: Request, world: KatanaWorld) -> Any:
    """POST: the account refuses sales orders in this currency; DELETE: accepts it again."""
    iso = str(request.path_params["iso"]).upper()
    if request.method == "DELETE":
        world.refused_currencies.discard(iso)
    else:
        world.refused_currencies.add(iso)
    return {"refused_currencies": sorted(world.refused_currencies)}


def _counters(frame: Frame) -> WorldHandler:
    async def counters(request: Request, world: KatanaWorld) -> Any:
        """How often each endpoint was called, what was created (order numbers twice?)."""
        account: Account[KatanaWorld] = request.state.account
        report = world.counter_report()
        report.update(frame.traffic(account))
        report["faults_injected"] = request.app.state.faults.injected_for(account.token)
        return report

    return counters


# -- webhooks -----------------------------------------------------------------------------


def _webhook_dict(sub: Subscription) -> dict[str, Any]:
    stamp = sub.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    data: dict[str, Any] = {
        "id": sub.id,
        "url": sub.url,
        "token": sub.token,
        "enabled": sub.enabled,
        "subscribed_events": sub.events,
        "created_at": stamp,
        "updated_at": stamp,
    }
    if sub.description is not None:
        data["description"] = sub.description
    return data


def _webhook_handlers(sender: WebhookSender) -> tuple[WorldHandler, WorldHandler]:
    """``/v1/webhooks`` (list, create) and ``/_sim/webhooks`` (the sender's knobs)."""

    async def webhooks(request: Request, world: KatanaWorld) -> Any:
        if request.method == "POST":
            body = await _body(request, _CreateWebhook)
            if not body.url.startswith("https://"):
                raise KatanaError.invalid(".url", "pattern", 'must match pattern "^https://.*$"')
            for index, event in enumerate(body.subscribed_events):
                if event not in WEBHOOK_EVENTS:
                    raise KatanaError.invalid(
                        f".subscribed_events[{index}]",
                        "enum",
                        "should be equal to one of the allowed values",
                        allowedValues=list(WEBHOOK_EVENTS),
                    )
            sub = sender.subscribe(
                body.url,
                body.subscribed_events,
                token=new_token(),
                description=body.description,
                account=request.state.account.token,
            )
            sub.enabled = body.enabled
            return _webhook_dict(sub)
        mine = sender.subscriptions_of(request.state.account.token)
        return _paged(request, [_webhook_dict(s) for s in reversed(mine)])

    async def knobs(request: Request, world: KatanaWorld) -> Any:
        """Webhook sender: GET shows it, POST sets speed, duplicate, reorder, drop."""
        if request.method == "POST":
            try:
                sender.set_knobs(msgspec.json.decode(await request.body() or b"{}"))
            except (ValueError, TypeError, AttributeError, msgspec.DecodeError) as exc:
                raise KatanaError.invalid(".", "knob", str(exc)) from None
        return sender.knobs(request.state.account.token)

    return webhooks, knobs


def _publisher(sender: WebhookSender, account: str) -> Callable[[str, int, str], None]:
    def publish(action: str, object_id: int, status: str) -> None:
        resource = action.split(".", 1)[0]
        thing: dict[str, Any] = {"id": str(object_id), "status": status}
        if not action.endswith(".deleted"):
            thing["href"] = f"https://api.katanamrp.com/v1/{resource}s/{object_id}"
        sender.publish(
            action,
            lambda sub: {
                "resource_type": resource,
                "action": action,
                "webhook_id": sub.id,
                "object": thing,
            },
            account=account,
        )

    return publish


# -- wiring -------------------------------------------------------------------------------


def _unknown_route(request: Request) -> Response:
    return KatanaError(404, "NotFoundError", "Not Found").response()


def _quota_headers(quota: Quota) -> dict[str, str]:
    headers = {
        "X-Ratelimit-Limit": str(quota.limit),
        "X-Ratelimit-Remaining": str(quota.remaining),
        "X-Ratelimit-Reset": str(int(quota.reset_at * 1000)),
    }
    if not quota.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(quota.wait)))
    return headers


DIALECT = Dialect(
    service="katana",
    unauthorized=KatanaError(401, "UnauthorizedError", "Unauthorized"),
    rate_limited=KatanaError(429, "TooManyRequests", "Too Many Requests"),
    control_not_found=KatanaError.not_found("Control endpoint"),
    bad_request=lambda message: KatanaError(400, "BadRequest", message),
    quota_headers=_quota_headers,
    unknown_route=_unknown_route,
    unknown_account=lambda token: KatanaError.not_found(f"Account {token!r}"),
    account_exists=lambda token: KatanaError(
        409, "ConflictError", f"An account with token {token!r} exists"
    ),
)


def create_app(
    world: KatanaWorld | None = None,
    *,
    token: str = "katana-sim-token",
    rate_limit: tuple[int, float] | None = (60, 60.0),
    faults: Faults | None = None,
) -> Starlette:
    """The simulator as an ASGI app; the default account's world is on ``app.state.world``,
    every account (:class:`syncd.sim._frame.Accounts`) on ``app.state.accounts``.

    :param world: the default account's state; a fresh demo workshop when omitted.
    :param token: the default account's API key (more accounts: ``POST /_sim/accounts``).
    :param rate_limit: ``(requests, seconds)`` per token, or ``None`` for no limit.
    :param faults: faults to inject from the start (see :mod:`syncd.sim.faults`); they can
        be changed at any time through ``/_sim/faults``.
    """
    state = world if world is not None else KatanaWorld()
    sender = katana_sender()

    def new_world(account: Account[KatanaWorld]) -> KatanaWorld:
        made = KatanaWorld()
        made.requests = account.requests
        made.listeners.append(_publisher(sender, account.token))
        return made

    frame = Frame(
        DIALECT,
        token,
        SlidingWindow(*rate_limit) if rate_limit is not None else None,
        requests=state.requests,
        make_state=new_world,
        default_state=state,
    )
    state.listeners.append(_publisher(sender, token))
    webhooks, webhook_knobs = _webhook_handlers(sender)

    api, control = frame.state_api, frame.state_control

    api_routes = [
        api("/factory", _factory, ["GET"]),
        api("/customers", _customers, ["GET", "POST"]),
        api("/variants", _variants, ["GET"]),
        api("/products", _products, ["POST"]),
        api("/sales_orders", _sales_orders, ["GET", "POST"]),
        api("/sales_orders/{id:int}", _sales_order, ["GET", "PATCH", "DELETE"]),
        api("/sales_order_rows", _sales_order_rows, ["GET"]),
        api("/manufacturing_orders", _manufacturing_orders, ["GET"]),
        api("/manufacturing_orders/{id:int}", _manufacturing_order, ["PATCH"]),
        api("/manufacturing_order_make_to_order", _make_to_order, ["POST"]),
        api("/bom_rows", _bom_rows, ["GET"]),
        api("/inventory", _inventory, ["GET"]),
        api("/webhooks", webhooks, ["GET", "POST"]),
    ]
    control_routes = [
        control("/webhooks", webhook_knobs, ["GET", "POST"]),
        control("/state", _state, ["GET"]),
        control("/counters", _counters(frame), ["GET"]),
        control("/products", _sim_product, ["POST"]),
        control("/variants/{id:int}", _sim_variant, ["DELETE"]),
        control("/refused_currencies/{iso}", _sim_currency, ["POST", "DELETE"]),
        control("/sales_orders/{id:int}/make_to_order", _sim_make_to_order, ["POST"]),
        control("/sales_orders/{id:int}/deliver", _sim_deliver, ["POST"]),
        control("/sales_orders/{id:int}/status", _sim_status, ["POST"]),
        control("/sales_orders/{id:int}", _sim_sales_order, ["PATCH", "DELETE"]),
        control("/manufacturing_orders/{id:int}/start", _sim_start, ["POST"]),
        control("/manufacturing_orders/{id:int}/finish", _sim_finish, ["POST"]),
        control("/manufacturing_orders/{id:int}/unlink", _sim_unlink, ["POST"]),
    ]
    return frame.app(
        api_routes,
        control_routes,
        service="katana",
        world=state,
        webhooks=sender,
        faults=faults,
        rate_limit=rate_limit[0] if rate_limit else 60,
        api_prefix=API_PREFIX,
    )


async def run(
    host: str,
    port: int,
    *,
    rate_limit: bool = True,
    play_factory: bool = False,
    token: str = "katana-sim-token",
    faults: Faults | None = None,
    accounts: int = 1,
    on_ready: Callable[[str], None] | None = None,
    make_to_order: bool = True,
) -> None:
    """Serve the simulator until cancelled; with ``play_factory`` the workshop works too
    (in every account, pressing "Make to order" unless ``make_to_order`` is false).

    :param accounts: how many accounts in all: the default one, then tokens ``<token>-1``
        ... ``<token>-(N-1)``.
    :param on_ready: told the base URL once the simulator listens (``syncd sim``'s banner).
    """
    from syncd.sim.factory import play_factory as player

    app = create_app(token=token, rate_limit=(60, 60.0) if rate_limit else None, faults=faults)
    beside = functools.partial(player, make_to_order=make_to_order) if play_factory else None
    await serve(app, host, port, token=token, accounts=accounts, on_ready=on_ready, beside=beside)
