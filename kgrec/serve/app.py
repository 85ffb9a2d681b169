"""FastAPI service over one fitted :class:`~kgrec.pipeline.Recommender`, plus the static web page.

``create_app(recommender, config)`` builds the app around a recommender that is already loaded (the bundle is read
once, by the caller); every request reuses it. Endpoints (all JSON unless noted, OpenAPI at ``/docs``):

==========================  ===========================================================================
``GET /health``             liveness plus the bundle's size
``GET /users``              some user ids (most active first) for the page's user picker
``GET /recommend``          top-k for a user (``user``, ``k``, optional ``query``, ``explain``)
``GET /search``             free-text search (``text``, ``k``)
``POST /search``            image search: multipart ``image`` file (+ optional ``text``, ``k``)
``GET /similar``            items like ``item``
``GET /explain``            why ``item`` suits ``user`` (``ranking/explanation.schema.json``)
``GET /items/{id}``         the catalog record
``GET /items/{id}/image``   the item's image file (path checked to lie inside the dataset root)
``GET /``                   the web page (``kgrec/serve/static``)
==========================  ===========================================================================

``GET /recommend/from-items`` gives top-k for someone without history from chosen items (``items=A&items=B``, ``k``).

Errors are JSON ``{"detail": ...}``: unknown user/item -> 404, bad input -> 422 (FastAPI's validation errors,
``k`` above ``serve.max_k`` included), upload larger than ``serve.max_upload_bytes`` -> 413, upload that is not an
image -> 415, anything unexpected -> 500 with a generic message (the stack trace goes to the server log only).

Every call into the recommender runs on one compute thread per process (``kgrec.serve.batching.MicroBatcher``):
its lazy caches are not thread-safe, and one busy thread per core is what the hardware gives. Concurrent
``/recommend`` (without a query) and text ``/search`` requests that queue up while that thread is busy are answered
as one batch (``Recommender.recommend_batch`` / ``search_batch``); ``serve.max_batch`` bounds a batch, 1 turns
batching off. Endpoints are ``async`` so that no request needs a thread of its own. For more than one core run
several processes (``kgrec serve --workers N``, each loads the bundle: see :func:`app_from_env`).
"""
from __future__ import annotations

import io
import json
import logging
import math
import mimetypes
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from kgrec import __version__
from kgrec.config import Config, ServeConfig
from kgrec.errors import DataError, KgrecError, UnknownIdError, check_query_text
from kgrec.serve.batching import MicroBatcher

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
# environment of `kgrec serve --workers N` worker processes (read by app_from_env)
ENV_BUNDLE = "KGREC_SERVE_BUNDLE_PATH"
ENV_CONFIG = "KGREC_SERVE_CONFIG_YAML"


# ---------------------------------------------------------------------------------------------------- responses
class Result(BaseModel):
    """One recommended or found item."""

    item_id: str
    score: float | None = Field(description="ranker score (recommend), cosine (similar) or z-scored similarity (search)")
    rank: int = Field(ge=1)
    title: str = ""
    image: str | None = Field(None, description="image path relative to the dataset root")
    image_url: str | None = Field(None, description="URL of the image on this server")
    sources: dict[str, float | None] | None = Field(None, description="search: per-signal similarity")
    explanation: dict[str, Any] | None = Field(None, description="ranking/explanation.schema.json")


class ResultList(BaseModel):
    results: list[Result]
    took_ms: float


class Health(BaseModel):
    status: str
    version: str
    users: int
    items: int
    ranker: bool
    store: str


class UserList(BaseModel):
    users: list[str]
    total: int


class ErrorBody(BaseModel):
    detail: Any


ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "unknown user or item"},
    422: {"description": "invalid input"},
}


class UploadTooLarge(DataError):
    """An uploaded file is larger than ``serve.max_upload_bytes``."""


class NotAnImage(DataError):
    """An uploaded file does not decode as an image."""


# ---------------------------------------------------------------------------------------------------- helpers
def _finite(x: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None (strict JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_finite(v) for v in x.tolist()]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (pd.Timestamp,)):
        return x.isoformat()
    return x


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.ndarray):
        return _finite(v)
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):  # lists / dicts
        pass
    return _finite(v)


IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/tiff"})


def _image_url(item_id: str, image: str | None) -> str | None:
    from urllib.parse import quote

    return None if not image else f"/items/{quote(item_id, safe='')}/image"


def _results(recs: list[Any]) -> list[dict[str, Any]]:
    out = []
    for r in recs:
        d = _finite(r.to_dict())
        d["image_url"] = _image_url(r.item_id, r.image)
        out.append(d)
    return out


def _read_upload(upload: UploadFile, limit: int) -> bytes:
    """The upload's bytes, refusing more than ``limit`` (read in chunks: a huge file is never held whole)."""
    buf = io.BytesIO()
    while True:
        chunk = upload.file.read(1 << 16)
        if not chunk:
            break
        buf.write(chunk)
        if buf.tell() > limit:
            raise UploadTooLarge(f"uploaded file {upload.filename!r} is larger than the limit of {limit} bytes "
                                 "(serve.max_upload_bytes); send a smaller image")
    data = buf.getvalue()
    if not data:
        raise NotAnImage(f"uploaded file {upload.filename!r} is empty; send a PNG, JPEG, GIF, BMP or WebP image")
    return data


def _check_image(data: bytes, filename: str | None) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL's message names the in-memory buffer ("cannot identify image file <_io.BytesIO object at 0x...>"):
        # say what happened in our words instead of passing on a memory address
        raise NotAnImage(f"uploaded file {filename!r} is not a readable image ({type(exc).__name__}); "
                         "send a PNG, JPEG, GIF, BMP or WebP image") from exc


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse a POST whose Content-Length exceeds ``limit`` before its body is read (413); a body
    sent without a length (chunked) is counted as it arrives and refused the same way once it passes ``limit``.

    A plain ASGI wrapper rather than ``@app.middleware("http")``: that one runs every request through an extra
    task and stream, which costs about a millisecond per request on a loaded 2-core machine.
    """

    def __init__(self, app: Any, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            length = None
            for name, value in scope.get("headers", ()):
                if name == b"content-length" and value.isdigit():
                    length = int(value)
            if length is not None and length > self.limit:
                await self._refuse(scope, receive, send, f"{length} bytes")
                return
            if length is None:
                await self._counted(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any, size: str) -> None:
        response = JSONResponse(status_code=413, content={"detail": (
            f"request body of {size} is larger than the upload limit of {self.upload_limit} bytes "
            "(serve.max_upload_bytes); send a smaller image")})
        await response(scope, receive, send)

    async def _counted(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen, too_large, replaced = 0, False, False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen, too_large
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                too_large = True
                raise _BodyTooLarge  # the framework answers its own error (FastAPI: 400): replaced below
            return message

        async def replacing_send(message: dict[str, Any]) -> None:
            nonlocal replaced
            if not too_large:
                await send(message)
            elif not replaced:
                replaced = True
                await self._refuse(scope, receive, send, f"more than {self.limit} bytes")

        try:
            await self.app(scope, counting_receive, replacing_send)
        except _BodyTooLarge:
            if not replaced:
                await self._refuse(scope, receive, send, f"more than {self.limit} bytes")


def _recommend_many(rec: Any, explain: bool) -> Callable[[Sequence[tuple[str, int]]], list[Any]]:
    """Batch function for (user, k) requests: unknown users get their own 404, the rest one ``recommend_batch``;
    if that fails, each request is answered on its own, so one failing user never fails the others batched with it."""

    def run(items: Sequence[tuple[str, int]]) -> list[Any]:
        out: list[Any] = [None] * len(items)
        known = []
        for r, (user, _) in enumerate(items):
            if user in rec.user_pos:
                known.append(r)
            else:
                try:
                    rec._user_index(user)
                except UnknownIdError as exc:
                    out[r] = exc
        if known:
            try:
                batch = rec.recommend_batch([items[r][0] for r in known], [items[r][1] for r in known],
                                            explain=explain)
            except Exception:  # noqa: BLE001 - isolated below: the failing request gets its own error
                logger.warning("a batch of %d /recommend requests failed; answering them one by one", len(known))
                batch = []
                for r in known:
                    try:
                        batch.append(rec.recommend(items[r][0], items[r][1], explain=explain))
                    except Exception as exc:  # noqa: BLE001 - this request's own error status
                        batch.append(exc)
            for r, recs in zip(known, batch):
                out[r] = recs
        return out

    return run


def _search_many(rec: Any, query_bf16: bool = False) -> Callable[[Sequence[tuple[str, int]]], list[Any]]:
    def run(items: Sequence[tuple[str, int]]) -> list[Any]:
        return rec.search_batch([t for t, _ in items], [k for _, k in items], query_bf16=query_bf16)

    return run


# ---------------------------------------------------------------------------------------------------- factory
def create_app(recommender: Any, config: Config | ServeConfig | None = None, *, warmup: bool = True) -> FastAPI:
    """The FastAPI app serving ``recommender`` (a fitted or loaded :class:`~kgrec.pipeline.Recommender`).

    Args:
        recommender: used as is for every request (never reloaded).
        config: the full :class:`Config` or just its ``serve`` section; defaults to ``ServeConfig()``.
        warmup: run one recommend/search/explain at start so the first user request does not pay for lazy
            caches (ranking context, explainer, encoders).
    """
    cfg = config.serve if isinstance(config, Config) else (config or ServeConfig())
    rec = recommender
    batcher = MicroBatcher(max_batch=cfg.max_batch, gather_ms=cfg.batch_gather_ms)
    max_k, max_chars = cfg.max_k, cfg.max_query_chars
    batch_recommend = {False: _recommend_many(rec, False), True: _recommend_many(rec, True)}
    batch_search = _search_many(rec, cfg.query_bf16)

    activity = rec.events["user_id"].value_counts() if len(rec.events) else pd.Series(dtype=int)
    known = set(rec.user_ids)
    users_by_activity = [u for u in activity.index.astype(str) if u in known]
    active = set(users_by_activity)  # built once: rebuilding it per user made start-up O(users^2)
    users_by_activity += [u for u in rec.user_ids if u not in active]
    dataset_root = Path(rec.dataset_root).resolve() if rec.dataset_root is not None else None

    app = FastAPI(
        title="kgrec",
        version=__version__,
        description="Knowledge-graph-enhanced multimodal recommendations: recommend, search (text or image), "
                    "similar items and explanations from one trained bundle.",
    )

    # ------------------------------------------------------------------------------------------ error handlers
    def _json_error(status: int, detail: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"detail": detail})

    @app.exception_handler(UnknownIdError)
    async def _unknown(_: Request, exc: UnknownIdError) -> JSONResponse:
        return _json_error(404, str(exc))

    @app.exception_handler(UploadTooLarge)
    async def _too_large(_: Request, exc: UploadTooLarge) -> JSONResponse:
        return _json_error(413, str(exc))

    @app.exception_handler(NotAnImage)
    async def _not_image(_: Request, exc: NotAnImage) -> JSONResponse:
        return _json_error(415, str(exc))

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError) -> JSONResponse:
        return _json_error(422, str(exc))

    @app.exception_handler(KgrecError)
    async def _kgrec(request: Request, exc: KgrecError) -> JSONResponse:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _json_error(503, f"the model cannot answer this request: {exc}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        logger.error("%s %s failed (ref %s)", request.method, request.url.path, ref, exc_info=exc)
        return _json_error(500, f"internal server error (ref {ref}); the server log has the details")

    # multipart overhead allowed on top of the image itself
    app.add_middleware(BodyLimit, limit=cfg.max_upload_bytes + 64 * 1024, upload_limit=cfg.max_upload_bytes)
    app.state.batcher = batcher

    # ------------------------------------------------------------------------------------------ endpoints
    K = Query(10, ge=1, le=max_k, description=f"number of results (1..{max_k}, serve.max_k)")
    ID = dict(min_length=1, max_length=256)

    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {"status": "ok", "version": __version__, "users": len(rec.user_ids), "items": len(rec.item_ids),
                "ranker": rec.ranker is not None, "store": type(rec.store).__name__}

    @app.get("/users", response_model=UserList, tags=["catalog"])
    def users(limit: int = Query(50, ge=1, le=1000, description="how many ids (most active users first)")) -> dict[str, Any]:
        """User ids known to the model, most active first (for the page's user picker)."""
        return {"users": users_by_activity[:limit], "total": len(users_by_activity)}

    @app.get("/recommend", response_model=ResultList, responses=ERRORS, tags=["recommend"])
    async def recommend(
        user: str = Query(..., description="user id; an unknown user needs a query", **ID),
        k: int = K,
        query: str | None = Query(None, max_length=max_chars, description="optional free-text intent"),
        explain: bool = Query(False, description="attach an explanation to every result"),
    ) -> dict[str, Any]:
        """Top-k items for a user (GNN candidates re-ranked by LightGBM), optionally steered by a query."""
        check_query_text(query, "'query'")
        t0 = time.perf_counter()
        if query:
            recs = await batcher.run(rec.recommend, user, k, query, explain)
        else:
            recs = await batcher.submit(("recommend", explain), batch_recommend[explain], (user, k))
        return {"results": _results(recs), "took_ms": (time.perf_counter() - t0) * 1e3}

    @app.get("/recommend/from-items", response_model=ResultList, responses=ERRORS, tags=["recommend"])
    async def recommend_from_items(
        items: list[str] = Query(..., min_length=1, max_length=100,
                                 description="item ids chosen by someone without history (repeat: items=A&items=B)"),
        k: int = K,
    ) -> dict[str, Any]:
        """Top-k items for someone without history from a few chosen items (the mean of their vectors; the chosen
        items are left out)."""
        t0 = time.perf_counter()
        recs = await batcher.run(rec.recommend_from_items, items, k)
        return {"results": _results(recs), "took_ms": (time.perf_counter() - t0) * 1e3}

    @app.get("/search", response_model=ResultList, responses=ERRORS, tags=["search"])
    async def search_text(
        text: str = Query(..., min_length=1, max_length=max_chars, description="free-text query"),
        k: int = K,
    ) -> dict[str, Any]:
        """Cross-modal text search (BERT text space + CLIP text->image)."""
        check_query_text(text, "'text'")
        t0 = time.perf_counter()
        recs = await batcher.submit("search", batch_search, (text, k))
        return {"results": _results(recs), "took_ms": (time.perf_counter() - t0) * 1e3}

    @app.post("/search", response_model=ResultList, tags=["search"],
              responses={**ERRORS, 413: {"model": ErrorBody, "description": "upload too large"},
                         415: {"model": ErrorBody, "description": "upload is not an image"}})
    async def search_image(
        image: UploadFile = File(..., description=f"query image (at most {cfg.max_upload_bytes} bytes)"),
        text: str | None = Form(None, max_length=max_chars, description="optional text combined with the image"),
        k: int = Form(10, ge=1, le=max_k, description=f"number of results (1..{max_k})"),
    ) -> dict[str, Any]:
        """Image search (CLIP image->image), optionally combined with text."""
        check_query_text(text, "'text'")
        t0 = time.perf_counter()
        data = _read_upload(image, cfg.max_upload_bytes)
        _check_image(data, image.filename)
        recs = await batcher.run(lambda: rec.search(text=text or None, image=data, k=k))
        return {"results": _results(recs), "took_ms": (time.perf_counter() - t0) * 1e3}

    @app.get("/similar", response_model=ResultList, responses=ERRORS, tags=["recommend"])
    async def similar(item: str = Query(..., description="item id", **ID), k: int = K) -> dict[str, Any]:
        """Items closest to ``item`` by the fused item vectors."""
        t0 = time.perf_counter()
        recs = await batcher.run(rec.similar, item, k)
        return {"results": _results(recs), "took_ms": (time.perf_counter() - t0) * 1e3}

    @app.get("/explain", responses=ERRORS, tags=["recommend"])
    async def explain(
        user: str = Query(..., description="user id", **ID),
        item: str = Query(..., description="item id", **ID),
        query: str | None = Query(None, max_length=max_chars),
    ) -> dict[str, Any]:
        """Why ``item`` suits ``user``: cited ranker features, KG paths, modality evidence, a sentence."""
        check_query_text(query, "'query'")
        e = await batcher.run(lambda: rec.explain(user, item, query=query or None))
        out = _finite(e.to_dict())
        out["image_url"] = _image_url(item, out.get("image"))
        return out

    def _item_row(item_id: str) -> pd.Series:
        rec._item_index(item_id)  # UnknownIdError -> 404
        if item_id not in rec.items.index:
            raise UnknownIdError(f"item {item_id!r} has no catalog record in this bundle")
        row = rec.items.loc[item_id]
        return row.iloc[0] if isinstance(row, pd.DataFrame) else row

    # ":path": ids may hold "/" (the image route first, so ".../image" is the image of that id)
    @app.get("/items/{item_id:path}/image", tags=["catalog"], response_class=FileResponse,
             responses={200: {"content": {"image/*": {}}, "description": "the image file"},
                        404: {"model": ErrorBody, "description": "unknown item or no image"}})
    def item_image(item_id: str) -> FileResponse:
        """The item's image file, read only from inside the dataset root."""
        row = _item_row(item_id)
        image = _cell(row.get("image"))
        if not image:
            raise UnknownIdError(f"item {item_id!r} has no image")
        if dataset_root is None:
            raise UnknownIdError("this bundle records no dataset root, so item images cannot be served")
        path = (dataset_root / str(image)).resolve()
        if not path.is_relative_to(dataset_root):
            logger.warning("item %r image path %r escapes the dataset root; refused", item_id, image)
            raise UnknownIdError(f"item {item_id!r} has no image inside the dataset")
        if not path.is_file():
            raise UnknownIdError(f"the image of item {item_id!r} is missing from the dataset ({image})")
        media = mimetypes.guess_type(path.name)[0]
        if media not in IMAGE_TYPES:  # only pictures: never a table, a manifest or an active type (svg, html)
            logger.warning("item %r image %r is not a picture file (%s); refused", item_id, image, media)
            raise UnknownIdError(f"item {item_id!r} has no image file of a picture type")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=3600",
                                                             "X-Content-Type-Options": "nosniff"})

    @app.get("/items/{item_id:path}", responses=ERRORS, tags=["catalog"])
    def item(item_id: str) -> dict[str, Any]:
        """The catalog record of one item (title, description, brand, category, attributes, price, image)."""
        row = _item_row(item_id)
        out = {str(c): _cell(row[c]) for c in row.index}
        if isinstance(out.get("attributes"), str):  # stored as JSON object text: served as the object it is
            try:
                out["attributes"] = json.loads(out["attributes"])
            except ValueError:
                logger.warning("item %r attributes are not JSON; served as text", item_id)
        out["image_url"] = _image_url(item_id, out.get("image"))
        return out

    # ------------------------------------------------------------------------------------------ the page
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    if cfg.query_runtime == "onnx" and not cfg.query_bf16:
        import torch

        try:
            rec.use_onnx_queries(threads=max(1, torch.get_num_threads()))
        except KgrecError as exc:  # no encoders in this bundle: nothing to speed up
            logger.warning("query encoders stay on torch: %s", exc)
    if warmup:
        _warm(rec, cfg.query_bf16)
    return app


def app_from_env() -> FastAPI:
    """App factory for ``kgrec serve --workers N`` (uvicorn ``factory=True``): each worker process loads the bundle
    named by ``KGREC_SERVE_BUNDLE_PATH`` with the resolved config in ``KGREC_SERVE_CONFIG_YAML``."""
    import yaml

    from kgrec.pipeline import Recommender

    bundle = os.environ.get(ENV_BUNDLE)
    if not bundle:
        raise KgrecError(f"{ENV_BUNDLE} is not set; start workers with `kgrec serve --bundle B --workers N`")
    cfg = Config.model_validate(yaml.safe_load(os.environ.get(ENV_CONFIG) or "{}") or {})
    limit_threads(cfg.serve.torch_threads)
    rec = Recommender.load(bundle)
    logger.info("worker %d serving %r", os.getpid(), rec)
    app = create_app(rec, cfg)
    freeze_loaded_objects()
    return app


def freeze_loaded_objects() -> int:
    """Move every object alive now (the loaded bundle: the graph store alone holds millions of Python objects) out
    of the garbage collector's reach (``gc.freeze``); returns how many were frozen.

    Without this, each full collection walks the whole loaded model while requests wait: pauses of hundreds of
    milliseconds at 100,000 items, which land in the p99. Requests' own garbage is still collected as usual. Call
    it once, after loading and warming up, in a process that serves until it exits.

    The objects are unfrozen when the process exits (``atexit``, so in every serving process: ``kgrec serve``,
    its ``--workers`` processes): frozen objects are never collected at interpreter shutdown, and nanobind
    extensions (triton, imported by torch) then print a "nanobind: leaked ... instances" report of ~35 lines
    after uvicorn's "Finished server process"."""
    import atexit
    import gc

    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # once per process, however often this is called
    atexit.register(gc.unfreeze)
    n = gc.get_freeze_count()
    logger.info("froze %d loaded objects out of the garbage collector", n)
    return n


def limit_threads(n: int) -> None:
    """At most ``n`` intra-op threads for torch and for numpy's BLAS (0 = leave the libraries' defaults).

    A service process answers one call at a time; on a small machine running several processes, extra threads per
    call only contend with the other processes (and with the clients)."""
    if n <= 0:
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)


def _warm(rec: Any, query_bf16: bool = False) -> None:
    """Build the lazy caches once (ranking context, explainer, encoders) so requests do not pay for them."""
    t0 = time.perf_counter()
    try:
        if rec.user_ids:
            user = rec.user_ids[0]
            recs = rec.recommend(user, 1, explain=rec.ranker is not None)
            if recs and rec.ranker is not None:
                rec.explain(user, recs[0].item_id)
        rec.search(text="warm up", k=1)
        rec.search_batch(["warm up", "warm up batch"], k=1, query_bf16=query_bf16)  # the batched products
        if len(rec.user_ids) > 1 and rec.ranker is not None:
            rec.recommend_batch(rec.user_ids[:2], 1)
    except KgrecError as exc:  # a bundle that cannot do everything still serves what it can
        logger.warning("warm-up incomplete: %s", exc)
    logger.info("service warmed up in %.1f s", time.perf_counter() - t0)
