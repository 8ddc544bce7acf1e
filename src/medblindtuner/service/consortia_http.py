"""The consortium relay's HTTP routes (`service.consortia`), mounted by `app.py`.

    POST   /consortia                                  {"hospitals": n} -> id, n tokens (once)
    GET    /consortia/{id}                             the caller's index, rounds relayed,
                                                       the training job's state (`job`)
    DELETE /consortia/{id}                             (stops the training's worker first)
    POST   /consortia/{id}/start                       hospital 0: {"plan", "n_train",
                                                       "n_val"} -> the training, queued
    PUT    /consortia/{id}/rounds/{round}              a RoundMessage of the caller
    GET    /consortia/{id}/rounds/{round}?wait=S       who posted, who is missing (long poll)
    GET    /consortia/{id}/rounds/{round}/parties/{p}?wait=S    party p's message (-1: cloud)
    PUT    /consortia/{id}/sealed/{request}/to/{r}     the caller's envelope for hospital r
    GET    /consortia/{id}/sealed/{request}?wait=S     envelopes addressed to the caller
    GET    /consortia/{id}/sealed/{request}/from/{s}?wait=S     hospital s's envelope to it

Every route but creation needs one of the consortium's tokens (it decides the caller's
index); refusals are `CloudError`s, which the app turns into `{"detail": ...}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as FastAPIPath
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from medblindtuner.protocol import (
    CLOUD_PARTY,
    CONTENT_SHA_HEADER,
    MAX_CONSORTIUM_WAIT_S,
    ROUNDS_CHANNEL,
    SEALED_CHANNEL,
)
from medblindtuner.service.consortia import BROADCAST, ConsortiumRelay
from medblindtuner.service.consortium_jobs import ConsortiumJobs
from medblindtuner.service.errors import CloudError, NotFound, TooLarge

PREFIX = "/consortia"
LOOK_S = 0.05  # how often a long poll looks again (one small database read)
MAX_PARTY = 1 << 10
Wait = Annotated[float, Query(ge=0, le=MAX_CONSORTIUM_WAIT_S, allow_inf_nan=False,
                              description="Seconds to wait for what is missing (long poll).")]
Party = Annotated[int, FastAPIPath(ge=CLOUD_PARTY, lt=MAX_PARTY)]
_OCTET_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
_bearer = HTTPBearer(auto_error=False)


class ConsortiumIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    hospitals: int = Field(ge=2, le=1024, description="Hospitals in the consortium (n-of-n).")


class ConsortiumCreated(BaseModel):
    consortium_id: str
    n_hospitals: int
    tokens: list[str] = Field(description="tokens[i] is hospital i's bearer token; shown "
                                          "once, stored hashed.")
    max_message_bytes: int


class TrainingIn(BaseModel):
    """The coordinator's start: the agreed public plan and the union's counts."""

    model_config = ConfigDict(strict=True, extra="forbid")
    plan: dict[str, Any] = Field(description="The agreed TrainingPlan (its JSON).")
    n_train: int = Field(ge=1, le=1 << 31, description="The union's training rows.")
    n_val: int = Field(ge=1, le=1 << 31, description="The union's validation rows.")
    insecure_test_params: bool = Field(default=False, description="The insecure test ring "
                                       "(only where the service accepts it).")


def large_body_route(path: str) -> bool:
    """Messages carry their own limit (`max_consortium_message_bytes`)."""
    return path.startswith(f"{PREFIX}/") and ("/rounds/" in path or "/sealed/" in path)


def _relay(request: Request) -> ConsortiumRelay:
    return request.app.state.service.consortia


def _jobs(request: Request) -> ConsortiumJobs:
    service = request.app.state.service
    return ConsortiumJobs(service.config, service.store, service.consortia, service.supervisor)


def member(consortium_id: str, request: Request,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
           ) -> int:
    """The caller's hospital index (its token decides it): 401 / 403 / 404 / 429."""
    token = credentials.credentials if credentials is not None else None
    client = request.client.host if request.client else "unknown"
    return _relay(request).authorise(consortium_id, token, client)


Member = Annotated[int, Depends(member)]


async def _stage(request: Request, relay: ConsortiumRelay, consortium_id: str):  # noqa: ANN202
    """Stream the body into a staged file within the message limit: (path, SHA-256)."""
    limit = relay.limits.max_consortium_message_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the message is {declared} bytes; the limit is {limit}")
    path = relay.staging_file(consortium_id)
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "wb") as handle:
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise TooLarge(f"the message exceeds the limit of {limit} bytes")
                digest.update(part)
                handle.write(part)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest()


async def _poll(look: Callable[[], Any], done: Callable[[Any], bool], wait: float) -> Any:
    """`look()` until `done(result)` or `wait` seconds passed; the last result."""
    deadline = time.monotonic() + wait
    while True:
        result = await run_in_threadpool(look)
        if done(result) or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(LOOK_S)


async def _file_when_posted(look: Callable[[], Any], wait: float) -> FileResponse:
    """The message once posted (within `wait`), else the 404 that says who is missing."""
    def attempt() -> Any:
        try:
            return look()
        except NotFound as exc:
            return exc

    found = await _poll(attempt, lambda r: not isinstance(r, CloudError), wait)
    if isinstance(found, CloudError):
        raise found
    path, digest = found
    return FileResponse(path, media_type="application/octet-stream",
                        headers={CONTENT_SHA_HEADER: digest})


def consortium_router() -> APIRouter:
    """The routes above (errors as documented by `responses`)."""
    router = APIRouter(prefix=PREFIX, tags=["consortium"])
    _access_routes(router)
    _round_routes(router)
    _sealed_routes(router)
    return router


def _access_routes(router: APIRouter) -> None:
    @router.post("", status_code=201, response_model=ConsortiumCreated)
    def create_consortium(body: ConsortiumIn, request: Request) -> ConsortiumCreated:
        """A consortium of n hospitals; one token each, returned once (stored hashed)."""
        client = request.client.host if request.client else "unknown"
        return ConsortiumCreated(**_relay(request).create(body.hospitals, client))

    @router.get("/{consortium_id}")
    def consortium_status(consortium_id: str, index: Member, request: Request
                          ) -> dict[str, Any]:
        """The relay's state for the caller, and `job`: the training's (None: not started)."""
        return {**_relay(request).status(consortium_id, index),
                "job": _jobs(request).status(consortium_id)}

    @router.delete("/{consortium_id}")
    def delete_consortium(consortium_id: str, index: Member, request: Request
                          ) -> dict[str, Any]:
        _jobs(request).stop(consortium_id)
        _relay(request).delete(consortium_id)
        return {"deleted": True, "consortium_id": consortium_id, "by": index}

    @router.post("/{consortium_id}/start", status_code=202)
    def start_training(consortium_id: str, body: TrainingIn, index: Member, request: Request
                       ) -> dict[str, Any]:
        """Hospital 0 (the coordinator) starts the training once every hospital's rows are
        in; the service's worker runs the cloud's side. 403 / 409 / 400 / 422 otherwise."""
        job = _jobs(request).start(consortium_id, index, body.plan, body.n_train, body.n_val,
                                   body.insecure_test_params)
        return {"consortium_id": consortium_id, "job": job}


def _round_routes(router: APIRouter) -> None:
    @router.put("/{consortium_id}/rounds/{round_name}", openapi_extra=_OCTET_BODY)
    async def post_round(consortium_id: str, round_name: str, index: Member,
                         request: Request) -> dict[str, Any]:
        """The caller's `RoundMessage` of this round (its party must be the caller's index)."""
        relay = _relay(request)
        staged, digest = await _stage(request, relay, consortium_id)
        return await run_in_threadpool(relay.post, consortium_id, index, ROUNDS_CHANNEL,
                                       round_name, BROADCAST, staged, digest)

    @router.get("/{consortium_id}/rounds/{round_name}")
    async def round_listing(consortium_id: str, round_name: str, index: Member,
                            request: Request, wait: Wait = 0.0) -> dict[str, Any]:
        """Who posted this round; with `wait`, answers once every hospital has."""
        relay = _relay(request)
        return await _poll(lambda: relay.listing(consortium_id, index, ROUNDS_CHANNEL,
                                                 round_name), lambda r: r["complete"], wait)

    @router.get("/{consortium_id}/rounds/{round_name}/parties/{party}",
                response_class=FileResponse)
    async def round_message(consortium_id: str, round_name: str, party: Party,
                            index: Member, request: Request, wait: Wait = 0.0
                            ) -> FileResponse:
        """Party `party`'s message of this round (-1: the cloud's), `X-Content-SHA256`."""
        relay = _relay(request)
        return await _file_when_posted(lambda: relay.message(
            consortium_id, index, ROUNDS_CHANNEL, round_name, party), wait)


def _sealed_routes(router: APIRouter) -> None:
    @router.put("/{consortium_id}/sealed/{request_id}/to/{recipient}",
                openapi_extra=_OCTET_BODY)
    async def post_sealed(consortium_id: str, request_id: str, recipient: Party,
                          index: Member, request: Request) -> dict[str, Any]:
        """The caller's sealed envelope for hospital `recipient` (routing header checked)."""
        relay = _relay(request)
        staged, digest = await _stage(request, relay, consortium_id)
        return await run_in_threadpool(relay.post, consortium_id, index, SEALED_CHANNEL,
                                       request_id, recipient, staged, digest)

    @router.get("/{consortium_id}/sealed/{request_id}")
    async def sealed_listing(consortium_id: str, request_id: str, index: Member,
                             request: Request, wait: Wait = 0.0) -> dict[str, Any]:
        """Envelopes of this request addressed to the caller, and who has not sent one."""
        relay = _relay(request)
        return await _poll(lambda: relay.listing(consortium_id, index, SEALED_CHANNEL,
                                                 request_id), lambda r: r["complete"], wait)

    @router.get("/{consortium_id}/sealed/{request_id}/from/{sender}",
                response_class=FileResponse)
    async def sealed_message(consortium_id: str, request_id: str, sender: Party,
                             index: Member, request: Request, wait: Wait = 0.0
                             ) -> FileResponse:
        """Hospital `sender`'s envelope to the caller (no one else can fetch it)."""
        relay = _relay(request)
        return await _file_when_posted(lambda: relay.message(
            consortium_id, index, SEALED_CHANNEL, request_id, sender), wait)
