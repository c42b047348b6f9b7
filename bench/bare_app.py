"""Figure 3's bare endpoint: a Starlette route answering what the webhook listener answers,
doing none of its work. Served twice: on syncd's ``serving()`` (``bare``) and by the plain
``uvicorn`` command (``plain``, the soundness reference), so that a gap between the two is
syncd's server set-up; a gap to :mod:`bench.plain_asgi` is Starlette's own cost.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["PATH", "app"]

PATH = "/webhooks/tradegecko"


async def _bare(request: Request) -> Response:
    await request.body()
    return JSONResponse({"status": "accepted"})


app = Starlette(routes=[Route(PATH, _bare, methods=["POST"])])
