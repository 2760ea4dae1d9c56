"""The explorer's web app: one page and the JSON API it calls (which scripts may call too).

Read-only: every route is a GET that reads through :class:`~.source.Source`; static files
come from the package. Loopback only by default, with a Host check against DNS
rebinding, and a content security policy that allows no inline script and nothing from
elsewhere.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import StoreError
from ..metrics.registry import figures
from . import draw
from .query import MAX_LIMIT, PARAMS, flag, select
from .source import RequestError, Source, _plain, parse_float, parse_int

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Metrics where a higher value is the better explanation (the "worst N" preset sorts
# these ascending, the others descending), as the metric registry declares them.
HIGHER_IS_BETTER = tuple(f.output for f in figures() if f.direction == "higher")


def create_app(src: Source, hosts: list[str] | None = None) -> Starlette:
    """The ASGI app serving ``src``; ``hosts``: Host header values accepted."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True))
    page = env.get_template("index.html")

    def image_query(request: Request) -> Any:
        q = request.query_params
        job = src.job(q.get("job"))
        return q, job, src.row(job, q.get("row"))

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page.render(root=str(src.root), sweep=src.sweep,
                                        warnings=src.warnings))

    def meta(request: Request) -> JSONResponse:
        t = src.frame
        classes = sorted(set(t["label_name"]) | set(t["pred_name"]) - {""})
        return JSONResponse({
            "root": str(src.root), "sweep": src.sweep, "columns": src.columns,
            "numeric": src.numeric, "maps": src.map_names, "jobs": list(src.jobs),
            "swept": src.swept(), "classes": [c for c in classes if c],
            "images": int(t["path"].nunique()),  # of a sweep: distinct photos
            "rows": len(t), "labeled": bool((t["label"] >= 0).any()),
            "warnings": src.warnings, "cmaps": list(draw.CMAPS), "max_limit": MAX_LIMIT,
            "params": list(PARAMS), "higher_is_better": [m for m in HIGHER_IS_BETTER
                                                         if m in src.numeric]})

    def images(request: Request) -> Response:
        total, rows = select(src, request.query_params)
        # Python's float repr round-trips: a value sent back as a bound selects its own row.
        records = rows.astype(object).where(rows.notna(), None).to_dict("records")
        body = json.dumps({"total": total, "rows": records}, default=_plain,
                          allow_nan=False)
        return Response(body, media_type="application/json")

    def overlay(request: Request) -> Response:
        q, job, row = image_query(request)
        info = src.map_of(job, q.get("map"))
        alpha = parse_float("alpha", q.get("alpha"), 0.0, 1.0, 0.5)
        cmap = q.get("cmap") or ("hot" if info.kind == "input_map" else "jet")
        if cmap not in draw.CMAPS:
            raise RequestError(f"unknown cmap {cmap[:40]!r}; valid: {', '.join(draw.CMAPS)}")
        size = parse_int("size", q.get("size"), 32, 2048, 1024)
        fmt = q.get("fmt") or "jpeg"
        if fmt not in ("jpeg", "png"):
            raise RequestError(f"fmt={fmt[:40]!r}: use jpeg or png")
        data = src.overlay(job, row, info, round(alpha, 3), cmap, size, fmt)
        return Response(data, media_type=f"image/{fmt}")

    def photo(request: Request) -> Response:
        q, job, row = image_query(request)
        crop = flag("crop", q["crop"]) if q.get("crop") else False
        size = parse_int("size", q.get("size"), 32, 2048, 1024)
        return Response(src.photo_bytes(job, row, crop, size), media_type="image/jpeg")

    def image(request: Request) -> JSONResponse:
        q = request.query_params
        job = src.job(q.get("job"))
        return JSONResponse(src.detail(job, src.row(job, q.get("row"), done=False)))

    async def refused(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestError)
        return JSONResponse({"error": str(e)}, status_code=e.status)

    async def damaged(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=422)

    async def unreadable(request: Request, e: Exception) -> JSONResponse:
        # HDF5 or a photo failing at read time: the file changed or broke while served.
        text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return JSONResponse({"error": f"cannot read from {src.root}: {text}"}, status_code=422)

    async def http_error(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, HTTPException)
        return JSONResponse({"error": e.detail}, status_code=e.status_code)

    routes = [
        Route("/", index), Route("/api/meta", meta), Route("/api/images", images),
        Route("/api/overlay", overlay), Route("/api/photo", photo), Route("/api/image", image),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        RequestError: refused, StoreError: damaged, OSError: unreadable,
        HTTPException: http_error},
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts or [
            "127.0.0.1", "localhost"])])
    app.add_middleware(_Headers)
    return app


class _Headers:
    """Adds :data:`HEADERS` to every response, and ``Server-Timing`` (the app's own time to
    the response head, which benchmarks read apart from the HTTP round trip)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        t0 = time.perf_counter()

        async def send_with(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                took = f"app;dur={(time.perf_counter() - t0) * 1000:.1f}"
                message["headers"] = [*message.get("headers", []), *(
                    (k.lower().encode(), v.encode()) for k, v in HEADERS.items()),
                    (b"server-timing", took.encode())]
            await send(message)
        await self.app(scope, receive, send_with)
