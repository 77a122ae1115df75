"""The merchandiser console: ``GET /console`` (one page, no outside scripts) over ``/v1/console/*``
(the draft, previews side by side, publish, versions, rollback). Everything here needs the admin
token; a browser gives it as the password of HTTP basic authentication (docs/console.md)."""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import Body, Depends, FastAPI, HTTPException, Path
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from agent.cache import PageCache
from agent.errors import InputError, PageUnavailable
from agent.merchandising import (
    FILES,
    Console,
    NotPublishable,
    Version,
    in_folder,
    live_paths,
    live_version,
    problems_of,
    read_set,
    version_id,
)
from agent.schema import Homepage
from agent.service import composer_for
from retrieval.ids import ID_PATTERN

NEW_VISITOR = "new-visitor-0001"


class FileView(BaseModel):
    name: str
    draft: str
    live: str
    changed: bool


class ProblemView(BaseModel):
    file: str = Field(description="the file's name in the set ('' where the loader named none)")
    line: int | None
    message: str


class DraftView(BaseModel):
    files: list[FileView]
    draft_version: str
    live_version: str
    problems: list[ProblemView] = Field(description="why the draft would not load (empty: it can be published)")
    publishable: bool


class DraftFile(BaseModel):
    content: str = Field(max_length=200_000)


class PreviewRequest(BaseModel):
    users: list[Annotated[str, Field(pattern=ID_PATTERN, max_length=128)]] = Field(min_length=1, max_length=8)
    model: bool = Field(False, description="compose with the model (as shoppers get it), not only deterministically")


class PreviewPair(BaseModel):
    user_id: str
    draft: Homepage
    live: Homepage


class Preview(BaseModel):
    draft_version: str
    live_version: str
    pages: list[PreviewPair]


class EffectRequest(BaseModel):
    users: int = Field(300, ge=10, le=2000, description="shoppers with two or more baskets (seeded sample)")


class Effect(BaseModel):
    users: int
    draft_ndcg_10: float | None = Field(alias="draft_ndcg@10")
    live_ndcg_10: float | None = Field(alias="live_ndcg@10")
    draft_minus_live: list[float] = Field(description="mean, and the 95 % paired-bootstrap interval")
    seconds: float


class SampleUsers(BaseModel):
    heavy: str | None = Field(description="the shopper with the most events")
    known: list[str] = Field(description="a few shoppers across the activity range")
    new_visitor: str


class PublishRequest(BaseModel):
    author: str = Field(min_length=1, max_length=80)
    message: str = Field(min_length=1, max_length=500)


class RollbackRequest(BaseModel):
    author: str = Field(min_length=1, max_length=80)


class VersionView(Version):
    live: bool


def console_routes(app: FastAPI, service, writer, responses: dict) -> None:
    refused = {**responses, 409: {"description": "the draft does not load, or is live already"}}

    def console() -> Console:
        return Console(service.settings)

    def products() -> dict:
        return service.composer.retriever.products

    def draft_view(desk: Console) -> DraftView:
        draft = desk.draft()
        live = read_set(live_paths(service.settings))
        problems = [ProblemView(**vars(p)) for p in problems_of(desk.draft_dir, products())]
        return DraftView(
            files=[FileView(name=n, draft=draft[n], live=live[n], changed=draft[n] != live[n]) for n in FILES],
            draft_version=version_id(draft), live_version=version_id(live), problems=problems,
            publishable=not problems and draft != live)

    def draft_composer(desk: Console, backend):
        """The draft's composer, for this request only and with no cache: nothing of a draft reaches
        shoppers. 409 while the draft does not load."""
        desk.draft()  # made from what is live if nobody has edited yet
        if problems := problems_of(desk.draft_dir, products()):
            raise HTTPException(409, f"the draft does not load: {problems[0]}")
        live = service.composer
        return composer_for(in_folder(service.settings, desk.draft_dir), live.retriever, backend, cache=PageCache(0))

    @app.get("/console", response_class=HTMLResponse, include_in_schema=False, dependencies=[Depends(writer)])
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files("agent").joinpath("console.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP})

    @app.get("/v1/console/draft", response_model=DraftView, dependencies=[Depends(writer)], responses=responses,
             summary="The draft beside what is live, and why it would not load")
    def get_draft() -> DraftView:
        return draft_view(console())

    @app.put("/v1/console/draft/{name}", response_model=DraftView, dependencies=[Depends(writer)],
             responses={**responses, 404: {"description": "not a file of the set"}}, summary="Save a file of the draft")
    def put_draft(name: Annotated[str, Path(description=f"one of {', '.join(FILES)}")],
                  body: DraftFile) -> DraftView:
        desk = console()
        try:
            desk.save(name, body.content)
        except KeyError:
            raise HTTPException(404, f"{name!r} is not a file the console edits ({', '.join(FILES)})") from None
        return draft_view(desk)

    @app.delete("/v1/console/draft", response_model=DraftView, dependencies=[Depends(writer)], responses=responses,
                summary="Throw the draft away: it starts again from what is live")
    def discard_draft() -> DraftView:
        desk = console()
        desk.discard()
        return draft_view(desk)

    @app.get("/v1/console/users", response_model=SampleUsers, dependencies=[Depends(writer)], responses=responses,
             summary="Shoppers to preview: the heaviest, a few across the activity range, a new visitor")
    def sample_users() -> SampleUsers:
        users = service.composer.retriever.catalog.users()
        step = max(len(users) // 4, 1)
        return SampleUsers(heavy=users[0] if users else None, known=users[step::step][:3], new_visitor=NEW_VISITOR)

    @app.post("/v1/console/preview", response_model=Preview, dependencies=[Depends(writer)],
              responses={**refused, 503: {"description": "no valid page can be built with this catalogue"}},
              summary="The draft's pages and the live pages of the same shoppers, side by side")
    def preview(request: PreviewRequest) -> Preview:
        live = service.composer
        backend = live.backend if request.model else None
        draft, shown = draft_composer(console(), backend), live.using(backend=backend, cache=PageCache(0))
        pages = []
        try:
            for user in request.users:
                pages.append(PreviewPair(user_id=user, draft=draft.compose(user, use_llm=request.model),
                                         live=shown.compose(user, use_llm=request.model)))
        except InputError as exc:
            raise HTTPException(422, [{"loc": ["body", "users"], "msg": str(exc), "type": "value_error"}]) from None
        except PageUnavailable as exc:
            raise HTTPException(503, str(exc)) from None
        return Preview(draft_version=draft.deps.config_version, live_version=shown.deps.config_version, pages=pages)

    @app.post("/v1/console/effect", response_model=Effect, response_model_by_alias=True,
              dependencies=[Depends(writer)], responses=refused,
              summary="A quick offline effect: NDCG@10 of the draft's and the live pages, each shopper's last "
                      "basket held out (eval/replay.py)")
    def effect(request: EffectRequest) -> Effect:
        from eval.replay import replay_effect

        draft, live = draft_composer(console(), None), service.composer.using(backend=None, cache=PageCache(0))
        return Effect.model_validate(replay_effect(draft, live, request.users))

    @app.post("/v1/console/publish", response_model=VersionView, dependencies=[Depends(writer)], responses=refused,
              summary="The draft goes live at once, as a new version")
    def publish(request: PublishRequest) -> VersionView:
        desk = console()
        try:
            version = desk.publish(request.author, request.message, products(), service.reload)
        except NotPublishable as exc:
            raise HTTPException(409, str(exc)) from None
        return _view(version, live_version(service.settings))

    @app.get("/v1/console/versions", response_model=list[VersionView], dependencies=[Depends(writer)],
             responses=responses, summary="Every published version, newest first")
    def versions() -> list[VersionView]:
        live = live_version(service.settings)
        history = console().versions()
        current = max((v.number for v in history if v.id == live), default=None)
        return [_view(v, live if v.number == current else None) for v in reversed(history)]

    @app.post("/v1/console/versions/{number}/rollback", response_model=VersionView, dependencies=[Depends(writer)],
              responses={**refused, 404: {"description": "no such version"}},
              summary="An earlier version goes live again, as a new version")
    def rollback(number: Annotated[int, Path(ge=1)], request: Annotated[RollbackRequest, Body()]) -> VersionView:
        try:
            version = console().rollback(number, request.author, products(), service.reload)
        except KeyError:
            raise HTTPException(404, f"no version {number}") from None
        except NotPublishable as exc:
            raise HTTPException(409, str(exc)) from None
        return _view(version, live_version(service.settings))


def _view(version, live: str | None) -> VersionView:
    return VersionView(**version.model_dump(), live=version.id == live)


# the page runs its own inline script and styles only, and sends requests to this server only
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
