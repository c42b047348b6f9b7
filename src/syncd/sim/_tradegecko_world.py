"""The in-memory state of the TradeGecko simulator, and how it renders as the API does.

A :class:`TradeGeckoWorld` holds one account: its currencies, a stock location, companies,
variants, purchase orders with their lines, and procurements. Its methods are the business
operations (a person creating or editing a purchase order, the API updating a line price or
receiving an order); the ``render_*`` functions turn records into the JSON objects the real
API sends, with the same field names and JSON types as the recorded responses (decimal
strings such as ``"20.0"``, timestamps such as ``"2014-09-30T11:37:19.501Z"``).

A refused operation raises :class:`Refused` with TradeGecko's ``{field: [message]}`` errors;
:class:`BadRequest` and :class:`NotFound` are TradeGecko's other error answers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from syncd.sim._frame import ServiceError
from syncd.sim.catalog import MATERIALS

__all__ = [
    "BadRequest",
    "Json",
    "NotFound",
    "Refused",
    "SimCompany",
    "SimCurrency",
    "SimLineItem",
    "SimProcurement",
    "SimPurchaseOrder",
    "SimVariant",
    "TradeGeckoError",
    "TradeGeckoWorld",
    "decimal_string",
    "parse_time",
    "timestamp",
]

Json = dict[str, Any]


class TradeGeckoError(ServiceError):
    """An error answer: TradeGecko's ``{type, message}``."""

    kind = "Error"

    def body(self) -> Json:
        return {"type": self.kind, "message": self.message}


class BadRequest(TradeGeckoError):
    """400: a parameter or body the API cannot read."""

    kind = "BadRequest"

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class NotFound(TradeGeckoError):
    """404: no record of that kind with that id."""

    kind = "NotFound"

    def __init__(self, record: str, ident: object) -> None:
        super().__init__(404, f"Couldn't find {record} with 'id'={ident}")


class Refused(TradeGeckoError):
    """An operation TradeGecko would answer with 422 ``{"errors": {field: [message]}}``."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(422, f"{field_name} {message}")
        self.errors = {field_name: [message]}

    def body(self) -> Json:
        return {"errors": self.errors}


def decimal_string(value: Decimal) -> str:
    """A decimal as Ruby's BigDecimal prints it: ``"20.0"``, ``"18.745"``, ``"-12.0"``."""
    text = format(value.normalize(), "f")
    if "." not in text:
        text += ".0"
    return "0.0" if text == "-0.0" else text


def _whole_string(value: Decimal) -> str:
    # Stock counts print without a fraction when whole ("301", "-12", "0").
    if value == value.to_integral_value():
        return str(int(value))
    return decimal_string(value)


def timestamp(value: datetime) -> str:
    """A UTC timestamp with milliseconds, as the API writes it."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _money(value: Decimal | None) -> str | None:
    return None if value is None else decimal_string(value)


@dataclass
class SimCurrency:
    id: int
    iso: str
    name: str
    rate: Decimal
    symbol: str


@dataclass
class SimCompany:
    id: int
    name: str
    company_type: str
    status: str = "active"
    email: str | None = None


@dataclass
class SimVariant:
    id: int
    product_id: int
    sku: str
    name: str
    product_name: str
    buy_price: Decimal | None
    created_at: datetime
    updated_at: datetime
    stock: dict[int, Decimal] = field(default_factory=dict)
    moving_average_cost: Decimal | None = None
    last_cost_price: Decimal | None = None
    status: str = "active"

    @property
    def stock_on_hand(self) -> Decimal:
        return sum(self.stock.values(), Decimal(0))


@dataclass
class SimLineItem:
    id: int
    purchase_order_id: int
    variant_id: int | None
    quantity: Decimal
    price: Decimal | None
    position: int
    created_at: datetime
    updated_at: datetime
    freeform: bool = False
    label: str | None = None
    extra_cost_value: Decimal = Decimal("0.0")
    tax_type_id: int | None = None
    procurement_id: int | None = None


@dataclass
class SimPurchaseOrder:
    id: int
    company_id: int
    currency_id: int
    stock_location_id: int
    order_number: str
    status: str
    created_at: datetime
    updated_at: datetime
    line_ids: list[int] = field(default_factory=list)
    procurement_ids: list[int] = field(default_factory=list)
    procurement_status: str = "unprocured"
    received_at: datetime | None = None
    notes: str | None = None
    reference_number: str | None = None


@dataclass
class SimProcurement:
    id: int
    purchase_order_id: int
    line_ids: list[int]
    received_at: datetime
    created_at: datetime
    updated_at: datetime


def _parse_decimal(value: Any, field_name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise Refused(field_name, "is not a number")
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        raise Refused(field_name, "is not a number") from None
    if not number.is_finite():
        raise Refused(field_name, "is not a number")
    return number


class TradeGeckoWorld:
    """One TradeGecko account in memory, seeded with what the demo needs.

    :param clock: the current time (UTC); tests may pass a fake one.
    :param seed_catalog: create the workshop's materials as variants with SKUs.
    """

    TAX_TYPE_ID = 2103

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        seed_catalog: bool = True,
    ) -> None:
        self.clock = clock
        self._ids = itertools.count(1001)
        now = clock()
        self.account_id = self._next_id()
        self.location_id = self._next_id()
        self.currencies: dict[int, SimCurrency] = {}
        for iso, name, rate, symbol in (
            ("USD", "US Dollar", Decimal("1.0"), "$"),
            ("EUR", "Euro", Decimal("0.92"), "€"),
            ("GBP", "British Pound", Decimal("0.79"), "£"),
        ):
            currency = SimCurrency(self._next_id(), iso, name, rate, symbol)
            self.currencies[currency.id] = currency
        self.default_currency_id = self.currency_by_iso("USD").id
        self.companies: dict[int, SimCompany] = {}
        for name, kind, email in (
            ("Katana", "supplier", "orders@katana.example"),
            ("Acme Supplies", "supplier", "sales@acme.example"),
            ("Corner Furniture Shop", "business", "hello@corner.example"),
        ):
            company = SimCompany(self._next_id(), name, kind, email=email)
            self.companies[company.id] = company
        self.variants: dict[int, SimVariant] = {}
        self.purchase_orders: dict[int, SimPurchaseOrder] = {}
        self.line_items: dict[int, SimLineItem] = {}
        self.procurements: dict[int, SimProcurement] = {}
        self._order_numbers = itertools.count(1)
        self.created_at = now
        #: Told ``(event, object id)`` of every webhook event (``purchase_order.create``...).
        self.listeners: list[Callable[[str, int], None]] = []
        if seed_catalog:
            for material in MATERIALS:
                self.add_variant(material.sku, material.name, material.purchase_price)

    def _next_id(self) -> int:
        return next(self._ids)

    # -- look-ups ----------------------------------------------------------------------

    def currency_by_iso(self, iso: str) -> SimCurrency:
        for currency in self.currencies.values():
            if currency.iso == iso.upper():
                return currency
        raise Refused("currency", f"{iso!r} is not a currency of this account")

    def add_company(self, name: str, company_type: str = "supplier") -> SimCompany:
        """A person adds a company (e.g. a second supplier named like the first)."""
        company = SimCompany(self._next_id(), name, company_type)
        self.companies[company.id] = company
        return company

    def company_by_name(self, name: str) -> SimCompany:
        for company in self.companies.values():
            if company.name == name:
                return company
        raise Refused("supplier", f"no company named {name!r}")

    def variant_by_sku(self, sku: str) -> SimVariant | None:
        for variant in self.variants.values():
            if sku and variant.sku == sku:
                return variant
        return None

    def purchase_order(self, purchase_order_id: int) -> SimPurchaseOrder | None:
        return self.purchase_orders.get(purchase_order_id)

    def lines_of(self, order: SimPurchaseOrder) -> list[SimLineItem]:
        return [self.line_items[i] for i in order.line_ids]

    # -- a person's actions ------------------------------------------------------------

    def add_variant(
        self, sku: str | None, name: str, buy_price: Decimal | None = None
    ) -> SimVariant:
        """Create a product with one variant; ``sku`` None or empty makes one without SKU."""
        if sku and self.variant_by_sku(sku) is not None:
            raise Refused("sku", "has already been taken")
        now = self.clock()
        variant = SimVariant(
            id=self._next_id(),
            product_id=self._next_id(),
            sku=sku or "",
            name="Default",
            product_name=name,
            buy_price=buy_price,
            created_at=now,
            updated_at=now,
            stock={self.location_id: Decimal(0)},
        )
        self.variants[variant.id] = variant
        return variant

    def create_purchase_order(
        self,
        *,
        company: SimCompany,
        currency: SimCurrency,
        status: str = "active",
        lines: list[Json],
        created_at: datetime | None = None,
        notes: str | None = None,
    ) -> SimPurchaseOrder:
        """A person raises a purchase order (``lines`` as the control interface takes them)."""
        if status not in ("draft", "active"):
            raise Refused("status", "must be draft or active for a new purchase order")
        when = created_at or self.clock()
        order = SimPurchaseOrder(
            id=self._next_id(),
            company_id=company.id,
            currency_id=currency.id,
            stock_location_id=self.location_id,
            order_number=f"PO{next(self._order_numbers):04d}",
            status=status,
            created_at=when,
            updated_at=when,
            notes=notes,
        )
        self.purchase_orders[order.id] = order
        for spec in lines:
            self._add_line(order, spec, when)
        self._emit("purchase_order.create", order.id)
        return order

    def _emit(self, event: str, object_id: int) -> None:
        for listener in self.listeners:
            listener(event, object_id)

    def _add_line(self, order: SimPurchaseOrder, spec: Json, when: datetime) -> SimLineItem:
        freeform = bool(spec.get("freeform", False))
        quantity = _parse_decimal(spec.get("quantity", "1"), "quantity")
        price = None if spec.get("price") is None else _parse_decimal(spec["price"], "price")
        variant_id: int | None = None
        if not freeform:
            sku = spec.get("sku")
            variant = self.variant_by_sku(sku) if isinstance(sku, str) else None
            if variant is None:
                name = spec.get("name") or (sku if isinstance(sku, str) and sku else "Item")
                variant = self.add_variant(sku if isinstance(sku, str) else None, str(name), price)
            variant_id = variant.id
            if price is None:
                price = variant.buy_price
        extra = spec.get("extra_cost_value")
        line = SimLineItem(
            id=self._next_id(),
            purchase_order_id=order.id,
            variant_id=variant_id,
            quantity=quantity,
            price=price,
            position=len(order.line_ids),
            created_at=when,
            updated_at=when,
            freeform=freeform,
            label=spec.get("label") or (spec.get("name") if freeform else None),
            extra_cost_value=(
                Decimal("0.0") if extra is None else _parse_decimal(extra, "extra_cost_value")
            ),
            tax_type_id=self.TAX_TYPE_ID,
        )
        self.line_items[line.id] = line
        order.line_ids.append(line.id)
        order.updated_at = max(order.updated_at, when)
        return line

    def edit_purchase_order(
        self,
        order: SimPurchaseOrder,
        *,
        status: str | None = None,
        lines: list[Json] | None = None,
        add_lines: list[Json] | None = None,
        remove_line_ids: list[int] | None = None,
    ) -> None:
        """A person edits a purchase order in the TradeGecko UI."""
        now = self.clock()
        if status is not None:
            if status not in ("draft", "active", "received", "void", "deleted"):
                raise Refused("status", "is not included in the list")
            order.status = status
        for change in lines or []:
            line = self.line_items.get(int(change["id"]))
            if line is None or line.purchase_order_id != order.id:
                raise Refused("purchase_order_line_items", f"line {change['id']} not found")
            if "quantity" in change:
                line.quantity = _parse_decimal(change["quantity"], "quantity")
            if "price" in change:
                line.price = _parse_decimal(change["price"], "price")
            line.updated_at = now
        for spec in add_lines or []:
            self._add_line(order, spec, now)
        for line_id in remove_line_ids or []:
            if line_id not in order.line_ids:
                raise Refused("purchase_order_line_items", f"line {line_id} not found")
            order.line_ids.remove(line_id)
            del self.line_items[line_id]
        order.updated_at = now

    def delete_purchase_order(self, order: SimPurchaseOrder) -> None:
        """A person deletes the purchase order: TradeGecko keeps it with status deleted."""
        order.status = "deleted"
        order.updated_at = self.clock()

    # -- API writes --------------------------------------------------------------------

    def update_line_item(self, line: SimLineItem, changes: Json) -> None:
        """``PUT /purchase_order_line_items/{id}``: price, quantity, label, position."""
        order = self.purchase_orders[line.purchase_order_id]
        if order.status in ("void", "deleted"):
            raise Refused("purchase_order", f"is {order.status} and cannot be changed")
        price = line.price
        quantity = line.quantity
        if "price" in changes:
            price = _parse_decimal(changes["price"], "price")
            if price < 0:
                raise Refused("price", "must be greater than or equal to 0")
        if "quantity" in changes:
            quantity = _parse_decimal(changes["quantity"], "quantity")
            if order.status == "received":
                raise Refused("quantity", "cannot be changed on a received purchase order")
        now = self.clock()
        line.price, line.quantity = price, quantity
        if "label" in changes:
            line.label = None if changes["label"] is None else str(changes["label"])
        line.updated_at = now
        order.updated_at = now

    def receive(self, order: SimPurchaseOrder) -> SimProcurement:
        """``POST /purchase_orders/{id}/actions/receive``: receive every line into stock."""
        if order.status != "active":
            raise Refused("purchase_order", f"is {order.status}, only active orders are received")
        now = self.clock()
        procurement = SimProcurement(
            id=self._next_id(),
            purchase_order_id=order.id,
            line_ids=list(order.line_ids),
            received_at=now,
            created_at=now,
            updated_at=now,
        )
        self.procurements[procurement.id] = procurement
        for line in self.lines_of(order):
            line.procurement_id = procurement.id
            line.updated_at = now
            if line.variant_id is None:
                continue
            variant = self.variants[line.variant_id]
            self._add_stock(variant, order.stock_location_id, line.quantity, line.price, now)
        order.procurement_ids.append(procurement.id)
        order.status = "received"
        order.procurement_status = "procured"
        order.received_at = now
        order.updated_at = now
        self._emit("procurement.create", procurement.id)
        self._emit("purchase_order.received", order.id)
        return procurement

    @staticmethod
    def _add_stock(
        variant: SimVariant,
        location_id: int,
        quantity: Decimal,
        price: Decimal | None,
        now: datetime,
    ) -> None:
        before = variant.stock_on_hand
        cost = price if price is not None else Decimal(0)
        old = variant.moving_average_cost
        if before <= 0 or old is None or before + quantity <= 0:
            variant.moving_average_cost = cost
        else:
            total = before * old + quantity * cost
            variant.moving_average_cost = (total / (before + quantity)).quantize(Decimal("0.001"))
        variant.last_cost_price = cost
        variant.stock[location_id] = variant.stock.get(location_id, Decimal(0)) + quantity
        variant.updated_at = now

    # -- rendering ---------------------------------------------------------------------

    def render_account(self) -> Json:
        return {
            "id": self.account_id,
            "contact_email": "owner@workshop.example",
            "contact_mobile": None,
            "contact_phone": "555-0100",
            "country": "US",
            "default_tax_rate": 0.0,
            "default_tax_type": "exclusive",
            "industry": "Furniture",
            "logo_url": None,
            "name": "Workshop Inc.",
            "invoice_details": None,
            "order_details": None,
            "quote_details": None,
            "website": None,
            "expires_at": timestamp(self.created_at + timedelta(days=365)),
            "subscription_name": "Small",
            "subscription_price": 99.0,
            "annual_subscription_price": 79.0,
            "tax_number": "",
            "tax_number_label": "Tax Number",
            "tax_label": "Tax",
            "default_order_price_type_id": "wholesale",
            "default_purchase_order_price_type_id": "buy",
            "time_zone": "UTC",
            "stock_level_warn": True,
            "primary_location_id": self.location_id,
            "primary_billing_location_id": self.location_id,
            "default_currency_id": self.default_currency_id,
            "default_payment_term_id": None,
            "billing_contact_id": None,
            "location_ids": [self.location_id],
            "user_ids": [],
        }

    @staticmethod
    def render_currency(currency: SimCurrency) -> Json:
        return {
            "id": currency.id,
            "iso": currency.iso,
            "name": currency.name,
            "rate": decimal_string(currency.rate),
            "symbol": currency.symbol,
            "separator": ".",
            "delimiter": ",",
            "precision": 2,
            "format": "%u%n",
        }

    @staticmethod
    def render_company(company: SimCompany) -> Json:
        return {
            "id": company.id,
            "assignee_id": None,
            "name": company.name,
            "description": None,
            "phone_number": None,
            "status": company.status,
            "email": company.email,
            "website": None,
            "company_type": company.company_type,
            "company_code": f"C{company.id}",
            "fax": None,
            "default_tax_rate": None,
            "default_discount_rate": None,
            "default_price_type_id": "buy" if company.company_type == "supplier" else None,
            "default_payment_term_id": None,
            "tax_number": None,
            "address_ids": [],
            "contact_ids": [],
            "note_ids": [],
        }

    def render_variant(self, variant: SimVariant) -> Json:
        buy = _money(variant.buy_price)
        locations = [
            {"location_id": loc, "stock_on_hand": _whole_string(qty), "committed": None}
            for loc, qty in sorted(variant.stock.items())
        ]
        return {
            "id": variant.id,
            "product_id": variant.product_id,
            "sku": variant.sku,
            "reorder_point": None,
            "wholesale_price": None,
            "retail_price": None,
            "status": variant.status,
            "description": None,
            "name": variant.name,
            "upc": None,
            "supplier_code": None,
            "manage_stock": True,
            "max_online": None,
            "keep_selling": False,
            "taxable": True,
            "is_online": False,
            "online_id": None,
            "opt1": "Default",
            "opt2": None,
            "opt3": None,
            "position": 1,
            "buy_price": buy,
            "last_cost_price": _money(variant.last_cost_price),
            "stock_on_hand": _whole_string(variant.stock_on_hand),
            "committed_stock": "0",
            "moving_average_cost": _money(variant.moving_average_cost),
            "created_at": timestamp(variant.created_at),
            "product_name": variant.product_name,
            "product_status": "active",
            "product_type": "Material",
            "updated_at": timestamp(variant.updated_at),
            "variant_prices": [
                {"price_list_id": "buy", "value": buy},
                {"price_list_id": "retail", "value": None},
                {"price_list_id": "wholesale", "value": None},
            ],
            "composite": False,
            "weight": None,
            "sellable": True,
            "online_ordering": False,
            "locations": locations,
            "prices": {"buy": buy, "retail": None, "wholesale": None},
            "stock_levels": {
                str(loc): decimal_string(qty) for loc, qty in sorted(variant.stock.items())
            },
            "committed_stock_levels": {},
            "image_ids": [],
        }

    def _totals(self, order: SimPurchaseOrder) -> tuple[Decimal, Decimal]:
        quantity = Decimal(0)
        total = Decimal(0)
        for line in self.lines_of(order):
            quantity += line.quantity
            total += line.quantity * (line.price or Decimal(0)) + line.extra_cost_value
        return quantity, total.quantize(Decimal("0.01"))

    def render_purchase_order(self, order: SimPurchaseOrder) -> Json:
        quantity, total = self._totals(order)
        due = (order.created_at + timedelta(days=14)).date()
        return {
            "id": order.id,
            "document_url": f"https://go.tradegecko.example/d/po-{order.id}",
            "company_id": order.company_id,
            "supplier_address_id": None,
            "stock_location_id": order.stock_location_id,
            "billing_address_id": None,
            "currency_id": order.currency_id,
            "status": order.status,
            "procurement_status": order.procurement_status,
            "order_number": order.order_number,
            "reference_number": order.reference_number,
            "notes": order.notes,
            "email": self.companies[order.company_id].email,
            "tax_treatment": "exclusive",
            "created_at": timestamp(order.created_at),
            "updated_at": timestamp(order.updated_at),
            "due_at": due.isoformat(),
            "issued_at": order.created_at.date().isoformat(),
            "payment_due_at": due.isoformat(),
            "received_at": None if order.received_at is None else timestamp(order.received_at),
            "default_price_list_id": "buy",
            "destination_url": None,
            "total": decimal_string(total),
            "cached_quantity": decimal_string(quantity),
            "cached_total": decimal_string(total),
            "default_price_type_id": "buy",
            "tax_type": "exclusive",
            "tags": [],
            "purchase_order_line_item_ids": list(order.line_ids),
            "procurement_ids": list(order.procurement_ids),
        }

    @staticmethod
    def render_line_item(line: SimLineItem) -> Json:
        return {
            "id": line.id,
            "purchase_order_id": line.purchase_order_id,
            "variant_id": line.variant_id,
            "procurement_id": line.procurement_id,
            "tax_type_id": line.tax_type_id,
            "quantity": decimal_string(line.quantity),
            "position": line.position,
            "tax_rate_override": None,
            "price": _money(line.price),
            "label": line.label,
            "freeform": line.freeform,
            "base_price": None,
            "extra_cost_value": decimal_string(line.extra_cost_value),
            "image_url": None,
            "tax_rate": None,
            "created_at": timestamp(line.created_at),
            "updated_at": timestamp(line.updated_at),
        }

    @staticmethod
    def render_procurement(procurement: SimProcurement) -> Json:
        return {
            "id": procurement.id,
            "purchase_order_id": procurement.purchase_order_id,
            "purchase_order_line_item_ids": list(procurement.line_ids),
            "received_at": timestamp(procurement.received_at),
            "created_at": timestamp(procurement.created_at),
            "updated_at": timestamp(procurement.updated_at),
        }


def parse_time(value: str) -> datetime:
    """An ISO 8601 time or date from a filter or control request, as UTC."""
    text = value.strip().replace("Z", "+00:00").replace(" ", "+")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = datetime.combine(date.fromisoformat(text), datetime.min.time())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed
