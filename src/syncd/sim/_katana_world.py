"""The in-memory state of the simulated Katana account, and the workshop's arithmetic.

:class:`KatanaWorld` holds customers, products and materials with their variants, sales
orders with rows, manufacturing orders, and stock with a moving average cost per variant
per location. It knows nothing of HTTP: :mod:`syncd.sim.katana` serves it, and answers are
produced here already in the API's shape (plain dicts whose decimals the server encodes
as JSON numbers, or as strings where the spec types a field as a string).

Costing follows the brief the simulator was built to: finishing a manufacturing order
consumes its recipe materials and adds its quantity at
``unit cost = Σ recipe qty * material average cost + Σ operation hours * cost per hour``,
moving the product's average to ``(old_qty * old_avg + qty * unit_cost) / (old_qty + qty)``.
Stock that is zero or negative counts as zero in that average. Delivering a sales order
takes its quantities out of stock and leaves averages unchanged.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from syncd.sim import catalog
from syncd.sim._frame import ServiceError

__all__ = [
    "DEFAULT_LOCATION_ID",
    "OPEN_STATUSES",
    "KatanaError",
    "KatanaWorld",
    "format_time",
]

DEFAULT_LOCATION_ID = 1
#: Sales order statuses that still await delivery.
OPEN_STATUSES = frozenset({"NOT_SHIPPED", "PENDING", "PARTIALLY_PACKED", "PACKED"})
_MO_STATUSES = frozenset({"NOT_STARTED", "BLOCKED", "IN_PROGRESS", "PARTIALLY_COMPLETED", "DONE"})
_SO_STATUSES = frozenset({"NOT_SHIPPED", "PENDING", "PACKED", "DELIVERED"})
#: Computed by Katana from partial packing or delivery; clients cannot set them, people can
#: bring them about (the control panel).
_PARTIAL_STATUSES = frozenset({"PARTIALLY_PACKED", "PARTIALLY_DELIVERED"})
_PRICE = Decimal("0.0000000001")
_QTY = Decimal("0.00001")
_ZERO = Decimal(0)


class KatanaError(ServiceError):
    """An error answer: Katana's ``{statusCode, name, message}``."""

    def __init__(
        self,
        status: int,
        name: str,
        message: str,
        *,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(status, message)
        self.name = name
        self.code = code
        self.details = details

    @classmethod
    def not_found(cls, what: str) -> KatanaError:
        return cls(404, "NotFoundError", f"{what} not found")

    @classmethod
    def invalid(cls, path: str, keyword: str, message: str, **info: Any) -> KatanaError:
        return cls(
            422,
            "UnprocessableEntityError",
            "The request body is invalid. See error object `details` property for more info.",
            code="VALIDATION_FAILED",
            details=[{"path": path, "code": keyword, "message": message, "info": info}],
        )

    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "statusCode": self.status,
            "name": self.name,
            "message": self.message,
        }
        if self.code is not None:
            data["code"] = self.code
        if self.details is not None:
            data["details"] = self.details
        return data


def format_time(moment: datetime | None) -> str | None:
    """Katana's timestamp format: UTC with milliseconds and ``Z``."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _price(value: Decimal) -> str:
    return format(value.quantize(_PRICE), "f")


def _qty(value: Decimal) -> str:
    return format(value.quantize(_QTY), "f")


@dataclass
class _Customer:
    id: int
    name: str
    reference_id: str | None
    currency: str
    extra: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None


@dataclass
class _Variant:
    id: int
    sku: str | None
    type: str  # "product" or "material"
    parent_id: int
    sales_price: Decimal | None
    purchase_price: Decimal | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None


@dataclass
class _Item:
    id: int
    name: str
    type: str
    variant_ids: list[int]
    created_at: datetime
    updated_at: datetime
    archived_at: datetime | None = None
    deleted_at: datetime | None = None


@dataclass(frozen=True)
class _Recipe:
    materials: tuple[tuple[int, Decimal], ...] = ()
    operations: tuple[tuple[str, Decimal, Decimal], ...] = ()


@dataclass
class _Row:
    id: int
    sales_order_id: int
    variant_id: int
    quantity: Decimal
    price_per_unit: Decimal
    tax_rate_id: int | None
    location_id: int
    created_at: datetime
    updated_at: datetime
    linked_manufacturing_order_id: int | None = None
    deleted_at: datetime | None = None


@dataclass
class _SalesOrder:
    id: int
    customer_id: int
    order_no: str
    location_id: int
    status: str
    currency: str
    customer_ref: str | None
    additional_info: str | None
    delivery_date: str | None
    row_ids: list[int]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _ManufacturingOrder:
    id: int
    order_no: str
    variant_id: int
    location_id: int
    planned_quantity: Decimal
    sales_order_id: int | None
    sales_order_row_id: int | None
    created_at: datetime
    updated_at: datetime
    status: str = "NOT_STARTED"
    material_cost: Decimal = _ZERO
    operations_cost: Decimal = _ZERO
    actual_quantity: Decimal | None = None
    started_at: datetime | None = None
    done_date: datetime | None = None
    additional_info: str = ""
    deleted_at: datetime | None = None


@dataclass
class _Stock:
    quantity: Decimal = _ZERO
    average_cost: Decimal = _ZERO


class KatanaWorld:
    """A Katana account in memory, seeded with the demo workshop of :mod:`syncd.sim.catalog`.

    :param base_currency: the factory's base currency.
    :param seed_catalog: add the catalogue's materials (with stock) and products (with
        recipes and operations).
    :param material_stock: how much of each material the workshop starts with.
    :param clock: the wall clock, for tests; timestamps never repeat nor go backwards.
    """

    def __init__(
        self,
        *,
        base_currency: str = "USD",
        seed_catalog: bool = True,
        material_stock: Decimal = Decimal("1000"),
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.base_currency = base_currency
        self._clock = clock or (lambda: datetime.now(UTC))
        self._last_stamp = datetime(2000, 1, 1, tzinfo=UTC)
        self._ids: dict[str, itertools.count[int]] = {}
        self.customers: dict[int, _Customer] = {}
        self.items: dict[int, _Item] = {}
        self.variants: dict[int, _Variant] = {}
        self.recipes: dict[int, _Recipe] = {}
        self.sales_orders: dict[int, _SalesOrder] = {}
        self.rows: dict[int, _Row] = {}
        self.manufacturing_orders: dict[int, _ManufacturingOrder] = {}
        self.stock: dict[tuple[int, int], _Stock] = {}
        self.counters: Counter[str] = Counter()
        self.orders_by_no: Counter[str] = Counter()
        #: Manufacturing orders made to order, by sales order row id (exactly once?).
        self.mos_by_row: Counter[int] = Counter()
        #: API requests by endpoint, counted by the server's frame.
        self.requests: Counter[str] = Counter()
        #: Currencies the account refuses on a sales order (a control-panel knob).
        self.refused_currencies: set[str] = set()
        #: Told ``(action, object id, status)`` of every webhook event
        #: (``sales_order.delivered``, ``manufacturing_order.done``, ...).
        self.listeners: list[Callable[[str, int, str], None]] = []
        if seed_catalog:
            self._seed(material_stock)

    # -- basics ------------------------------------------------------------------------

    def now(self) -> datetime:
        """A fresh timestamp, strictly later than every earlier one (millisecond steps)."""
        moment = self._clock().astimezone(UTC)
        moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
        if moment <= self._last_stamp:
            moment = self._last_stamp + timedelta(milliseconds=1)
        self._last_stamp = moment
        return moment

    def _emit(self, action: str, object_id: int, status: str) -> None:
        for listener in self.listeners:
            listener(action, object_id, status)

    def _next_id(self, kind: str) -> int:
        return next(self._ids.setdefault(kind, itertools.count(1)))

    def _seed(self, material_stock: Decimal) -> None:
        by_sku: dict[str, int] = {}
        for material in catalog.MATERIALS:
            variant = self._add_item(
                material.name, "material", material.sku, None, material.purchase_price
            )
            by_sku[material.sku] = variant.id
            self.stock[(variant.id, DEFAULT_LOCATION_ID)] = _Stock(
                material_stock, material.purchase_price
            )
        for product in catalog.PRODUCTS:
            variant = self._add_item(
                product.name, "product", product.sku, product.sales_price, None
            )
            self.recipes[variant.id] = _Recipe(
                tuple((by_sku[row.sku], row.quantity) for row in product.recipe),
                tuple((op.name, op.hours, op.cost_per_hour) for op in product.operations),
            )

    def _add_item(
        self,
        name: str,
        kind: str,
        sku: str | None,
        sales_price: Decimal | None,
        purchase_price: Decimal | None,
    ) -> _Variant:
        stamp = self.now()
        # Products and materials share Katana's item id space.
        item = _Item(self._next_id("item"), name, kind, [], stamp, stamp)
        self.items[item.id] = item
        variant = _Variant(
            self._next_id("variant"), sku, kind, item.id, sales_price, purchase_price, stamp, stamp
        )
        self.variants[variant.id] = variant
        item.variant_ids.append(variant.id)
        self.stock.setdefault((variant.id, DEFAULT_LOCATION_ID), _Stock())
        return variant

    # -- factory -----------------------------------------------------------------------

    def factory(self) -> dict[str, Any]:
        return {
            "name": "Demo Workshop",
            "display_name": "Demo Workshop",
            "legal_name": "Demo Workshop Ltd",
            "address": None,
            "currency": self.base_currency,
            "base_currency_code": self.base_currency,
            "timezone": "UTC",
            "default_so_delivery_time": None,
            "default_po_lead_time": None,
            "default_manufacturing_location_id": DEFAULT_LOCATION_ID,
            "default_purchases_location_id": DEFAULT_LOCATION_ID,
            "default_sales_location_id": DEFAULT_LOCATION_ID,
            "inventory_closing_date": None,
        }

    # -- customers ---------------------------------------------------------------------

    def create_customer(
        self, name: str, reference_id: str | None, currency: str | None, extra: dict[str, Any]
    ) -> dict[str, Any]:
        stamp = self.now()
        customer = _Customer(
            self._next_id("customer"),
            name,
            reference_id,
            currency or self.base_currency,
            extra,
            stamp,
            stamp,
        )
        self.customers[customer.id] = customer
        self.counters["customers_created"] += 1
        return self.customer_dict(customer)

    def customer_dict(self, customer: _Customer) -> dict[str, Any]:
        return {
            "id": customer.id,
            "name": customer.name,
            **{key: customer.extra.get(key) for key in _CUSTOMER_TEXT},
            "currency": customer.currency,
            "reference_id": customer.reference_id,
            "discount_rate": customer.extra.get("discount_rate"),
            "default_billing_id": None,
            "default_shipping_id": None,
            "addresses": [],
            "created_at": format_time(customer.created_at),
            "updated_at": format_time(customer.updated_at),
            "deleted_at": format_time(customer.deleted_at),
        }

    def customer_list(self) -> list[dict[str, Any]]:
        return [self.customer_dict(c) for c in self.customers.values()]

    # -- products and variants ---------------------------------------------------------

    def create_product(
        self,
        name: str,
        variants: Iterable[tuple[str | None, Decimal | None, Decimal | None]],
        *,
        recipe: Iterable[tuple[str, Decimal]] = (),
        operations: Iterable[tuple[str, Decimal, Decimal]] = (),
    ) -> dict[str, Any]:
        """A product and its variants; a recipe (by material sku) is optional."""
        materials: list[tuple[int, Decimal]] = []
        for index, (material_sku, quantity) in enumerate(recipe):
            match = [
                v for v in self.variants.values() if v.sku == material_sku and v.deleted_at is None
            ]
            if not match:
                raise KatanaError.invalid(
                    f".recipe[{index}].sku", "enum", f"unknown sku {material_sku!r}"
                )
            materials.append((match[0].id, quantity))
        wanted = list(variants)
        for index, (sku, _, _) in enumerate(wanted):
            if sku is not None and any(
                v.sku == sku and v.deleted_at is None for v in self.variants.values()
            ):
                raise KatanaError.invalid(
                    f".variants[{index}].sku", "unique", "SKU already exists", sku=sku
                )
        stamp = self.now()
        item = _Item(self._next_id("item"), name, "product", [], stamp, stamp)
        self.items[item.id] = item
        for sku, sales_price, purchase_price in wanted:
            variant = _Variant(
                self._next_id("variant"),
                sku,
                "product",
                item.id,
                sales_price,
                purchase_price,
                stamp,
                stamp,
            )
            self.variants[variant.id] = variant
            item.variant_ids.append(variant.id)
            self.stock.setdefault((variant.id, DEFAULT_LOCATION_ID), _Stock())
            self.recipes[variant.id] = _Recipe(tuple(materials), tuple(operations))
        self.counters["products_created"] += 1
        return self.product_dict(item)

    def variant_dict(self, variant: _Variant, *, nested: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": variant.id,
            "sku": variant.sku,
            "product_id": variant.parent_id if variant.type == "product" else None,
            "material_id": variant.parent_id if variant.type == "material" else None,
            "type": variant.type,
            "internal_barcode": None,
            "registered_barcode": None,
            "supplier_item_codes": [],
            "lead_time": None,
            "minimum_order_quantity": None,
            "config_attributes": [],
            "custom_fields": [],
            "created_at": format_time(variant.created_at),
            "updated_at": format_time(variant.updated_at),
            "deleted_at": format_time(variant.deleted_at),
        }
        if variant.sales_price is not None:
            data["sales_price"] = variant.sales_price
        elif nested:
            data["sales_price"] = None
        if variant.purchase_price is not None:
            data["purchase_price"] = variant.purchase_price
        return data

    def variant_list(self) -> list[dict[str, Any]]:
        return [self.variant_dict(v) for v in self.variants.values()]

    def bom_row_list(self) -> list[dict[str, Any]]:
        """Every recipe's material rows, as ``GET /bom_rows`` answers them. A product made
        by ``POST /products`` (a SKU syncd creates) has none: it has no recipe."""
        rows: list[dict[str, Any]] = []
        for variant_id, recipe in self.recipes.items():
            variant = self.variants[variant_id]
            stamp = format_time(variant.created_at)
            for rank, (material_id, quantity) in enumerate(recipe.materials, start=1):
                rows.append(
                    {
                        # Stable across calls: the row is named by its variant and place.
                        "id": str(uuid.UUID(int=variant_id << 32 | rank)),
                        "product_variant_id": variant_id,
                        "product_item_id": variant.parent_id,
                        "ingredient_variant_id": material_id,
                        "quantity": quantity,
                        "notes": None,
                        "rank": rank * 10000,
                        "created_at": stamp,
                        "updated_at": stamp,
                    }
                )
        return rows

    def product_dict(self, item: _Item) -> dict[str, Any]:
        return {
            "id": item.id,
            "name": item.name,
            "uom": "pcs",
            "category_name": "",
            "is_sellable": True,
            "is_producible": True,
            "is_purchasable": False,
            "is_auto_assembly": False,
            "default_supplier_id": None,
            "additional_info": "",
            "batch_tracked": False,
            "serial_tracked": False,
            "operations_in_sequence": False,
            "type": "product",
            "purchase_uom": None,
            "purchase_uom_conversion_rate": None,
            "lead_time": None,
            "minimum_order_quantity": None,
            "custom_field_collection_id": None,
            "configs": [],
            "variants": [
                self.variant_dict(self.variants[i], nested=True) for i in item.variant_ids
            ],
            "created_at": format_time(item.created_at),
            "updated_at": format_time(item.updated_at),
            "archived_at": format_time(item.archived_at),
            "deleted_at": format_time(item.deleted_at),
        }

    def variant_id_for_sku(self, sku: str) -> int:
        for variant in self.variants.values():
            if variant.sku == sku and variant.deleted_at is None:
                return variant.id
        raise KatanaError.not_found(f"variant {sku}")

    def delete_variant(self, variant_id: int) -> None:
        variant = self.variants.get(variant_id)
        if variant is None:
            raise KatanaError.not_found("variant")
        variant.deleted_at = variant.updated_at = self.now()

    # -- sales orders ------------------------------------------------------------------

    def create_sales_order(
        self,
        *,
        customer_id: int,
        rows: list[dict[str, Any]],
        order_no: str | None = None,
        location_id: int | None = None,
        currency: str | None = None,
        status: str | None = None,
        customer_ref: str | None = None,
        additional_info: str | None = None,
        delivery_date: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        customer = self.customers.get(customer_id)
        if customer is None or customer.deleted_at is not None:
            raise KatanaError.invalid(
                ".customer_id", "exists", "customer not found", id=customer_id
            )
        if currency is not None and currency in self.refused_currencies:
            raise KatanaError.invalid(
                ".currency", "enum", f"currency {currency} is not enabled for this account"
            )
        for index, row in enumerate(rows):
            variant = self.variants.get(row["variant_id"])
            if variant is None or variant.deleted_at is not None:
                raise KatanaError.invalid(
                    f".sales_order_rows[{index}].variant_id", "exists", "variant not found"
                )
        stamp = self.now()
        so_id = self._next_id("sales_order")
        location = location_id or DEFAULT_LOCATION_ID
        order = _SalesOrder(
            id=so_id,
            customer_id=customer_id,
            order_no=order_no if order_no is not None else f"SO-{so_id}",
            location_id=location,
            status=status or "NOT_SHIPPED",
            currency=currency or customer.currency or self.base_currency,
            customer_ref=customer_ref,
            additional_info=additional_info,
            delivery_date=delivery_date,
            row_ids=[],
            created_at=stamp,
            updated_at=stamp,
            extra=extra or {},
        )
        for row in rows:
            variant = self.variants[row["variant_id"]]
            price = row.get("price_per_unit")
            if price is None:
                price = variant.sales_price or _ZERO
            record = _Row(
                id=self._next_id("row"),
                sales_order_id=so_id,
                variant_id=variant.id,
                quantity=row["quantity"],
                price_per_unit=price,
                tax_rate_id=row.get("tax_rate_id"),
                location_id=row.get("location_id") or location,
                created_at=stamp,
                updated_at=stamp,
            )
            self.rows[record.id] = record
            order.row_ids.append(record.id)
        self.sales_orders[so_id] = order
        self.counters["sales_orders_created"] += 1
        self.orders_by_no[order.order_no] += 1
        self._emit("sales_order.created", order.id, order.status)
        return self.sales_order_dict(order)

    def get_sales_order(self, sales_order_id: int, *, include_deleted: bool = False) -> _SalesOrder:
        order = self.sales_orders.get(sales_order_id)
        if order is None or (order.deleted_at is not None and not include_deleted):
            raise KatanaError.not_found("Sales order")
        return order

    def _live_rows(self, order: _SalesOrder) -> list[_Row]:
        return [self.rows[i] for i in order.row_ids if self.rows[i].deleted_at is None]

    def production_status(self, order: _SalesOrder) -> str:
        statuses = [
            mo.status
            for row in self._live_rows(order)
            if row.linked_manufacturing_order_id is not None
            and (mo := self.manufacturing_orders.get(row.linked_manufacturing_order_id))
            and mo.deleted_at is None
        ]
        if not statuses:
            return "NONE"
        if all(s == "DONE" for s in statuses):
            return "DONE"
        if any(s in ("IN_PROGRESS", "BLOCKED", "PARTIALLY_COMPLETED") for s in statuses):
            return "IN_PROGRESS"
        return "NOT_STARTED"

    def row_dict(self, row: _Row) -> dict[str, Any]:
        total = row.quantity * row.price_per_unit
        return {
            "id": row.id,
            "sales_order_id": row.sales_order_id,
            "quantity": row.quantity,
            "variant_id": row.variant_id,
            "tax_rate_id": row.tax_rate_id,
            "tax_rate": None,
            "location_id": row.location_id,
            "product_availability": None,
            "product_expected_date": None,
            "price_per_unit": _price(row.price_per_unit),
            "price_per_unit_in_base_currency": row.price_per_unit,
            "total": total,
            "total_in_base_currency": total,
            "total_discount": None,
            "cogs_value": None,
            "attributes": [],
            "linked_manufacturing_order_id": row.linked_manufacturing_order_id,
            "conversion_rate": None,
            "conversion_date": None,
            "created_at": format_time(row.created_at),
            "updated_at": format_time(row.updated_at),
            "deleted_at": format_time(row.deleted_at),
        }

    def sales_order_dict(self, order: _SalesOrder) -> dict[str, Any]:
        rows = self._live_rows(order)
        total = sum((r.quantity * r.price_per_unit for r in rows), _ZERO)
        return {
            "id": order.id,
            "customer_id": order.customer_id,
            "order_no": order.order_no,
            "source": "API",
            "order_created_date": format_time(order.created_at),
            "delivery_date": order.delivery_date,
            "picked_date": None,
            "location_id": order.location_id,
            "status": order.status,
            "currency": order.currency,
            "conversion_rate": None,
            "conversion_date": None,
            "invoicing_status": None,
            "total": total,
            "total_in_base_currency": total,
            "additional_info": order.additional_info,
            "customer_ref": order.customer_ref,
            "sales_order_rows": [self.row_dict(r) for r in rows],
            "ecommerce_order_type": order.extra.get("ecommerce_order_type"),
            "ecommerce_store_name": order.extra.get("ecommerce_store_name"),
            "ecommerce_order_id": order.extra.get("ecommerce_order_id"),
            "product_availability": None,
            "product_expected_date": None,
            "ingredient_availability": None,
            "ingredient_expected_date": None,
            "production_status": self.production_status(order),
            "tracking_number": order.extra.get("tracking_number"),
            "tracking_number_url": order.extra.get("tracking_number_url"),
            "billing_address_id": None,
            "shipping_address_id": None,
            "addresses": [],
            "created_at": format_time(order.created_at),
            "updated_at": format_time(order.updated_at),
            "deleted_at": format_time(order.deleted_at),
        }

    def sales_order_list(self) -> list[dict[str, Any]]:
        return [self.sales_order_dict(o) for o in self.sales_orders.values()]

    def row_list(self) -> list[dict[str, Any]]:
        return [self.row_dict(r) for r in self.rows.values()]

    def _touch(self, order: _SalesOrder) -> None:
        order.updated_at = self.now()

    def update_sales_order(self, sales_order_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        """A PATCH: like Katana, an omitted ``additional_info`` is reset to ``""``."""
        order = self.get_sales_order(sales_order_id)
        if "status" in changes:
            self.set_status(sales_order_id, changes["status"])
        for key in ("order_no", "customer_id", "location_id", "currency", "customer_ref"):
            if key in changes:
                if order.status not in ("NOT_SHIPPED", "PENDING") and key != "customer_ref":
                    raise KatanaError.invalid(f".{key}", "status", "order is no longer editable")
                setattr(order, key, changes[key])
        if "delivery_date" in changes:
            order.delivery_date = changes["delivery_date"]
        for key in ("tracking_number", "tracking_number_url"):
            if key in changes:
                order.extra[key] = changes[key]
        order.additional_info = changes.get("additional_info") or ""
        self._touch(order)
        self._emit("sales_order.updated", order.id, order.status)
        return self.sales_order_dict(order)

    def set_status(
        self, sales_order_id: int, status: str, *, by_person: bool = False
    ) -> dict[str, Any]:
        order = self.get_sales_order(sales_order_id)
        if status not in _SO_STATUSES and not (by_person and status in _PARTIAL_STATUSES):
            raise KatanaError.invalid(".status", "enum", f"unknown status {status}")
        if status == "DELIVERED" and order.status != "DELIVERED":
            self._move_stock(order, -1)
        elif order.status == "DELIVERED" and status != "DELIVERED":
            self._move_stock(order, +1)
        order.status = status
        self._touch(order)
        # A delivery fires both ``updated`` and ``delivered``, as Katana does.
        self._emit("sales_order.updated", order.id, order.status)
        if status in ("DELIVERED", "PACKED"):
            self._emit(f"sales_order.{status.lower()}", order.id, order.status)
        return self.sales_order_dict(order)

    def deliver(self, sales_order_id: int) -> dict[str, Any]:
        return self.set_status(sales_order_id, "DELIVERED")

    def _move_stock(self, order: _SalesOrder, sign: int) -> None:
        for row in self._live_rows(order):
            stock = self.stock.setdefault((row.variant_id, row.location_id), _Stock())
            stock.quantity += sign * row.quantity

    def rename_sales_order(self, sales_order_id: int, order_no: str) -> dict[str, Any]:
        """A person gives the order another number in the UI (at any status, as Katana's
        UI allows); ``sales_orders_by_order_no`` keeps counting it under the number it was
        created with."""
        order = self.get_sales_order(sales_order_id)
        order.order_no = order_no
        self._touch(order)
        self._emit("sales_order.updated", order.id, order.status)
        return self.sales_order_dict(order)

    def edit_rows(self, sales_order_id: int, edits: list[dict[str, Any]]) -> dict[str, Any]:
        """The UI's row editing: change quantity or price, or delete a row."""
        order = self.get_sales_order(sales_order_id)
        stamp = self.now()
        for edit in edits:
            row = self.rows.get(edit["id"])
            if row is None or row.sales_order_id != order.id or row.deleted_at is not None:
                raise KatanaError.not_found(f"Sales order row {edit['id']}")
            if edit.get("delete"):
                row.deleted_at = stamp
            if edit.get("quantity") is not None:
                row.quantity = Decimal(str(edit["quantity"]))
            if edit.get("price_per_unit") is not None:
                row.price_per_unit = Decimal(str(edit["price_per_unit"]))
            row.updated_at = stamp
        order.updated_at = stamp
        self._emit("sales_order.updated", order.id, order.status)
        return self.sales_order_dict(order)

    def delete_sales_order(self, sales_order_id: int, *, api: bool = False) -> None:
        """Delete an order; through the API (``api``) refused with 412, as Katana refuses a
        delete blocked by linked child records, when a row has a manufacturing order."""
        order = self.get_sales_order(sales_order_id)
        if api and any(r.linked_manufacturing_order_id is not None for r in self._live_rows(order)):
            raise KatanaError(
                412,
                "PreconditionFailedError",
                "Cannot delete sales orders as sales orders have manufacturing orders.",
            )
        stamp = self.now()
        order.deleted_at = order.updated_at = stamp
        for row in self._live_rows(order):
            row.deleted_at = row.updated_at = stamp
        self._emit("sales_order.deleted", order.id, order.status)

    # -- manufacturing -----------------------------------------------------------------

    def _unit_cost(self, variant_id: int, location_id: int) -> tuple[Decimal, Decimal]:
        recipe = self.recipes.get(variant_id, _Recipe())
        materials = sum(
            (
                qty * self.stock.get((material, location_id), _Stock()).average_cost
                for material, qty in recipe.materials
            ),
            _ZERO,
        )
        operations = sum((hours * rate for _, hours, rate in recipe.operations), _ZERO)
        return materials, operations

    def make_to_order(self, row_id: int) -> dict[str, Any]:
        """The "Make to order" button on one sales order row."""
        row = self.rows.get(row_id)
        if row is None or row.deleted_at is not None:
            raise KatanaError.invalid(".sales_order_row_id", "exists", "sales order row not found")
        if row.linked_manufacturing_order_id is not None:
            raise KatanaError.invalid(
                ".sales_order_row_id", "unique", "row already has a manufacturing order"
            )
        if self.variants[row.variant_id].type != "product":
            raise KatanaError.invalid(
                ".sales_order_row_id", "type", "only products can be made to order"
            )
        order = self.get_sales_order(row.sales_order_id)
        stamp = self.now()
        materials, operations = self._unit_cost(row.variant_id, row.location_id)
        number = sum(
            1 for mo in self.manufacturing_orders.values() if mo.sales_order_id == order.id
        )
        mo = _ManufacturingOrder(
            id=self._next_id("manufacturing_order"),
            order_no=f"{order.order_no} / {number + 1}",
            variant_id=row.variant_id,
            location_id=row.location_id,
            planned_quantity=row.quantity,
            sales_order_id=order.id,
            sales_order_row_id=row.id,
            created_at=stamp,
            updated_at=stamp,
            material_cost=materials * row.quantity,
            operations_cost=operations * row.quantity,
        )
        self.manufacturing_orders[mo.id] = mo
        row.linked_manufacturing_order_id = mo.id
        row.updated_at = order.updated_at = stamp
        self.counters["manufacturing_orders_created"] += 1
        self.mos_by_row[row.id] += 1
        self._emit("manufacturing_order.created", mo.id, mo.status)
        self._emit("sales_order.updated", order.id, order.status)
        return self.mo_dict(mo)

    def unlink_mo(self, mo_id: int) -> dict[str, Any]:
        """``POST /manufacturing_order_unlink``, or making the MO make-to-stock: the MO stays,
        the sales order row no longer points at it."""
        mo = self.get_mo(mo_id)
        row = self.rows.get(mo.sales_order_row_id or 0)
        stamp = self.now()
        if row is not None and row.linked_manufacturing_order_id == mo.id:
            row.linked_manufacturing_order_id = None
            row.updated_at = stamp
        order = self.sales_orders.get(mo.sales_order_id or 0)
        mo.sales_order_id = mo.sales_order_row_id = None
        mo.updated_at = stamp
        self._emit("manufacturing_order.updated", mo.id, mo.status)
        if order is not None:
            order.updated_at = stamp
            self._emit("sales_order.updated", order.id, order.status)
        return self.mo_dict(mo)

    def make_to_order_all(self, sales_order_id: int) -> list[dict[str, Any]]:
        """Make to order every product row of the order that has no MO yet."""
        order = self.get_sales_order(sales_order_id)
        return [
            self.make_to_order(row.id)
            for row in self._live_rows(order)
            if row.linked_manufacturing_order_id is None
            and self.variants[row.variant_id].type == "product"
        ]

    def get_mo(self, mo_id: int) -> _ManufacturingOrder:
        mo = self.manufacturing_orders.get(mo_id)
        if mo is None or mo.deleted_at is not None:
            raise KatanaError.not_found("Manufacturing order")
        return mo

    def touch_mo(self, mo: _ManufacturingOrder) -> None:
        """Bump the order's ``updated_at`` and its sales order's."""
        stamp = self.now()
        mo.updated_at = stamp
        if mo.sales_order_id is not None and mo.sales_order_id in self.sales_orders:
            self.sales_orders[mo.sales_order_id].updated_at = stamp

    def set_mo_status(self, mo_id: int, status: str) -> dict[str, Any]:
        mo = self.get_mo(mo_id)
        if status not in _MO_STATUSES:
            raise KatanaError.invalid(".status", "enum", f"unknown status {status}")
        if mo.status == "DONE" and status != "DONE":
            raise KatanaError.invalid(".status", "status", "a done order cannot be reopened here")
        if status == "DONE":
            if mo.status != "DONE":
                self._finish(mo)
        else:
            if status == "IN_PROGRESS" and mo.started_at is None:
                mo.started_at = self.now()
            mo.status = status
        self.touch_mo(mo)
        self._emit("manufacturing_order.updated", mo.id, mo.status)
        if mo.status in ("IN_PROGRESS", "BLOCKED", "DONE"):
            self._emit(f"manufacturing_order.{mo.status.lower()}", mo.id, mo.status)
        return self.mo_dict(mo)

    def start_mo(self, mo_id: int) -> dict[str, Any]:
        return self.set_mo_status(mo_id, "IN_PROGRESS")

    def finish_mo(self, mo_id: int) -> dict[str, Any]:
        return self.set_mo_status(mo_id, "DONE")

    def _finish(self, mo: _ManufacturingOrder) -> None:
        quantity = mo.planned_quantity
        materials, operations = self._unit_cost(mo.variant_id, mo.location_id)
        unit_cost = materials + operations
        recipe = self.recipes.get(mo.variant_id, _Recipe())
        for material, qty in recipe.materials:
            stock = self.stock.setdefault((material, mo.location_id), _Stock())
            stock.quantity -= qty * quantity
        stock = self.stock.setdefault((mo.variant_id, mo.location_id), _Stock())
        old_qty = max(stock.quantity, _ZERO)
        if old_qty + quantity > 0:
            average = (old_qty * stock.average_cost + quantity * unit_cost) / (old_qty + quantity)
            stock.average_cost = average.quantize(_PRICE)
        stock.quantity += quantity
        mo.material_cost = materials * quantity
        mo.operations_cost = operations * quantity
        mo.status = "DONE"
        mo.actual_quantity = quantity
        mo.done_date = self.now()

    def mo_dict(self, mo: _ManufacturingOrder) -> dict[str, Any]:
        total = mo.material_cost + mo.operations_cost
        hours = sum((h for _, h, _ in self.recipes.get(mo.variant_id, _Recipe()).operations), _ZERO)
        data: dict[str, Any] = {
            "id": mo.id,
            "status": mo.status,
            "order_no": mo.order_no,
            "variant_id": mo.variant_id,
            "planned_quantity": mo.planned_quantity,
            "actual_quantity": mo.actual_quantity,
            "completed_quantity": mo.actual_quantity,
            "remaining_quantity": mo.planned_quantity - (mo.actual_quantity or _ZERO),
            "includes_partial_completions": False,
            "location_id": mo.location_id,
            "order_created_date": format_time(mo.created_at),
            "production_deadline_date": None,
            "done_date": format_time(mo.done_date),
            "additional_info": mo.additional_info,
            "is_linked_to_sales_order": mo.sales_order_id is not None,
            "total_cost": total,
            "total_actual_time": hours * 3600 * (mo.actual_quantity or _ZERO),
            "total_planned_time": hours * 3600 * mo.planned_quantity,
            "material_cost": mo.material_cost,
            "subassemblies_cost": _ZERO,
            "operations_cost": mo.operations_cost,
            "serial_numbers": [],
            "created_at": format_time(mo.created_at),
            "updated_at": format_time(mo.updated_at),
            "deleted_at": format_time(mo.deleted_at),
        }
        if mo.sales_order_id is not None:
            data["sales_order_id"] = mo.sales_order_id
            data["sales_order_row_id"] = mo.sales_order_row_id
        return data

    def mo_list(self) -> list[dict[str, Any]]:
        return [self.mo_dict(mo) for mo in self.manufacturing_orders.values()]

    def started_at(self, mo_id: int) -> datetime | None:
        return self.get_mo(mo_id).started_at

    # -- stock -------------------------------------------------------------------------

    def stock_of(self, variant_id: int, location_id: int = DEFAULT_LOCATION_ID) -> _Stock:
        return self.stock.get((variant_id, location_id), _Stock())

    def set_average_cost(
        self, variant_id: int, cost: Decimal, location_id: int = DEFAULT_LOCATION_ID
    ) -> None:
        """What stock already made at ``cost`` a unit leaves (for tests: no MO needed)."""
        self.stock.setdefault((variant_id, location_id), _Stock()).average_cost = cost

    def inventory_list(self) -> list[dict[str, Any]]:
        """One record per variant per location, oldest location first."""
        records = []
        for (variant_id, location_id), stock in sorted(
            self.stock.items(), key=lambda i: i[0][::-1]
        ):
            variant = self.variants.get(variant_id)
            if variant is None or variant.deleted_at is not None:
                continue
            records.append(
                {
                    "variant_id": variant_id,
                    "location_id": location_id,
                    "safety_stock_level": _qty(_ZERO),
                    "reorder_point": _qty(_ZERO),
                    "average_cost": _price(stock.average_cost),
                    "value_in_stock": _price(stock.average_cost * max(stock.quantity, _ZERO)),
                    "quantity_in_stock": _qty(stock.quantity),
                    "quantity_committed": _qty(_ZERO),
                    "quantity_expected": _qty(_ZERO),
                    "quantity_missing_or_excess": _qty(_ZERO),
                    "quantity_potential": _qty(stock.quantity),
                    "archived_at": None,
                }
            )
        return records

    # -- counters ----------------------------------------------------------------------

    def counter_report(self) -> dict[str, Any]:
        return {
            "sales_orders_created": self.counters["sales_orders_created"],
            "sales_orders_by_order_no": dict(self.orders_by_no),
            "customers_created": self.counters["customers_created"],
            "products_created": self.counters["products_created"],
            "manufacturing_orders_created": self.counters["manufacturing_orders_created"],
            "manufacturing_orders_per_row": {str(k): v for k, v in self.mos_by_row.items()},
        }


_CUSTOMER_TEXT = ("first_name", "last_name", "company", "email", "phone", "comment", "category")
