"""The HTTP service: pages, behaviour events, catalogue updates and merchandiser reloads.

    homepage serve --port 8080                       # one process, embedded stores
    uvicorn agent.api:app_from_settings --factory    # the same app under any ASGI server

Every page answer is a valid page: a cache hit, the model's page (through ``agent.worker``), or
the deterministic page, marked, when the queue is full or the budget is spent. Who may do what
(docs/api.md, "Security model"): the admin token (``Settings.api_token``) writes, reads and explains; the
read token (``Settings.read_token``) reads pages and metrics; with neither, only the probes answer.
Callers are checked, and bodies counted as they stream, before any route reads a body. The OpenAPI
schema is checked in as ``agent/openapi.json`` (``homepage serve --openapi`` writes it) and tested against the app.
"""

import base64
import contextlib
import logging
import secrets
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path as FilePath
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from agent.adapters import file_digest
from agent.composer import Composer
from agent.console_api import console_routes
from agent.errors import ConfigError, InputError, PageUnavailable
from agent.schema import ExplainedPage, Homepage
from agent.service import build_composer, composer_for
from agent.settings import Settings
from agent.worker import ModelWorker
from retrieval import CatalogueColumns, EventColumns
from retrieval.erasure import UnknownUser, erase_apart, registered_outputs, resolve_users
from retrieval.ids import ID_PATTERN
from retrieval.ingest import delete_products, repair_products, update_products
from retrieval.loading import parse_event, parse_product
from retrieval.privacy import redact
from retrieval.retriever import CHROMA_DIR
from retrieval.vectors import PRODUCTS, close_embedded

MAX_BATCH = 1000  # events or products in one request
CONSOLE_PAGE, CONSOLE_API, CONSOLE_HEADER = "/console", "/v1/console/", "x-homepage-console"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
log = logging.getLogger(__name__)
QUEUE_FULL = "the model's queue was full, or longer than the page's time budget"
_WAIT_GRACE_S = 0.02  # past the deadline, a caller stops waiting for the model and answers itself


# -- bodies and answers --------------------------------------------------------------------------
class Rejected(BaseModel):
    index: int = Field(description="position of the row in the request")
    reason: str


def _unicode_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON can carry a lone surrogate ("\\ud800"), which no store can hold nor any answer echo: such a
    body is refused whole (422) before anything is stored."""
    def walk(value: Any) -> None:
        if isinstance(value, str):
            value.encode()
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(key)
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    for i, row in enumerate(rows):
        try:
            walk(row)
        except UnicodeEncodeError:
            raise ValueError(f"row {i} holds text that is not valid Unicode (a lone surrogate)") from None
    return rows


class EventBatch(BaseModel):
    """Per-row results: every row is checked before any is stored; a row that fails is listed in
    ``rejected`` and stored nowhere, the others are stored. A body that is not valid is a 422."""

    model_config = ConfigDict(extra="forbid")
    events: list[dict[str, Any]] = Field(max_length=MAX_BATCH, description=(
        "rows with user_id, item_id, timestamp (unix seconds or ISO 8601, 1970 to a day from now) or seq_pos, "
        "event_type (default view, at most 32 characters)"))
    unicode_only = field_validator("events")(_unicode_rows)


class EventsResult(BaseModel):
    accepted: int = Field(description="new events stored (durable when this answer is sent)")
    duplicates: int = Field(description="events already stored (by user, item, time, position and type)")
    rejected: list[Rejected]


class ProductBatch(BaseModel):
    """Per-row results, as ``EventBatch``."""

    model_config = ConfigDict(extra="forbid")
    items: list[dict[str, Any]] = Field(max_length=MAX_BATCH, description=(
        "rows with item_id, title, category_path ('A > B'), brand, price_usd, description, stock"))
    unicode_only = field_validator("items")(_unicode_rows)


class ProductsResult(BaseModel):
    changed: int = Field(description="products new or changed (unchanged rows are left as they are)")
    rejected: list[Rejected]


class Removed(BaseModel):
    removed: str


class Erased(BaseModel):
    """The erasure receipt (also appended to the store's audit log); no personal data in it."""

    subjects: list[str] = Field(description="keyed hashes of the users erased")
    removed: dict[str, int] = Field(description="place -> records or lines removed")
    retrain: list[str] = Field(description="trained models that saw the user (left in place), with the command "
                               "that retrains them")
    scanned: list[str] = Field(description="folders whose every file was byte- and field-scanned afterwards")
    not_scanned: list[str] = Field(description="places the proof could not read (a vector-store server's files)")
    clean: bool = Field(description="proven: every place scanned, and no id, text or vector of the user found")
    found: list[str]


class ReloadResult(BaseModel):
    config_version: str = Field(description="the version of the whole set now serving (the console's version id)")
    templates: dict[str, str] = Field(description="template name -> content hash now serving")
    rules_hash: str
    skeleton_hash: str


class Problem(BaseModel):
    detail: str


class LeanItem(BaseModel):
    item_id: str
    title: str
    brand: str | None
    category: str
    price: float | None
    sponsored: bool = False


class LeanModule(BaseModel):
    type: str
    title: str
    items: list[LeanItem]


class LeanPage(BaseModel):
    """The page as a storefront renders it; ``?explain=true`` answers the full ``Homepage`` and the
    shopper's profile (``ExplainedPage``)."""

    user_id: str
    modules: list[LeanModule]
    config_version: str = Field(description="the merchandiser files' version it was composed with "
                                "(meta.config_version)")


# -- metrics -------------------------------------------------------------------------------------
class Metrics:
    def __init__(self, worker: ModelWorker):
        self.registry = CollectorRegistry()
        self.page_seconds = Histogram(
            "homepage_page_seconds", "page latency from arrival, by how the page was made", ["path"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 8), registry=self.registry)
        self.fallbacks = Counter("homepage_fallbacks_total", "deterministic pages served in place of the model's",
                                 ["reason"], registry=self.registry)
        self.tokens = Histogram("homepage_page_tokens", "tokens the model wrote per page",
                                buckets=(0, 25, 50, 75, 100, 150, 200, 300), registry=self.registry)
        self.events = Counter("homepage_events_total", "events received, by outcome", ["outcome"],
                              registry=self.registry)
        depth = Gauge("homepage_queue_depth", "page requests waiting for the model", registry=self.registry)
        depth.set_function(lambda: worker.depth)

    def page(self, page: Homepage, seconds: float) -> None:
        path = "cached" if page.meta.cached and page.meta.path != "fallback" else page.meta.path
        self.page_seconds.labels(path).observe(seconds)
        if page.meta.path == "fallback":
            reason = page.meta.fallback_reason or ""
            self.fallbacks.labels("queue_full" if reason == QUEUE_FULL else
                                  "budget" if "budget" in reason else "model").inc()
        if not page.meta.cached:
            self.tokens.observe(page.meta.tokens_generated)


# -- the service ---------------------------------------------------------------------------------
class Service:
    """What the app holds: settings, the serving composer (swapped whole by a reload), the model
    worker and the metrics."""

    def __init__(self, settings: Settings, composer: Composer | None = None):
        self.settings, self.composer = settings, composer
        self.worker = ModelWorker(lambda: self.composer, settings.serve_batch, settings.queue_max,
                                  settings.batch_wait_ms / 1000)
        self.metrics = Metrics(self.worker)
        self._reload_lock = threading.Lock()
        self._fallbacks = threading.Lock()
        self._catching_up = threading.Lock()
        self._seen: dict[str, int] = {}  # the store's announcement counts, as last acted on

    def start(self) -> None:
        if self.composer is None:  # merchandiser files are checked before the model loads
            self.composer = build_composer(self.settings)
        retriever = self.composer.retriever
        try:  # a catalogue write cut short (a crash between SQLite and the vector store) is finished
            repaired = repair_products(retriever.catalog, retriever.index)
            if any(repaired):
                log.warning("the vector store followed the catalogue again: %d embedded, %d deleted", *repaired)
        except Exception:  # the vector store is down: /readyz says so; the next start repairs
            log.exception("the products collection could not be checked against the catalogue")
        self._seen = self._epochs()  # what other workers did before this one started is in its state already
        self.worker.start()

    # Several workers (processes, on one host or on many) serve one store; a reload or an erasure
    # reaches the one that answered it. It counts itself in the store (``Catalog.announce``), and
    # every worker, on its next request (one indexed read), does what the others did.
    def _epochs(self) -> dict[str, int]:
        return self.composer.retriever.catalog.epochs()

    def _announce(self, what: str) -> None:
        with self._catching_up:
            before = self.composer.retriever.catalog.announce(what)
            if before != self._seen:  # what the others announced first is acted on, never swallowed
                self._act_on(before)
            self._seen = {**before, what: before.get(what, 0) + 1}

    def catch_up(self) -> None:
        """Reload or reopen the stores where another worker did since this one last looked."""
        try:
            counts = self._epochs()
        except Exception:  # the store is unreachable: serve from what this worker holds (pages fall back)
            log.warning("the store's announcements could not be read", exc_info=True)
            return
        if counts != self._seen:
            with self._catching_up:
                counts = self._epochs()
                if counts == self._seen:
                    return
                self._act_on(counts)
                self._seen = counts

    def _act_on(self, counts: dict[str, int]) -> None:
        """Do what other workers announced since this one last looked: reload the merchandiser
        files, observe their events, reopen the stores an erasure rewrote."""
        if counts.get("reload") != self._seen.get("reload"):
            with contextlib.suppress(ConfigError):  # the announcing worker reported it; keep serving
                self.reload(announce=False)
        if counts.get("events") != self._seen.get("events"):
            self.composer.retriever.follow()
        if counts.get("reopen") != self._seen.get("reopen"):
            with self._reload_lock:
                retriever = self.composer.retriever
                retriever.reopen(replace(self.settings.retrieval_config(), store_dir=retriever.catalog.path.parent))

    def page(self, user_id: str, arrived: float) -> Homepage:
        self.catch_up()
        composer = self.composer
        # an unset budget still may not hang a request (a model that never answers): the ceiling holds
        budget = self.settings.page_timeout_ms / 1000 if composer.budget_s is None else composer.budget_s
        deadline = arrived + budget
        if (page := composer.cached(user_id)) is not None:
            return page
        if composer.backend is None:
            return composer.compose(user_id)
        future = self.worker.submit(user_id, deadline)
        if future is None:
            return self._fallback(composer, user_id, QUEUE_FULL)
        try:
            return future.result(max(deadline - time.monotonic(), 0) + _WAIT_GRACE_S)
        except FutureTimeout:
            future.cancel()  # still queued: the worker skips it
            return self._fallback(composer, user_id, "the page's time budget ran out waiting for the model")

    def _fallback(self, composer: Composer, user_id: str, reason: str) -> Homepage:
        # One at a time: under overload, request threads composing fallbacks would otherwise take
        # the CPU (and the interpreter lock) from the model, which then finishes no page at all.
        with self._fallbacks:
            return composer.fallback(user_id, reason)

    def reload(self, announce: bool = True) -> ReloadResult:
        """Templates, rules and skeleton loaded and checked as one set, then swapped in at once;
        a set that fails leaves the serving one untouched (``ConfigError`` names file and line)."""
        with self._reload_lock:
            old = self.composer
            new = composer_for(self.settings, old.retriever, old.backend, cache=old.cache,
                               budget_s=old.budget_s, llm_retry=old.deps.llm_retry, handle_prior=old.deps.handle_prior)
            self.composer = new
        if announce:
            self._announce("reload")
        return ReloadResult(config_version=new.deps.config_version,
                            templates={n: p.version for n, p in new.prompts.items()},
                            rules_hash=file_digest(self.settings.rules_file),
                            skeleton_hash=file_digest(self.settings.skeleton_file))

    def forget(self, user_id: str) -> Erased:
        """Erase a user everywhere (``retrieval.erasure``). Where anything was removed, the retriever
        opens the rewritten stores again and rebuilds its in-memory histories and counts; cached pages
        are stale (the erasure bumps the catalogue version). A page in flight meanwhile falls back, valid."""
        with self._reload_lock:
            retriever = self.composer.retriever
            store = retriever.catalog.path.parent
            config = replace(self.settings.retrieval_config(), store_dir=store)
            try:
                # a 404 before the stores are let go
                resolve_users(config, [user_id])
            except UnknownUser as exc:
                raise HTTPException(404, str(exc)) from None
            if not config.chroma_host:  # the erasing process owns the embedded store while it runs
                close_embedded(store / CHROMA_DIR)
            try:
                receipt = erase_apart(config, [user_id], registered_outputs(FilePath(self.settings.store_dir)),
                                      user_fields=[self.settings.event_columns.user_id])
            finally:
                retriever.reopen(config)
        if any(receipt.removed.values()):
            self._announce("reopen")
        return Erased(subjects=receipt.subjects, removed={k: v for k, v in receipt.removed.items() if v},
                      retrain=receipt.retrain, scanned=receipt.scanned, not_scanned=receipt.not_scanned,
                      clean=receipt.clean, found=[f"{f.what}: {f.path}" for f in receipt.found])

    def problems(self) -> list[str]:
        """Why the service cannot serve pages now (empty: ready)."""
        found = []
        if not self.worker.alive:
            found.append("the model worker is not running")
        retriever = self.composer.retriever
        try:
            retriever.refresh()
            if not retriever.products:
                found.append("the catalogue is empty")
        except Exception:  # the cause goes to the log, not to whoever probes /readyz
            log.exception("readiness: the catalogue store is unreadable")
            found.append("the catalogue store is unreadable")
        try:
            retriever.index.count(PRODUCTS)
        except Exception:
            log.exception("readiness: the vector store is unreachable")
            found.append("the vector store is unreachable")
        return found


# -- who may do what (docs/api.md, "Security model") ------------------------------------------------------
_RANK = {"reader": 1, "admin": 2}


def role_of(settings: Settings, authorization: str | None) -> str | None:
    """"admin" (the api_token), "reader" (the read_token, or anyone where open_reads is set), or None.
    The token comes as a bearer token, or as the password of basic authentication (a browser's console)."""
    given = _token(authorization)

    def matches(token: SecretStr | None) -> bool:
        return bool(token and given) and secrets.compare_digest(given, token.get_secret_value().encode())

    if matches(settings.api_token):
        return "admin"
    if matches(settings.read_token) or settings.open_reads:
        return "reader"
    return None


def _token(authorization: str | None) -> bytes:
    scheme, _, credential = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        return credential.strip().encode()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(credential.strip(), validate=True).partition(b":")[2]
        except ValueError:
            return b""
    return b""


def permits(role: str | None, needed: str | None) -> bool:
    return needed is None or (role is not None and _RANK[role] >= _RANK[needed])


def needed_role(method: str, path: str) -> str | None:
    """The probes and the API's description are open; the console is the admin's; other reads need a
    reader; anything else the admin."""
    if path in OPEN_PATHS:
        return None
    if path == CONSOLE_PAGE or path.startswith(CONSOLE_API):
        return "admin"
    return "reader" if method in ("GET", "HEAD") else "admin"


def _unauthorised(role: str, path: str = "") -> HTTPException:
    token = "api_token" if role == "admin" else "read_token or api_token"
    # the console's page asks a browser for the token (as the password: any user name)
    challenge = 'Basic realm="homepage console"' if path == CONSOLE_PAGE else "Bearer"
    return HTTPException(401, f"this needs the bearer token from the {token} setting",
                         headers={"WWW-Authenticate": challenge})


def _forged(method: str, headers: dict[str, str]) -> bool:
    """A write on a browser's remembered basic credentials that the console's own script did not
    send (another site's form): refused. The script's header cannot be sent cross-site without a
    preflight this server never grants."""
    scheme = headers.get("authorization", "").partition(" ")[0].lower()
    return scheme == "basic" and method not in ("GET", "HEAD") and headers.get(CONSOLE_HEADER) != "1"


class Gate:
    """ASGI middleware: the caller is checked before the route reads a byte of the body, and the body
    is counted as it streams (a chunked body has no Content-Length to check up front)."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        needed = needed_role(scope["method"], scope["path"])
        if not permits(role_of(self.settings, headers.get("authorization")), needed):
            exc = _unauthorised(needed, scope["path"])
            return await JSONResponse({"detail": exc.detail}, 401, exc.headers)(scope, receive, send)
        if _forged(scope["method"], headers):
            detail = f"a write with basic credentials needs the {CONSOLE_HEADER} header (the console sends it)"
            return await JSONResponse({"detail": detail}, 403)(scope, receive, send)
        limit = self.settings.max_body_bytes
        too_large = f"the body is over {limit} bytes"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await JSONResponse({"detail": too_large}, 413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # the route reading the body answers 413 (FastAPI passes HTTPException on)
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, counted, send)


# answers the routes document (OpenAPI), shared by them
REFUSED = {401: {"model": Problem, "description": "no or a wrong bearer token"},
           413: {"model": Problem, "description": "the body is too large"}}
UNREAD = {401: {"model": Problem, "description": "no read or admin token"}}
USER_PATH = Path(pattern=ID_PATTERN, description="the user's id (unknown: a new visitor)")
UNUSABLE = {422: {"description": "a malformed user id"}, 503: {"model": Problem}}


def create_app(settings: Settings | None = None, composer: Composer | None = None) -> FastAPI:
    """The app over ``composer`` (default: the one ``settings`` describe, built when the app starts,
    so that making the app, e.g. for its OpenAPI schema, needs no store or model)."""
    settings = settings or Settings.load()
    service = Service(settings, composer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.api_token is None:
            log.warning("no api_token is set: every write (events, catalogue, reload, forget) is refused")
        if settings.read_token is None and not settings.open_reads:
            log.warning("neither read_token nor open_reads is set: only the admin token reads pages")
        service.start()
        yield
        service.worker.stop()

    app = FastAPI(title="Homepage composer", version="1", lifespan=lifespan, description=(
        "Personalised e-commerce homepages: every page answered is valid under the merchandisers' rules."))
    app.state.service = service
    bearer = HTTPBearer(auto_error=False, description="Settings.api_token (admin) or Settings.read_token")

    def need(role: str):
        def check(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
            role_given = role_of(settings, request.headers.get("authorization"))
            if not permits(role_given, role):
                raise _unauthorised(role)
            return role_given
        return check

    writer, reader = need("admin"), need("reader")
    app.add_middleware(Gate, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the input is not echoed: it may be personal, or not even encodable (a lone surrogate)
        errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    _page_routes(app, service, reader)
    _write_routes(app, service, writer)
    _probe_routes(app, service, reader)
    console_routes(app, service, writer, REFUSED)
    return app


def _page_routes(app: FastAPI, service: Service, reader) -> None:
    @app.get("/v1/users/{user_id}/homepage", response_model=ExplainedPage | LeanPage,
             responses={**UNUSABLE, **UNREAD, 403: {"model": Problem, "description": "explain needs the admin token"}},
             summary="The user's homepage")
    def homepage(user_id: Annotated[str, USER_PATH], role: Annotated[str, Depends(reader)],
                 explain: Annotated[bool, Query(description="add meta, each item's reason and the shopper's "
                                                "profile (admin token)")] = False):
        if explain and role != "admin":
            raise HTTPException(403, "explain=true needs the admin token (api_token)")
        arrived = time.monotonic()
        try:
            page = service.page(user_id, arrived)
        except InputError as exc:
            raise HTTPException(422, [{"loc": ["path", "user_id"], "msg": str(exc), "type": "value_error"}]) from None
        except PageUnavailable as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)
        service.metrics.page(page, time.monotonic() - arrived)
        # the id as given, never the stored one: an e-mail's keyed pseudonym is not told to anyone
        page = page.model_copy(update={"user_id": user_id})
        if not explain:
            return LeanPage.model_validate({**page.model_dump(), "config_version": page.meta.config_version})
        profile = service.composer.profile(user_id).record() | {"user_id": user_id}
        return ExplainedPage.model_validate({**page.model_dump(), "profile": profile})


def _write_routes(app: FastAPI, service: Service, writer) -> None:
    @app.post("/v1/events", response_model=EventsResult, dependencies=[Depends(writer)], responses=REFUSED,
              summary="Record behaviour events; each user's next page reflects them")
    def events(batch: EventBatch) -> EventsResult:
        columns, composer = EventColumns(), service.composer
        known = composer.retriever.products
        good, rejected = [], []
        for i, row in enumerate(batch.events):
            try:
                event = parse_event(row, columns, composer.retriever.privacy)
                if event.item_id not in known:
                    raise ValueError(f"unknown item_id {event.item_id!r}")
            except ValueError as exc:
                rejected.append(Rejected(index=i, reason=redact(str(exc))))
            else:
                good.append(event)
        added = composer.record_events(good) if good else []
        accepted = sum(added)
        if accepted:  # every other worker observes them too (Service.catch_up)
            service._announce("events")
        for outcome, n in (("accepted", accepted), ("duplicate", len(added) - accepted), ("rejected", len(rejected))):
            service.metrics.events.labels(outcome).inc(n)
        return EventsResult(accepted=accepted, duplicates=len(added) - accepted, rejected=rejected)

    @app.put("/v1/catalogue/items", response_model=ProductsResult, dependencies=[Depends(writer)], responses=REFUSED,
             summary="Add or update products (a stock of 0 takes one off pages)")
    def put_items(batch: ProductBatch) -> ProductsResult:
        columns, retriever = CatalogueColumns(), service.composer.retriever
        good, rejected = [], []
        for i, row in enumerate(batch.items):
            try:
                good.append(parse_product(row, columns))
            except ValueError as exc:
                rejected.append(Rejected(index=i, reason=redact(str(exc))))
        changed = update_products(retriever.catalog, retriever.index, good) if good else 0
        return ProductsResult(changed=changed, rejected=rejected)

    @app.delete("/v1/catalogue/items/{item_id}", response_model=Removed, dependencies=[Depends(writer)],
                responses={**REFUSED, 404: {"model": Problem}}, summary="Take a product off the catalogue")
    def delete_item(item_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> Removed:
        retriever = service.composer.retriever
        if not delete_products(retriever.catalog, retriever.index, [item_id]):
            raise HTTPException(404, f"no product {item_id!r} in the catalogue")
        return Removed(removed=item_id)

    @app.delete("/v1/users/{user_id}", response_model=Erased, dependencies=[Depends(writer)],
                responses={**REFUSED, 404: {"model": Problem, "description": "no such user: nothing was erased"}},
                summary="Erase the user everywhere and prove it by a byte scan (right to be forgotten)")
    def forget(user_id: Annotated[str, USER_PATH]) -> Erased:
        return service.forget(user_id)

    @app.post("/v1/admin/reload", response_model=ReloadResult, dependencies=[Depends(writer)],
              responses={**REFUSED, 422: {"model": Problem}},
              summary="Load templates, rules and skeleton again, as one set")
    def reload() -> ReloadResult:
        try:
            return service.reload()
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None


def _probe_routes(app: FastAPI, service: Service, reader) -> None:
    # The probes run on the event loop (and readyz's store reads on threads of their own), not on the
    # worker threads that page requests wait in: they answer while every one of those is taken.
    probes = anyio.CapacityLimiter(2)

    @app.get("/healthz", summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": Problem}}, summary="Model loaded and stores reachable")
    async def readyz():
        if problems := await anyio.to_thread.run_sync(service.problems, limiter=probes):
            return JSONResponse({"detail": "; ".join(problems)}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics", dependencies=[Depends(reader)],
             responses=UNREAD)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(service.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")


def app_from_settings() -> FastAPI:
    """For ASGI servers (``--factory``): the app as ``Settings`` (env, ``homepage.toml``) describe."""
    return create_app()
