"""A TradeGecko API v1 simulator, faithful to the recorded responses, for demos and tests.

It serves the endpoints syncd calls with the real API's paths, envelopes, field names and
types, status codes and headers: Bearer auth (401), ``X-Request-Id`` on every response,
paging by ``limit`` (default 50, max 250, more is a 400) and ``page`` with the JSON
``X-Pagination`` header, newest first unless ``order=`` is given, the list filters, the
``Idempotency-Key`` header on POST and PUT (the first answer is replayed for 24 h), and the
300-requests-per-300-s rate limit with ``X-Rate-Limit-*`` headers (reset in epoch seconds)
and 429 until the reset, without ``Retry-After``.

Under ``/_sim/`` a control interface, without auth or rate limit, plays the people who use
TradeGecko: raising, editing and deleting purchase orders, adding variants, and reading
counters of what the API was asked to do.

It serves many accounts at once, one per API token (see :mod:`syncd.sim._frame`):
``POST /_sim/accounts {"token": ..., "webhook_secret": ...}`` adds one, seeded on first
use; a control call names its account with the ``X-Sim-Account`` header or ``?account=``.
Each account has its own records, idempotency keys, webhooks (signed with its own secret,
``<token>-webhook-secret`` unless named), counters, rate window and revocation knob.
"""

from __future__ import annotations

import functools
import math
import operator
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute

from syncd.sim._frame import (
    Account,
    Dialect,
    FixedWindow,
    Frame,
    Handler,
    Page,
    Quota,
    json_response,
    serve,
)
from syncd.sim._tradegecko_world import (
    BadRequest,
    NotFound,
    Refused,
    TradeGeckoError,
    TradeGeckoWorld,
    parse_time,
)
from syncd.sim.faults import Faults
from syncd.sim.webhooks import WebhookSender, tradegecko_sender

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_TOKEN",
    "DEFAULT_WEBHOOK_SECRET",
    "DIALECT",
    "IDEMPOTENCY_TTL",
    "MAX_LIMIT",
    "AccountHandler",
    "Json",
    "TradeGeckoWorld",
    "create_app",
    "run",
]

DEFAULT_TOKEN = "tradegecko-sim-token"
#: The OAuth application secret that signs the simulator's webhook deliveries.
DEFAULT_WEBHOOK_SECRET = "tradegecko-sim-webhook-secret"
IDEMPOTENCY_TTL = timedelta(hours=24)
DEFAULT_LIMIT = 50
MAX_LIMIT = 250

Json = dict[str, Any]

_NOT_FOUND_PAGE = (
    "<!DOCTYPE html>\n<html>\n<head>\n  <title>The page you were looking for doesn't exist"
    ' (404)</title>\n</head>\n<body>\n  <div class="dialog">\n    <h1>The page you were'
    " looking for doesn't exist.</h1>\n  </div>\n</body>\n</html>\n"
)


def _request_id() -> dict[str, str]:
    return {"X-Request-Id": str(uuid.uuid4())}


def _quota_headers(quota: Quota) -> dict[str, str]:
    # Reset in epoch seconds; no Retry-After on a 429, as the real API sends.
    return {
        "X-Rate-Limit-Limit": str(quota.limit),
        "X-Rate-Limit-Remaining": str(quota.remaining),
        "X-Rate-Limit-Reset": str(math.ceil(quota.reset_at)),
    }


def _unknown_route(request: Request) -> Response:
    # Unknown paths get Rails' HTML page, as the real API was seen to send.
    return HTMLResponse(_NOT_FOUND_PAGE, 404, headers=_request_id())


class _Unauthorized(TradeGeckoError):
    kind = "Unauthorized"


class _TooManyRequests(TradeGeckoError):
    kind = "TooManyRequests"


DIALECT = Dialect(
    service="tradegecko",
    unauthorized=_Unauthorized(401, "Invalid or missing access token"),
    rate_limited=_TooManyRequests(429, "Rate limit exceeded"),
    control_not_found=NotFound("control endpoint", "?"),
    bad_request=BadRequest,
    quota_headers=_quota_headers,
    unknown_route=_unknown_route,
    unknown_account=lambda token: NotFound("account", token),
    account_exists=lambda token: Refused("token", "has already been taken"),
    extra_headers=_request_id,
)


@dataclass
class _Stored:
    method: str
    path: str
    status: int
    body: bytes
    headers: dict[str, str]
    media_type: str | None
    at: datetime


@dataclass
class _Account:
    """An account's state and what the simulator keeps beside it: replayable answers, counts."""

    world: TradeGeckoWorld
    idempotent: dict[str, _Stored] = field(default_factory=dict)
    receipts: Counter[int] = field(default_factory=Counter)
    price_updates: int = 0


AccountHandler = Callable[[Request, _Account], Awaitable[Any]]


def _idempotent(frame: Frame, handler: Handler) -> Handler:
    """The ``Idempotency-Key`` header on POST and PUT: the first answer is replayed for
    24 h; the key on another request is a 422. Keys are the account's own."""

    @functools.wraps(handler)
    async def replaying(request: Request) -> Response:
        key = request.headers.get("Idempotency-Key")
        if not key or request.method not in ("POST", "PUT"):
            return await frame.answer(request, handler)
        account: _Account = request.state.account.state
        cutoff = account.world.clock() - IDEMPOTENCY_TTL
        for old in [k for k, v in account.idempotent.items() if v.at < cutoff]:
            del account.idempotent[old]
        stored = account.idempotent.get(key)
        if stored is not None:
            if (stored.method, stored.path) != (request.method, request.url.path):
                return Refused("idempotency_key", "was used for another request").response()
            response = Response(stored.body, stored.status, stored.headers, stored.media_type)
            response.headers["Idempotent-Replayed"] = "true"
            return response
        response = await frame.answer(request, handler)
        if response.status_code < 500:
            account.idempotent[key] = _Stored(
                request.method,
                request.url.path,
                response.status_code,
                bytes(response.body),
                {k: v for k, v in response.headers.items() if k.lower() == "x-pagination"},
                response.media_type,
                account.world.clock(),
            )
        return response

    return replaying


# -- lists --------------------------------------------------------------------------------


def _values(request: Request, name: str, *, split: bool) -> list[str]:
    raw = request.query_params.getlist(name) + request.query_params.getlist(f"{name}[]")
    if not split:
        return raw
    return [part.strip() for value in raw for part in value.split(",") if part.strip()]


def _int_param(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if number < 0:
        raise BadRequest(f"{name} must be greater than or equal to 0")
    return number


def _order(request: Request, rows: list[Json]) -> list[Json]:
    order = request.query_params.get("order")
    if not order:
        return sorted(rows, key=lambda r: (r.get("created_at") or "", r["id"]), reverse=True)
    parts = order.replace("+", " ").split()
    column = parts[0]
    descending = len(parts) > 1 and parts[1].lower() == "desc"
    if rows and column not in rows[0]:
        raise BadRequest(f"cannot order by {column}")
    return sorted(
        rows,
        key=lambda r: (r.get(column) is None, r.get(column) or 0, r["id"]),
        reverse=descending,
    )


def _page(
    request: Request, plural: str, records: Iterable[Json], filters: Iterable[str]
) -> Response:
    rows = list(records)
    ids = {int(v) for v in _values(request, "ids", split=True) if v.isdigit()}
    if _values(request, "ids", split=True):
        rows = [r for r in rows if r["id"] in ids]
    for name in filters:
        wanted = _values(request, name, split=name.endswith("_id"))
        if wanted:
            rows = [r for r in rows if str(r.get(name)) in wanted]
    bounds: tuple[tuple[str, Callable[[datetime, datetime], bool]], ...] = (
        ("created_at_min", operator.ge),
        ("created_at_max", operator.le),
        ("updated_at_min", operator.ge),
        ("updated_at_max", operator.le),
    )
    for name, keep in bounds:
        value = request.query_params.get(name)
        if value:
            try:
                bound = parse_time(value)
            except ValueError:
                raise BadRequest(f"{name} is not a valid time") from None
            column = name.rsplit("_", 1)[0]
            rows = [r for r in rows if keep(parse_time(r[column]), bound)]
    rows = _order(request, rows)
    limit = _int_param(request, "limit", DEFAULT_LIMIT)
    if limit > MAX_LIMIT:
        raise BadRequest(f"limit must be less than or equal to {MAX_LIMIT}")
    number = max(1, _int_param(request, "page", 1))
    page = Page(number, limit, len(rows))
    total_pages = max(1, page.pages)
    pagination = {
        "total_records": page.total,
        "total_pages": total_pages,
        "first_page": number == 1,
        "last_page": number >= total_pages,
        "out_of_bounds": number > total_pages,
        "offset": page.offset,
    }
    headers = {"X-Pagination": msgspec.json.encode(pagination).decode()}
    links = []
    if number < total_pages:
        links.append(f'<{request.url.include_query_params(page=number + 1)}>; rel="next"')
    links.append(f'<{request.url.include_query_params(page=total_pages)}>; rel="last"')
    headers["Link"] = ", ".join(links)
    # meta.total as the recorded answers carry it (clients count pages from it).
    return json_response({plural: page.of(rows), "meta": {"total": page.total}}, headers=headers)


def _json_body(body: bytes) -> Json:
    try:
        data = msgspec.json.decode(body) if body.strip() else {}
    except msgspec.DecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


# -- API endpoints ------------------------------------------------------------------------


async def _current_account(request: Request, account: _Account) -> Any:
    return {"account": account.world.render_account()}


async def _companies(request: Request, account: _Account) -> Any:
    rows = [account.world.render_company(c) for c in account.world.companies.values()]
    return _page(request, "companies", rows, ("status", "company_type"))


async def _currencies(request: Request, account: _Account) -> Any:
    rows = [account.world.render_currency(c) for c in account.world.currencies.values()]
    # Currencies carry no timestamps in the recordings; keep creation order as age.
    return _page(request, "currencies", rows, ("iso",))


async def _variants(request: Request, account: _Account) -> Any:
    rows = [account.world.render_variant(v) for v in account.world.variants.values()]
    return _page(request, "variants", rows, ("sku", "status", "product_id"))


async def _purchase_orders(request: Request, account: _Account) -> Any:
    world = account.world
    rows = [world.render_purchase_order(o) for o in world.purchase_orders.values()]
    return _page(
        request,
        "purchase_orders",
        rows,
        ("status", "company_id", "order_number", "procurement_status", "stock_location_id"),
    )


def _order_or_404(request: Request, account: _Account) -> Any:
    order = account.world.purchase_order(int(request.path_params["id"]))
    if order is None:
        raise NotFound("PurchaseOrder", request.path_params["id"])
    return order


async def _purchase_order(request: Request, account: _Account) -> Any:
    world = account.world
    order = _order_or_404(request, account)
    data: Json = {"purchase_order": world.render_purchase_order(order)}
    include = {
        part.strip()
        for value in request.query_params.getlist("include")
        for part in value.split(",")
    }
    if "purchase_order_line_items" in include:
        # Assumed (unverified): a side-load carries at most one page of records.
        data["purchase_order_line_items"] = [
            world.render_line_item(line) for line in world.lines_of(order)
        ][:MAX_LIMIT]
    return data


async def _line_items(request: Request, account: _Account) -> Any:
    rows = [account.world.render_line_item(line) for line in account.world.line_items.values()]
    return _page(
        request,
        "purchase_order_line_items",
        rows,
        ("purchase_order_id", "variant_id", "procurement_id", "tax_type_id"),
    )


async def _update_line_item(request: Request, account: _Account) -> Any:
    line = account.world.line_items.get(int(request.path_params["id"]))
    if line is None:
        raise NotFound("PurchaseOrderLineItem", request.path_params["id"])
    payload = _json_body(await request.body())
    changes = payload.get("purchase_order_line_item")
    if not isinstance(changes, dict):
        raise BadRequest("param is missing or the value is empty: purchase_order_line_item")
    account.world.update_line_item(line, changes)
    if "price" in changes:
        account.price_updates += 1
    return Response(status_code=204)


async def _receive(request: Request, account: _Account) -> Any:
    world = account.world
    order = _order_or_404(request, account)
    procurement = world.receive(order)
    account.receipts[order.id] += 1
    return json_response(
        {
            "procurement": world.render_procurement(procurement),
            "purchase_order_line_items": [
                world.render_line_item(line) for line in world.lines_of(order)
            ],
        },
        201,
    )


# -- control panel ------------------------------------------------------------------------


def _lines(data: Json, key: str) -> list[Json]:
    lines = data.get(key, [])
    if not isinstance(lines, list) or not all(isinstance(x, dict) for x in lines):
        raise BadRequest(f"{key} must be a list of objects")
    return lines


def _order_document(account: _Account, order: Any, status: int) -> Response:
    world = account.world
    return json_response(
        {
            "purchase_order": world.render_purchase_order(order),
            "purchase_order_line_items": [
                world.render_line_item(line) for line in world.lines_of(order)
            ],
        },
        status,
    )


async def _sim_create_order(request: Request, account: _Account) -> Any:
    """A person raises a PO: {"supplier", "currency", "status", "lines": [{"sku", ...}]}."""
    data = _json_body(await request.body())
    world = account.world
    if "supplier_id" in data:
        company = world.companies.get(int(data["supplier_id"]))
        if company is None:
            raise BadRequest(f"no company {data['supplier_id']}")
    else:
        company = world.company_by_name(str(data.get("supplier", "Katana")))
    currency = world.currency_by_iso(str(data.get("currency", "USD")))
    created_at = data.get("created_at")
    try:
        when = parse_time(created_at) if isinstance(created_at, str) else None
    except ValueError:
        raise BadRequest("created_at is not an ISO 8601 time") from None
    lines = _lines(data, "lines")
    if not lines:
        # A PO without lines is nothing TradeGecko lets a person raise.
        raise Refused("purchase_order_line_items", "can't be blank")
    order = world.create_purchase_order(
        company=company,
        currency=currency,
        status=str(data.get("status", "active")),
        lines=lines,
        created_at=when,
        notes=data.get("notes"),
    )
    return _order_document(account, order, 201)


async def _sim_order(request: Request, account: _Account) -> Any:
    """PATCH: a person edits the PO ({"status", "lines", "add_lines", "remove_line_ids"});
    DELETE: deletes it."""
    order = _order_or_404(request, account)
    if request.method == "DELETE":
        account.world.delete_purchase_order(order)
        return _order_document(account, order, 200)
    data = _json_body(await request.body())
    remove = data.get("remove_line_ids", [])
    if not isinstance(remove, list):
        raise BadRequest("remove_line_ids must be a list")
    account.world.edit_purchase_order(
        order,
        status=data.get("status"),
        lines=_lines(data, "lines"),
        add_lines=_lines(data, "add_lines"),
        remove_line_ids=[int(x) for x in remove],
    )
    return _order_document(account, order, 200)


async def _sim_create_variant(request: Request, account: _Account) -> Any:
    """A person adds a variant: {"sku", "name", "buy_price"}."""
    data = _json_body(await request.body())
    price = data.get("buy_price")
    variant = account.world.add_variant(
        data.get("sku"),
        str(data.get("name") or data.get("sku") or "Item"),
        None if price is None else Decimal(str(price)),
    )
    return json_response({"variant": account.world.render_variant(variant)}, 201)


async def _sim_create_company(request: Request, account: _Account) -> Any:
    """A person adds a company: {"name", "company_type"} (default supplier)."""
    data = _json_body(await request.body())
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("name is required")
    company = account.world.add_company(name, str(data.get("company_type", "supplier")))
    return json_response({"company": account.world.render_company(company)}, 201)


def _counters(frame: Frame) -> AccountHandler:
    async def counters(request: Request, account: _Account) -> Any:
        """How often each endpoint was called, receipts per PO, price updates."""
        named: Account[_Account] = request.state.account
        return {
            "receipts": sum(account.receipts.values()),
            "receipts_per_po": {str(k): v for k, v in account.receipts.items()},
            "price_updates": account.price_updates,
            **frame.traffic(named),
            "faults_injected": request.app.state.faults.injected_for(named.token),
        }

    return counters


# -- webhooks -----------------------------------------------------------------------------


def _render_webhook(sub: Any) -> Json:
    stamp = sub.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "id": sub.id,
        "created_at": stamp,
        "updated_at": stamp,
        "event": sub.events[0],
        "address": sub.url,
        "oauth_application_id": 24,
    }


def _webhook_handlers(sender: WebhookSender) -> tuple[AccountHandler, AccountHandler]:
    """``/webhooks`` (list, create: one event per webhook) and ``/_sim/webhooks`` (knobs)."""

    async def webhooks(request: Request, account: _Account) -> Any:
        named: Account[_Account] = request.state.account
        if request.method == "GET":
            rows = [_render_webhook(sub) for sub in sender.subscriptions_of(named.token)]
            return _page(request, "webhooks", rows, ("event", "address"))
        hook = _json_body(await request.body()).get("webhook")
        if not isinstance(hook, dict):
            raise BadRequest("webhook is missing")
        address, event = hook.get("address"), hook.get("event")
        if not isinstance(address, str) or not address.startswith(("http://", "https://")):
            raise Refused("address", "is not a valid URL")
        if not isinstance(event, str) or "." not in event:
            raise Refused("event", "is not included in the list")
        sub = sender.subscribe(address, [event], account=named.token, secret=named.webhook_secret)
        return json_response({"webhook": _render_webhook(sub)}, 201)

    async def knobs(request: Request, account: _Account) -> Any:
        """Webhook sender: GET shows it, POST sets speed, duplicate, reorder, drop."""
        if request.method == "POST":
            try:
                sender.set_knobs(_json_body(await request.body()))
            except (ValueError, TypeError) as exc:
                raise BadRequest(str(exc)) from None
        return sender.knobs(request.state.account.token)

    return webhooks, knobs


def _publisher(sender: WebhookSender, account: str) -> Callable[[str, int], None]:
    def publish(event: str, object_id: int) -> None:
        resource = event.split(".", 1)[0]
        note = {
            "object_id": object_id,
            "event": event,
            "timestamp": int(time.time()),
            "resource_url": f"https://api.tradegecko.com/{resource}s/{object_id}.json",
        }
        sender.publish(event, lambda sub: note, account=account)

    return publish


# -- wiring -------------------------------------------------------------------------------


def create_app(
    world: TradeGeckoWorld | None = None,
    *,
    token: str = DEFAULT_TOKEN,
    rate_limit: tuple[int, float] | None = (300, 300.0),
    faults: Faults | None = None,
    webhook_secret: str = DEFAULT_WEBHOOK_SECRET,
) -> Starlette:
    """The simulator as an ASGI app; run ``app.state.webhooks.run()`` beside it to send
    webhooks (signed with ``webhook_secret``).

    :param world: the default account's state; a freshly seeded one by default (every
        account is on ``app.state.accounts``).
    :param token: the default account's bearer token (more: ``POST /_sim/accounts``).
    :param rate_limit: ``(requests, seconds)`` per fixed window, or None for no limit.
    :param faults: faults to inject from the start (see :mod:`syncd.sim.faults`); they can
        be changed at any time through ``/_sim/faults``.
    :param webhook_secret: what signs the default account's webhooks.
    """
    default = _Account(world if world is not None else TradeGeckoWorld())
    sender = tradegecko_sender(webhook_secret)

    def new_account(named: Account[_Account]) -> _Account:
        made = _Account(TradeGeckoWorld())
        made.world.listeners.append(_publisher(sender, named.token))
        return made

    frame = Frame(
        DIALECT,
        token,
        FixedWindow(*rate_limit) if rate_limit is not None else None,
        make_state=new_account,
        default_state=default,
        webhook_secrets=True,
        default_webhook_secret=webhook_secret,
    )
    default.world.listeners.append(_publisher(sender, token))
    webhooks, webhook_knobs = _webhook_handlers(sender)

    def api(template: str, handler: AccountHandler, methods: list[str]) -> BaseRoute:
        return frame.state_api(template, handler, methods, wrap=lambda h: _idempotent(frame, h))

    control = frame.state_control

    api_routes = [
        api("/accounts/current", _current_account, ["GET"]),
        api("/companies", _companies, ["GET"]),
        api("/currencies", _currencies, ["GET"]),
        api("/variants", _variants, ["GET"]),
        api("/purchase_orders", _purchase_orders, ["GET"]),
        api("/purchase_orders/{id}", _purchase_order, ["GET"]),
        api("/purchase_order_line_items", _line_items, ["GET"]),
        api("/purchase_order_line_items/{id}", _update_line_item, ["PUT"]),
        api("/purchase_orders/{id}/actions/receive", _receive, ["POST"]),
        api("/webhooks", webhooks, ["GET", "POST"]),
    ]
    control_routes = [
        control("/purchase_orders", _sim_create_order, ["POST"]),
        control("/purchase_orders/{id:int}", _sim_order, ["PATCH", "DELETE"]),
        control("/variants", _sim_create_variant, ["POST"]),
        control("/companies", _sim_create_company, ["POST"]),
        control("/counters", _counters(frame), ["GET"]),
        control("/webhooks", webhook_knobs, ["GET", "POST"]),
    ]
    return frame.app(
        api_routes,
        control_routes,
        service="tradegecko",
        world=default.world,
        webhooks=sender,
        faults=faults,
        rate_limit=rate_limit[0] if rate_limit else 300,
    )


async def run(
    host: str,
    port: int,
    *,
    rate_limit: bool = True,
    faults: Faults | None = None,
    accounts: int = 1,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve a freshly seeded simulator until cancelled.

    :param accounts: how many accounts in all: the default one, then tokens
        ``tradegecko-sim-token-1`` ... ``-(N-1)`` (webhook secrets ``<token>-webhook-secret``).
    :param on_ready: told the base URL once the simulator listens (``syncd sim``'s banner).
    """
    app = create_app(rate_limit=(300, 300.0) if rate_limit else None, faults=faults)
    await serve(app, host, port, token=DEFAULT_TOKEN, accounts=accounts, on_ready=on_ready)
