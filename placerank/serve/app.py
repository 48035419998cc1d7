"""The FastAPI app: API v1, the web page at ``/``, OpenAPI at ``/docs`` (served locally).

Every error is one line of JSON, ``{"error": "..."}``; no stack trace reaches a response (a bug is
logged on the server and answered 500 ``internal error``). CORS is off: no CORS headers are sent,
so browsers let only pages from this server call the API.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Path, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from placerank.errors import PlaceRankError
from placerank.serve.guard import Guard
from placerank.serve.service import LocalizeService, rss_mb
from placerank.serve.stats import Stats
from placerank.serve.uploads import UploadError, check_image, safe_name
from placerank.serve.worker import NotFound, ServiceBusy
from placerank.version import __version__

log = logging.getLogger("placerank.serve")
MAX_TOP_K = 100
MAX_INDEX_FILES = 50


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def _static_dir():
    return resources.files("placerank.serve") / "static"


def create_app(service: LocalizeService, stats: Stats | None = None) -> FastAPI:
    """The app around a started :class:`LocalizeService` (closed when the app shuts down)."""
    stats = stats or Stats()
    config = service.config

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(
        title="placerank",
        version=__version__,
        description="Where was this photo taken? Visual place recognition against a `placerank index` database.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service, app.state.stats = service, stats
    app.add_middleware(Guard, stats=stats, limit_bytes=config.max_upload_bytes, tiles=config.tiles)
    try:  # Swagger UI from a local package, so /docs works with no internet
        import swagger_ui_bundle

        app.mount("/static/swagger", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger")
        swagger: dict[str, str] = {
            "swagger_js_url": "/static/swagger/swagger-ui-bundle.js",
            "swagger_css_url": "/static/swagger/swagger-ui.css",
            "swagger_favicon_url": "/static/swagger/favicon-32x32.png",
        }
    except ImportError:  # pragma: no cover - the serve extra installs it; else the CDN's copy
        swagger = {}
    app.mount("/static", StaticFiles(directory=str(_static_dir())), name="static")

    # -- errors: one line of JSON, never a trace ----------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request")

    @app.exception_handler(UploadError)
    async def _upload(request, exc: UploadError):
        return _error(exc.status, exc.message)

    @app.exception_handler(ServiceBusy)
    async def _busy(request, exc: ServiceBusy):
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(NotFound)
    async def _not_found(request, exc: NotFound):
        return _error(404, str(exc))

    @app.exception_handler(PlaceRankError)
    async def _placerank(request, exc: PlaceRankError):
        return _error(409 if "another placerank process" in str(exc) else 422, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal error (details are in the server log)")

    # -- auth for the write endpoints ---------------------------------------------------------------
    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if service.token is None:
            raise HTTPException(403, "write endpoints are disabled (start the server with --token-file)")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def read_upload(upload: UploadFile):
        from starlette.concurrency import run_in_threadpool

        data = await upload.read(config.max_upload_bytes + 1)
        return await run_in_threadpool(check_image, data, config.max_upload_bytes)  # decode off the event loop

    # -- the page and the docs -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = (_static_dir() / "index.html").read_text()
        return HTMLResponse(html.replace("{{TILES}}", _attr(config.tiles or "")))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="placerank API", **swagger)  # type: ignore[arg-type]

    # -- API v1 -------------------------------------------------------------------------------------------
    @app.get("/v1/health", tags=["status"], summary="Liveness and what is loaded")
    async def health() -> dict:
        info = service.info
        return {
            "status": "ok",
            "database_size": info["database_size"],
            "model": info["model"],
            "rerank": info["rerank"],
            "version": __version__,
        }

    @app.get("/v1/stats", tags=["status"], summary="Database, model, index, uptime, requests, latency percentiles")
    async def get_stats() -> dict:
        return {**service.info, **stats.snapshot(), "queue": service.worker.queue(), "rss_mb": rss_mb()}

    @app.get("/v1/places", tags=["places"], summary="Every database place (id, name, position) for maps")
    async def places() -> dict:
        await service.refresh()
        return {
            "frame": service.info["frame"],
            "radius_m": service.info["radius_m"],
            "places": [
                {"id": p.id, "name": p.name, "lat": p.lat, "lon": p.lon, "easting": p.easting, "northing": p.northing}
                for p in service.places.values()
            ],
        }

    @app.get(
        "/v1/places/{place_id}/thumbnail",
        tags=["places"],
        summary="A database photo's thumbnail (JPEG), by id",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    async def thumbnail(place_id: Annotated[int, Path(ge=0)]) -> Response:
        from starlette.concurrency import run_in_threadpool

        data = await run_in_threadpool(service.thumbnails.get, place_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})

    @app.get(
        "/v1/pictures/{token}.jpg",
        tags=["localize"],
        summary="The re-ranker's match picture of a recent answer (its `match_picture`)",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    async def picture(token: Annotated[str, Path(pattern="^[0-9a-f]{32}$")]) -> Response:
        return Response(service.pictures.get(token), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.post("/v1/localize", tags=["localize"], summary="Where was this photo taken?")
    async def localize(
        image: Annotated[UploadFile, File(description="the photo (JPEG, PNG, WebP, BMP, TIFF)")],
        top_k: Annotated[int | None, Form(ge=1, le=MAX_TOP_K)] = None,
        rerank: Annotated[str | None, Form(description="re-ranker name, e.g. ransac-xfeat; 'none' for none")] = None,
    ) -> dict:
        """The same JSON as `placerank localize` writes per photo (`lat`, `lon`, `confidence`,
        `matches` with `id`, `lat`, `lon`, `similarity`, `rerank_score`, `distance_m`, ...,
        `timing_s`); paths are relative to the database's photo folder. With a re-ranker that
        verifies matches, `match_picture` is the URL of the picture of those matches."""
        checked = await read_upload(image)
        name = safe_name(image.filename, "upload" + checked.suffix)
        chosen = config.rerank if rerank is None or rerank == "" else (None if rerank == "none" else rerank)
        return await service.localize(checked, name, top_k or config.top_k, chosen)

    @app.post(
        "/v1/index",
        tags=["write"],
        summary="Add geotagged photos (EXIF GPS); needs the bearer token",
        dependencies=[Depends(require_token)],
    )
    async def index(images: Annotated[list[UploadFile], File(description="photos with EXIF GPS")]) -> dict:
        if len(images) > MAX_INDEX_FILES:
            raise HTTPException(413, f"at most {MAX_INDEX_FILES} photos per request")
        files = [(safe_name(f.filename, f"photo{k}"), await read_upload(f)) for k, f in enumerate(images)]
        return await service.add(files)

    @app.delete(
        "/v1/places/{place_id}",
        tags=["write"],
        summary="Remove a place from the database (the photo file is kept); needs the bearer token",
        dependencies=[Depends(require_token)],
    )
    async def remove(place_id: Annotated[int, Path(ge=0)]) -> dict:
        return await service.remove(place_id)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def unknown(rest: str, request: Request):
        raise HTTPException(404, f"no such endpoint: {request.method} /v1/{rest}")

    return app


def _attr(value: str) -> str:
    import html

    return html.escape(value, quote=True)
