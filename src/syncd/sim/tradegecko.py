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
"""

from __future__ import annotations

import json
import math
import operator
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from syncd.ops.asgi import serving
from syncd.sim._tradegecko_world import Refused, TradeGeckoWorld, parse_time
from syncd.sim.faults import Faults, install_faults
from syncd.sim.webhooks import WebhookSender, tradegecko_sender

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_TOKEN",
    "DEFAULT_WEBHOOK_SECRET",
    "IDEMPOTENCY_TTL",
    "MAX_LIMIT",
    "Handler",
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
Handler = Callable[[Request, bytes], Awaitable[Response]]

_NOT_FOUND_PAGE = (
    "<!DOCTYPE html>\n<html>\n<head>\n  <title>The page you were looking for doesn't exist"
    ' (404)</title>\n</head>\n<body>\n  <div class="dialog">\n    <h1>The page you were'
    " looking for doesn't exist.</h1>\n  </div>\n</body>\n</html>\n"
)


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class _Missing(Exception):
    def __init__(self, kind: str, ident: object) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident}")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return Response(body, status, headers=headers, media_type="application/json")


@dataclass
class _Stored:
    method: str
    path: str
    status: int
    body: bytes
    headers: dict[str, str]
    media_type: str | None
    at: datetime


class _RateWindow:
    """TradeGecko's fixed windows, aligned to the epoch like its reset times."""

    def __init__(self, limit: int, period: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.period = period
        self.clock = clock
        self.window_end = 0.0
        self.used = 0

    def take(self) -> tuple[bool, dict[str, str]]:
        now = self.clock()
        if now >= self.window_end:
            self.window_end = (math.floor(now / self.period) + 1) * self.period
            self.used = 0
        allowed = self.used < self.limit
        if allowed:
            self.used += 1
        headers = {
            "X-Rate-Limit-Limit": str(self.limit),
            "X-Rate-Limit-Remaining": str(max(0, self.limit - self.used)),
            "X-Rate-Limit-Reset": str(math.ceil(self.window_end)),
        }
        return allowed, headers


class _Simulator:
    def __init__(
        self, world: TradeGeckoWorld, token: str, rate_limit: tuple[int, float] | None
    ) -> None:
        self.world = world
        self.token = token
        self.rate = (
            None if rate_limit is None else _RateWindow(rate_limit[0], rate_limit[1], time.time)
        )
        self.idempotent: dict[str, _Stored] = {}
        self.requests: Counter[str] = Counter()
        self.responses_429 = 0
        self.receipts: Counter[int] = Counter()
        self.price_updates = 0
        #: The control panel's knob: the token was revoked (every API call answers 401).
        self.revoked = False

    # -- the API's frame: request id, auth, rate limit, idempotency, errors -------------

    def api(self, method: str, template: str, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            self.requests[f"{method} {template}"] += 1
            body = await request.body()
            response = await self._answer(request, body, handler)
            response.headers["X-Request-Id"] = str(uuid.uuid4())
            return response

        return Route(template.replace("{id}", "{id:int}"), endpoint, methods=[method])

    async def _answer(self, request: Request, body: bytes, handler: Handler) -> Response:
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.token}" or self.revoked:
            return _json(
                {"type": "Unauthorized", "message": "Invalid or missing access token"}, 401
            )
        rate_headers: dict[str, str] = {}
        if self.rate is not None:
            allowed, rate_headers = self.rate.take()
            if not allowed:
                self.responses_429 += 1
                return _json(
                    {"type": "TooManyRequests", "message": "Rate limit exceeded"},
                    429,
                    rate_headers,
                )
        return await self._handle(request, body, handler, rate_headers)

    async def _handle(
        self, request: Request, body: bytes, handler: Handler, rate_headers: dict[str, str]
    ) -> Response:
        key = request.headers.get("Idempotency-Key")
        if key and request.method in ("POST", "PUT"):
            self._expire_keys()
            stored = self.idempotent.get(key)
            if stored is not None:
                if (stored.method, stored.path) != (request.method, request.url.path):
                    response = _json(
                        {"errors": {"idempotency_key": ["was used for another request"]}}, 422
                    )
                else:
                    response = Response(
                        stored.body, stored.status, stored.headers, stored.media_type
                    )
                    response.headers["Idempotent-Replayed"] = "true"
                response.headers.update(rate_headers)
                return response
        response = await self._run(request, body, handler)
        if key and request.method in ("POST", "PUT") and response.status_code < 500:
            self.idempotent[key] = _Stored(
                request.method,
                request.url.path,
                response.status_code,
                bytes(response.body),
                {k: v for k, v in response.headers.items() if k.lower() == "x-pagination"},
                response.media_type,
                self.world.clock(),
            )
        response.headers.update(rate_headers)
        return response

    def _expire_keys(self) -> None:
        cutoff = self.world.clock() - IDEMPOTENCY_TTL
        for key in [k for k, v in self.idempotent.items() if v.at < cutoff]:
            del self.idempotent[key]

    @staticmethod
    async def _run(request: Request, body: bytes, handler: Handler) -> Response:
        try:
            return await handler(request, body)
        except Refused as exc:
            return _json({"errors": exc.errors}, 422)
        except _BadRequest as exc:
            return _json({"type": "BadRequest", "message": exc.message}, 400)
        except _Missing as exc:
            return _json(
                {
                    "type": "NotFound",
                    "message": f"Couldn't find {exc.kind} with 'id'={exc.ident}",
                },
                404,
            )

    # -- lists -------------------------------------------------------------------------

    @staticmethod
    def _values(request: Request, name: str, *, split: bool) -> list[str]:
        raw = request.query_params.getlist(name) + request.query_params.getlist(f"{name}[]")
        if not split:
            return raw
        return [part.strip() for value in raw for part in value.split(",") if part.strip()]

    def _page(
        self, request: Request, plural: str, records: Iterable[Json], filters: Iterable[str]
    ) -> Response:
        rows = list(records)
        ids = {int(v) for v in self._values(request, "ids", split=True) if v.isdigit()}
        if self._values(request, "ids", split=True):
            rows = [r for r in rows if r["id"] in ids]
        for name in filters:
            wanted = self._values(request, name, split=name.endswith("_id"))
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
                    raise _BadRequest(f"{name} is not a valid time") from None
                column = name.rsplit("_", 1)[0]
                rows = [r for r in rows if keep(parse_time(r[column]), bound)]
        rows = self._order(request, rows)
        limit = self._int_param(request, "limit", DEFAULT_LIMIT)
        if limit > MAX_LIMIT:
            raise _BadRequest(f"limit must be less than or equal to {MAX_LIMIT}")
        page = max(1, self._int_param(request, "page", 1))
        total = len(rows)
        if limit == 0:
            total_pages, shown, offset = 1, [], 0
        else:
            total_pages = max(1, math.ceil(total / limit))
            offset = (page - 1) * limit
            shown = rows[offset : offset + limit]
        pagination = {
            "total_records": total,
            "total_pages": total_pages,
            "first_page": page == 1,
            "last_page": page >= total_pages,
            "out_of_bounds": page > total_pages,
            "offset": offset,
        }
        headers = {"X-Pagination": json.dumps(pagination, separators=(",", ":"))}
        links = []
        if page < total_pages:
            links.append(f'<{request.url.include_query_params(page=page + 1)}>; rel="next"')
        links.append(f'<{request.url.include_query_params(page=total_pages)}>; rel="last"')
        headers["Link"] = ", ".join(links)
        return _json({plural: shown}, headers=headers)

    @staticmethod
    def _int_param(request: Request, name: str, default: int) -> int:
        value = request.query_params.get(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise _BadRequest(f"{name} must be an integer") from None
        if number < 0:
            raise _BadRequest(f"{name} must be greater than or equal to 0")
        return number

    @staticmethod
    def _order(request: Request, rows: list[Json]) -> list[Json]:
        order = request.query_params.get("order")
        if not order:
            return sorted(rows, key=lambda r: (r.get("created_at") or "", r["id"]), reverse=True)
        parts = order.replace("+", " ").split()
        column = parts[0]
        descending = len(parts) > 1 and parts[1].lower() == "desc"
        if rows and column not in rows[0]:
            raise _BadRequest(f"cannot order by {column}")
        return sorted(
            rows,
            key=lambda r: (r.get(column) is None, r.get(column) or 0, r["id"]),
            reverse=descending,
        )

    # -- API endpoints -----------------------------------------------------------------

    async def current_account(self, request: Request, body: bytes) -> Response:
        return _json({"account": self.world.render_account()})

    async def companies(self, request: Request, body: bytes) -> Response:
        rows = [self.world.render_company(c) for c in self.world.companies.values()]
        return self._page(request, "companies", rows, ("status", "company_type"))

    async def currencies(self, request: Request, body: bytes) -> Response:
        rows = [self.world.render_currency(c) for c in self.world.currencies.values()]
        # Currencies carry no timestamps in the recordings; keep creation order as age.
        return self._page(request, "currencies", rows, ("iso",))

    async def variants(self, request: Request, body: bytes) -> Response:
        rows = [self.world.render_variant(v) for v in self.world.variants.values()]
        return self._page(request, "variants", rows, ("sku", "status", "product_id"))

    async def purchase_orders(self, request: Request, body: bytes) -> Response:
        rows = [self.world.render_purchase_order(o) for o in self.world.purchase_orders.values()]
        return self._page(
            request,
            "purchase_orders",
            rows,
            ("status", "company_id", "order_number", "procurement_status", "stock_location_id"),
        )

    def _order_or_404(self, request: Request) -> Any:
        order = self.world.purchase_order(int(request.path_params["id"]))
        if order is None:
            raise _Missing("PurchaseOrder", request.path_params["id"])
        return order

    async def purchase_order(self, request: Request, body: bytes) -> Response:
        order = self._order_or_404(request)
        data: Json = {"purchase_order": self.world.render_purchase_order(order)}
        include = {
            part.strip()
            for value in request.query_params.getlist("include")
            for part in value.split(",")
        }
        if "purchase_order_line_items" in include:
            # Assumed (unverified): a side-load carries at most one page of records.
            data["purchase_order_line_items"] = [
                self.world.render_line_item(line) for line in self.world.lines_of(order)
            ][:MAX_LIMIT]
        return _json(data)

    async def line_items(self, request: Request, body: bytes) -> Response:
        rows = [self.world.render_line_item(line) for line in self.world.line_items.values()]
        return self._page(
            request,
            "purchase_order_line_items",
            rows,
            ("purchase_order_id", "variant_id", "procurement_id", "tax_type_id"),
        )

    async def update_line_item(self, request: Request, body: bytes) -> Response:
        line = self.world.line_items.get(int(request.path_params["id"]))
        if line is None:
            raise _Missing("PurchaseOrderLineItem", request.path_params["id"])
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            raise _BadRequest("the body is not valid JSON") from None
        changes = payload.get("purchase_order_line_item") if isinstance(payload, dict) else None
        if not isinstance(changes, dict):
            raise _BadRequest("param is missing or the value is empty: purchase_order_line_item")
        self.world.update_line_item(line, changes)
        if "price" in changes:
            self.price_updates += 1
        return Response(status_code=204)

    async def receive(self, request: Request, body: bytes) -> Response:
        order = self._order_or_404(request)
        procurement = self.world.receive(order)
        self.receipts[order.id] += 1
        return _json(
            {
                "procurement": self.world.render_procurement(procurement),
                "purchase_order_line_items": [
                    self.world.render_line_item(line) for line in self.world.lines_of(order)
                ],
            },
            201,
        )

    # -- control interface -------------------------------------------------------------

    def control(self, method: str, path: str, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            body = await request.body()
            try:
                return await handler(request, body)
            except Refused as exc:
                return _json({"errors": exc.errors}, 422)
            except _BadRequest as exc:
                return _json({"error": exc.message}, 400)
            except _Missing as exc:
                return _json({"error": f"no {exc.kind} {exc.ident}"}, 404)

        return Route(path, endpoint, methods=[method])

    @staticmethod
    def _payload(body: bytes) -> Json:
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            raise _BadRequest("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise _BadRequest("the body must be a JSON object")
        return data

    @staticmethod
    def _lines(data: Json, key: str) -> list[Json]:
        lines = data.get(key, [])
        if not isinstance(lines, list) or not all(isinstance(x, dict) for x in lines):
            raise _BadRequest(f"{key} must be a list of objects")
        return lines

    def _order_document(self, order: Any, status: int) -> Response:
        return _json(
            {
                "purchase_order": self.world.render_purchase_order(order),
                "purchase_order_line_items": [
                    self.world.render_line_item(line) for line in self.world.lines_of(order)
                ],
            },
            status,
        )

    async def sim_create_order(self, request: Request, body: bytes) -> Response:
        data = self._payload(body)
        world = self.world
        if "supplier_id" in data:
            company = world.companies.get(int(data["supplier_id"]))
            if company is None:
                raise _BadRequest(f"no company {data['supplier_id']}")
        else:
            company = world.company_by_name(str(data.get("supplier", "Katana")))
        currency = world.currency_by_iso(str(data.get("currency", "USD")))
        created_at = data.get("created_at")
        try:
            when = parse_time(created_at) if isinstance(created_at, str) else None
        except ValueError:
            raise _BadRequest("created_at is not an ISO 8601 time") from None
        order = world.create_purchase_order(
            company=company,
            currency=currency,
            status=str(data.get("status", "active")),
            lines=self._lines(data, "lines"),
            created_at=when,
            notes=data.get("notes"),
        )
        return self._order_document(order, 201)

    async def sim_edit_order(self, request: Request, body: bytes) -> Response:
        data = self._payload(body)
        order = self._order_or_404(request)
        remove = data.get("remove_line_ids", [])
        if not isinstance(remove, list):
            raise _BadRequest("remove_line_ids must be a list")
        self.world.edit_purchase_order(
            order,
            status=data.get("status"),
            lines=self._lines(data, "lines"),
            add_lines=self._lines(data, "add_lines"),
            remove_line_ids=[int(x) for x in remove],
        )
        return self._order_document(order, 200)

    async def sim_delete_order(self, request: Request, body: bytes) -> Response:
        order = self._order_or_404(request)
        self.world.delete_purchase_order(order)
        return self._order_document(order, 200)

    async def sim_create_variant(self, request: Request, body: bytes) -> Response:
        data = self._payload(body)
        price = data.get("buy_price")
        variant = self.world.add_variant(
            data.get("sku"),
            str(data.get("name") or data.get("sku") or "Item"),
            None if price is None else Decimal(str(price)),
        )
        return _json({"variant": self.world.render_variant(variant)}, 201)

    async def sim_create_company(self, request: Request, body: bytes) -> Response:
        data = self._payload(body)
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise _BadRequest("name is required")
        company = self.world.add_company(name, str(data.get("company_type", "supplier")))
        return _json({"company": self.world.render_company(company)}, 201)

    async def sim_token(self, request: Request, body: bytes) -> Response:
        """``{"revoked": true}`` revokes the token (401 everywhere); ``false`` restores it."""
        self.revoked = bool(self._payload(body).get("revoked", True))
        return _json({"revoked": self.revoked})

    async def sim_counters(self, request: Request, body: bytes) -> Response:
        return _json(
            {
                "receipts": sum(self.receipts.values()),
                "receipts_per_po": {str(k): v for k, v in self.receipts.items()},
                "price_updates": self.price_updates,
                "requests": dict(self.requests),
                "responses_429": self.responses_429,
                "faults_injected": dict(request.app.state.faults.injected),
            }
        )


def _webhook_routes(sim: _Simulator, sender: WebhookSender) -> list[Route]:
    """``/webhooks`` (list, create: one event per webhook) and ``/_sim/webhooks`` (knobs)."""

    def render(sub: Any) -> Json:
        stamp = sub.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "id": sub.id,
            "created_at": stamp,
            "updated_at": stamp,
            "event": sub.events[0],
            "address": sub.url,
            "oauth_application_id": 24,
        }

    async def create(request: Request, body: bytes) -> Response:
        hook = sim._payload(body).get("webhook")
        if not isinstance(hook, dict):
            raise _BadRequest("webhook is missing")
        address, event = hook.get("address"), hook.get("event")
        if not isinstance(address, str) or not address.startswith(("http://", "https://")):
            raise Refused("address", "is not a valid URL")
        if not isinstance(event, str) or "." not in event:
            raise Refused("event", "is not included in the list")
        return _json({"webhook": render(sender.subscribe(address, [event]))}, 201)

    async def listing(request: Request, body: bytes) -> Response:
        rows = [render(sub) for sub in sender.subscriptions.values()]
        return sim._page(request, "webhooks", rows, ("event", "address"))

    async def knobs(request: Request, body: bytes) -> Response:
        if request.method == "POST":
            try:
                sender.set_knobs(sim._payload(body))
            except (ValueError, TypeError) as exc:
                raise _BadRequest(str(exc)) from None
        return _json(sender.knobs())

    return [
        sim.api("GET", "/webhooks", listing),
        sim.api("POST", "/webhooks", create),
        sim.control("GET", "/_sim/webhooks", knobs),
        sim.control("POST", "/_sim/webhooks", knobs),
    ]


def _publisher(sender: WebhookSender) -> Callable[[str, int], None]:
    def publish(event: str, object_id: int) -> None:
        resource = event.split(".", 1)[0]
        note = {
            "object_id": object_id,
            "event": event,
            "timestamp": int(time.time()),
            "resource_url": f"https://api.tradegecko.com/{resource}s/{object_id}.json",
        }
        sender.publish(event, lambda sub: note)

    return publish


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

    :param world: the account's state; a freshly seeded one by default.
    :param token: the only bearer token accepted.
    :param rate_limit: ``(requests, seconds)`` per fixed window, or None for no limit.
    :param faults: faults to inject from the start (see :mod:`syncd.sim.faults`); they can
        be changed at any time through ``/_sim/faults``.
    """
    sim = _Simulator(world if world is not None else TradeGeckoWorld(), token, rate_limit)
    sender = tradegecko_sender(webhook_secret)
    sim.world.listeners.append(_publisher(sender))
    routes = [
        sim.api("GET", "/accounts/current", sim.current_account),
        sim.api("GET", "/companies", sim.companies),
        sim.api("GET", "/currencies", sim.currencies),
        sim.api("GET", "/variants", sim.variants),
        sim.api("GET", "/purchase_orders", sim.purchase_orders),
        sim.api("GET", "/purchase_orders/{id}", sim.purchase_order),
        sim.api("GET", "/purchase_order_line_items", sim.line_items),
        sim.api("PUT", "/purchase_order_line_items/{id}", sim.update_line_item),
        sim.api("POST", "/purchase_orders/{id}/actions/receive", sim.receive),
        sim.control("POST", "/_sim/purchase_orders", sim.sim_create_order),
        sim.control("PATCH", "/_sim/purchase_orders/{id:int}", sim.sim_edit_order),
        sim.control("DELETE", "/_sim/purchase_orders/{id:int}", sim.sim_delete_order),
        sim.control("POST", "/_sim/variants", sim.sim_create_variant),
        sim.control("POST", "/_sim/companies", sim.sim_create_company),
        sim.control("GET", "/_sim/counters", sim.sim_counters),
        sim.control("POST", "/_sim/token", sim.sim_token),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        # Unknown paths get Rails' HTML page, as the real API was seen to send.
        return HTMLResponse(_NOT_FOUND_PAGE, 404, headers={"X-Request-Id": str(uuid.uuid4())})

    routes += _webhook_routes(sim, sender)
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.world = sim.world
    app.state.webhooks = sender
    install_faults(app, "tradegecko", faults, rate_limit=rate_limit[0] if rate_limit else 300)
    return app


async def run(
    host: str, port: int, *, rate_limit: bool = True, faults: Faults | None = None
) -> None:
    """Serve a freshly seeded simulator until cancelled."""
    app = create_app(rate_limit=(300, 300.0) if rate_limit else None, faults=faults)
    async with serving(app, host, port), anyio.create_task_group() as tg:
        tg.start_soon(app.state.webhooks.run)
        await anyio.sleep_forever()
