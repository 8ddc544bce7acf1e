"""Cloud service: the HTTP routes of the FastAPI app, and nothing else.

The hospital uploads its public bundle and encrypted dataset, the cloud trains in a worker
process and hands back encrypted weights; encrypted query sets are scored the same way. What
the service does, and what it refuses, is `jobs.CloudService` (domain logic, in-process
testable); this module maps each route onto it, reads request bodies within their limits, and
turns every `CloudError` into its HTTP status in one exception handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi import Path as FastAPIPath
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from medblindtuner.protocol import (
    CHUNK_SHA_HEADER,
    CONTENT_SHA_HEADER,
    EPOCH_HEADER,
    MAX_FINALIZE_BATCH,
    MAX_REFRESH_WAIT_S,
    REFRESH_INDEX_HEADER,
    query_id_of,
)
from medblindtuner.service.consortia_http import consortium_router
from medblindtuner.service.consortia_http import large_body_route as consortium_body_route
from medblindtuner.service.errors import CloudError, TooLarge, printable
from medblindtuner.service.jobs import CloudService
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.uploads import chunk_digest
from medblindtuner.service.views import configure_logging

log = logging.getLogger("medblindtuner.service")
_OCTET_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}},
    }
}


MAX_EPOCH = 1 << 20
MAX_CHUNK_INDEX = 1 << 31
# Bodies other than manifests and chunks are small JSON (a decision): refused beyond this.
MAX_SMALL_BODY = 64 << 10
ChunkIndex = Annotated[int, FastAPIPath(ge=0, lt=MAX_CHUNK_INDEX)]
RefreshWait = Annotated[float, Query(ge=0, le=MAX_REFRESH_WAIT_S, allow_inf_nan=False,
                                     description="Seconds to wait for a request (long poll).")]
# How often a long poll looks for a new refresh request (one small database read).
REFRESH_LOOK_S = 0.02


def _large_body_route(path: str) -> bool:
    """Manifests, chunks and refresh answers carry their own, larger limits (read by
    `_read_body`)."""
    return (path.endswith(("/manifest", "/refresh")) or "/chunks/" in path
            or consortium_body_route(path))


class DecisionIn(BaseModel):
    """The hospital's early-stopping answer for the epoch it was shown."""

    # Strict: `true` is not an epoch, "1" is not a bool; unknown fields are refused.
    model_config = ConfigDict(populate_by_name=True, strict=True, extra="forbid")
    continue_training: bool = Field(alias="continue", description="Train another epoch?")
    best_epoch: int = Field(ge=1, le=MAX_EPOCH, description="Epoch whose weights are the "
                                                            "result so far.")
    epoch: int | None = Field(default=None, ge=1, le=MAX_EPOCH,
                              description="Epoch being answered (check).")


class FinalizeIn(BaseModel):
    """Files of one upload to finalize together (`service.finalize.finalize_many`)."""

    model_config = ConfigDict(extra="forbid")
    names: list[Annotated[str, Field(max_length=255)]] = Field(
        min_length=1, max_length=MAX_FINALIZE_BATCH)


class ErrorOut(BaseModel):
    """Every refusal: the status code says which kind, `detail` says what to do."""

    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the refusals a route can answer with."""
    text = {400: "Malformed input (checksum mismatch, bad artifact, secret key...)",
            401: "No bearer token", 403: "The token is not this job's",
            404: "No such job, query set, artifact kind or file",
            409: "Not in this state (uploads after start, decision not awaited...)",
            413: "Over a size limit (chunk, file, manifest, job, service disk bound)",
            422: "Well-formed but invalid (schema, ranges, nesting, integer length)",
            429: "Over a quota (request rate of the token, job creations, live jobs)"}
    text[507] = "The service's disk is full; nothing was recorded, retry later"
    return {code: {"model": ErrorOut, "description": text[code]} for code in codes}


JOB_ERRORS = _errors(400, 401, 403, 404, 409, 413, 422, 429, 507)


class JobCreated(BaseModel):
    job_id: str
    token: str = Field(description="Bearer token for this job; shown once, stored hashed.")
    chunk_bytes: int
    max_upload_bytes: int
    max_job_bytes: int


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """Stream the request body, refusing (413) as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{what} is {declared} bytes; the limit is {limit}")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise TooLarge(f"{what} exceeds the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)


def _service(request: Request) -> CloudService:
    return request.app.state.service


_bearer = HTTPBearer(auto_error=False)


def client_address(request: Request) -> str:
    """The caller's address (the proxy's `X-Forwarded-For` only where `serve
    --forwarded-allow-ips` trusts that proxy): the key of its quotas."""
    return request.client.host if request.client else "unknown"


def authorised(
    job_id: str,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """401 without a bearer token, 404 for unknown jobs, 403 for another job's token; each
    failure is charged to the caller's address (429 once it has failed too often)."""
    token = credentials.credentials if credentials is not None else None
    return _service(request).authorise(job_id, token, client_address(request))


def check_kind(kind: str) -> str:
    return CloudService.check_kind(kind)


JobId = Annotated[str, Depends(authorised)]
Kind = Annotated[str, Depends(check_kind)]


def query_of_job(job_id: JobId, query_id: str, request: Request) -> str:
    """The upload kind of an existing query set of this (authorised) job, else 404."""
    return _service(request).query_kind_of(job_id, query_id)


QueryKind = Annotated[str, Depends(query_of_job)]


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of schema errors as the one documented `detail` string."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return printable("invalid request: " + "; ".join(parts), 1000)


def _file(path_and_digest: tuple, headers: dict[str, str] | None = None) -> FileResponse:
    path, digest = path_and_digest
    return FileResponse(path, media_type="application/octet-stream",
                        headers={**(headers or {}), CONTENT_SHA_HEADER: digest})


def _lifespan(service: CloudService, config: ServiceConfig):  # noqa: ANN202 - a lifespan
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        log.info("service started (data dir %s, insecure test params %s)", config.data_dir,
                 "ALLOWED" if config.allow_insecure else "refused")
        try:
            yield
        finally:
            service.stop()
    return lifespan


def _install_refusals(app: FastAPI) -> None:
    """Body limits before reading, and every refusal as `{"detail": str}` with its status."""
    @app.middleware("http")
    async def bounded_small_bodies(request: Request, call_next):  # noqa: ANN001, ANN202
        """413 for an oversized body on a route that takes a small one, before it is read."""
        declared = request.headers.get("content-length", "")
        if (not _large_body_route(request.url.path) and declared.isdigit()
                and int(declared) > MAX_SMALL_BODY):
            return JSONResponse({"detail": f"request body is {declared} bytes; this route "
                                           f"takes at most {MAX_SMALL_BODY}"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(CloudError)
    async def refused(_request: Request, exc: CloudError) -> JSONResponse:
        """Every refusal of the domain: its status and `{"detail": message}`."""
        return JSONResponse({"detail": printable(exc.message)}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """Schema errors of FastAPI itself: 422 with one string, whatever the input held
        (lone surrogates, 9e999)."""
        return JSONResponse({"detail": validation_message(exc)}, status_code=422)


def _service_routes(app: FastAPI, service: CloudService, config: ServiceConfig) -> None:
    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, Any]:
        """On the event loop itself: answers while every worker thread is busy."""
        return {"ok": True, "insecure_test_params": config.allow_insecure}

    @app.post("/jobs", status_code=201, response_model=JobCreated, tags=["jobs"],
              responses=_errors(429, 507))
    def create_job(request: Request) -> JobCreated:
        """New job; the token is returned once (only its SHA-256 is stored)."""
        return JobCreated(**service.create_job(client_address(request)))


def _upload_routes(router: APIRouter, service: CloudService, config: ServiceConfig) -> None:
    @router.put("/jobs/{job_id}/artifacts/{kind}/manifest", tags=["uploads"],
                openapi_extra=_OCTET_BODY)
    async def put_manifest(job_id: JobId, kind: Kind, request: Request) -> dict[str, Any]:
        """Announce an artifact's files (their sizes and SHA-256); checked before any upload."""
        raw = await _read_body(request, config.limits.max_manifest_bytes, "manifest")
        return await run_in_threadpool(service.uploads.accept_manifest, job_id, kind, raw)

    @router.get("/jobs/{job_id}/artifacts/{kind}", tags=["uploads"])
    def get_artifact(job_id: JobId, kind: Kind) -> dict[str, Any]:
        """Which chunks the server holds: the client resumes from here."""
        return service.uploads.status(job_id, kind)

    @router.put("/jobs/{job_id}/artifacts/{kind}/files/{name}/chunks/{index}",
                tags=["uploads"], openapi_extra=_OCTET_BODY)
    async def put_chunk(
        job_id: JobId,
        kind: Kind,
        name: str,
        index: ChunkIndex,
        request: Request,
        chunk_sha256: Annotated[str | None, Header(alias=CHUNK_SHA_HEADER)] = None,
    ) -> dict[str, Any]:
        """One chunk (offset index * chunk_bytes) with its SHA-256 in the X-Chunk-SHA256 header."""
        return await accept_chunk_request(service, config, job_id, kind, name, index,
                                          request, chunk_sha256)

    @router.post("/jobs/{job_id}/artifacts/{kind}/files/{name}/finalize", tags=["uploads"])
    def finalize(job_id: JobId, kind: Kind, name: str) -> dict[str, Any]:
        """Whole-file SHA-256 check against the manifest, secret-key check, then store."""
        return service.uploads.finalize(job_id, kind, name)

    @router.post("/jobs/{job_id}/artifacts/{kind}/finalize", tags=["uploads"])
    def finalize_files(job_id: JobId, kind: Kind, body: FinalizeIn) -> dict[str, Any]:
        """Finalize several files at once (one validator child for their ciphertexts)."""
        return service.uploads.finalize_many(job_id, kind, body.names)


async def accept_chunk_request(service: CloudService, config: ServiceConfig, job_id: str,
                               kind: str, name: str, index: int, request: Request,
                               chunk_sha256: str | None) -> dict[str, Any]:
    """Shared by artifact and query uploads: header check, bounded read, store."""
    digest = chunk_digest(chunk_sha256)
    data = await _read_body(request, config.limits.chunk_bytes, "chunk")
    return await run_in_threadpool(service.uploads.accept_chunk, job_id, kind, name, index,
                                   data, digest)


def _training_routes(router: APIRouter, service: CloudService) -> None:
    @router.get("/jobs/{job_id}", tags=["jobs"])
    def job_status(job_id: JobId) -> dict[str, Any]:
        return service.status(job_id)

    @router.post("/jobs/{job_id}/start", tags=["training"])
    def start(job_id: JobId) -> dict[str, Any]:
        """Verify the bundle and dataset, then start training in a worker process."""
        return service.start_job(job_id)

    @router.get("/jobs/{job_id}/validation-loss", tags=["training"],
                response_class=FileResponse)
    def validation_loss(job_id: JobId) -> FileResponse:
        """The encrypted validation loss of the epoch awaiting the hospital's decision."""
        path, epoch, digest = service.validation_loss(job_id)
        return _file((path, digest), {EPOCH_HEADER: str(epoch)})

    @router.post("/jobs/{job_id}/decision", tags=["training"])
    def post_decision(job_id: JobId, decision: DecisionIn) -> dict[str, Any]:
        """{"continue": bool, "best_epoch": int[, "epoch": int]} for the awaited epoch."""
        return service.decide(job_id, decision.continue_training, decision.best_epoch,
                              decision.epoch)

    @router.get("/jobs/{job_id}/result", tags=["results"])
    def result(job_id: JobId) -> dict[str, Any]:
        """Manifest of the encrypted weights of the best epoch (files listed with SHA-256)."""
        return service.result_manifest(job_id)

    @router.get("/jobs/{job_id}/result/files/{name}", tags=["results"],
                response_class=FileResponse)
    def result_file(job_id: JobId, name: str) -> FileResponse:
        return _file(service.result_file(job_id, name))

    @router.post("/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel(job_id: JobId) -> dict[str, Any]:
        return service.cancel(job_id)

    @router.delete("/jobs/{job_id}", tags=["jobs"])
    def delete_job(job_id: JobId) -> dict[str, Any]:
        """Stop the worker and remove the job, its files and unreferenced blobs."""
        service.delete_job(job_id)
        return {"deleted": True, "job_id": job_id}


def _refresh_routes(router: APIRouter, service: CloudService) -> None:
    """Refresh mode "hospital": the relay's two routes (`service.refreshes`)."""
    waiting: set[str] = set()  # jobs with a long poll waiting (one each; on the event loop)

    @router.get("/jobs/{job_id}/refresh", tags=["training"], response_class=Response,
                responses={200: {"content": {"application/octet-stream": {}}},
                           204: {"description": "No refresh request awaits an answer"}})
    async def refresh_request(job_id: JobId, wait: RefreshWait = 0.0) -> Response:
        """Refresh mode "hospital": the request awaiting the hospital's answer
        (`X-Refresh-Index`, `X-Content-SHA256`). With `wait`, a long poll: it answers as soon
        as a request is published, or with 204 when the wait ends or the job stops training
        (awaits a decision, ended). One long poll per job waits at a time; another one of
        the same job answers at once, as with `wait=0`."""
        waits = wait > 0 and job_id not in waiting
        deadline = time.monotonic() + (wait if waits else 0.0)
        if waits:
            waiting.add(job_id)
        try:
            while True:
                pending, training = await run_in_threadpool(service.refresh_request, job_id)
                if pending is not None:
                    index, data, digest = pending
                    return Response(data, media_type="application/octet-stream", headers={
                        REFRESH_INDEX_HEADER: str(index), CONTENT_SHA_HEADER: digest})
                if not training or time.monotonic() >= deadline:
                    return Response(status_code=204)
                await asyncio.sleep(REFRESH_LOOK_S)
        finally:
            if waits:
                waiting.discard(job_id)

    @router.post("/jobs/{job_id}/refresh", tags=["training"], openapi_extra=_OCTET_BODY)
    async def post_refresh_answer(job_id: JobId, request: Request) -> dict[str, Any]:
        """The hospital's answer (`he.refresh.RefreshAnswer` bytes) to the pending request."""
        limit = await run_in_threadpool(service.refresh_answer_bound, job_id)
        data = await _read_body(request, limit, "refresh answer")
        return await run_in_threadpool(service.answer_refresh, job_id, data)


def _query_upload_routes(router: APIRouter, service: CloudService,
                         config: ServiceConfig) -> None:
    @router.post("/jobs/{job_id}/queries", status_code=201, tags=["inference"])
    def create_query(job_id: JobId) -> dict[str, Any]:
        """New encrypted query set for a finished job -> {query_id, state, ...}."""
        return service.create_query(job_id)

    @router.get("/jobs/{job_id}/queries", tags=["inference"])
    def list_queries(job_id: JobId) -> dict[str, Any]:
        return service.list_queries(job_id)

    @router.get("/jobs/{job_id}/queries/{query_id}", tags=["inference"])
    def query_status(job_id: JobId, kind: QueryKind) -> dict[str, Any]:
        """Scoring state plus the upload resume point (same fields as GET artifacts/{kind})."""
        return service.query_status(job_id, query_id_of(kind))

    @router.put("/jobs/{job_id}/queries/{query_id}/manifest", tags=["inference"],
                openapi_extra=_OCTET_BODY)
    async def put_query_manifest(job_id: JobId, kind: QueryKind,
                                 request: Request) -> dict[str, Any]:
        """The query set's manifest.json: format, params fingerprint, rows per ciphertext."""
        raw = await _read_body(request, config.limits.max_manifest_bytes, "manifest")
        return await run_in_threadpool(service.uploads.accept_manifest, job_id, kind, raw)

    @router.put("/jobs/{job_id}/queries/{query_id}/files/{name}/chunks/{index}",
                tags=["inference"], openapi_extra=_OCTET_BODY)
    async def put_query_chunk(
        job_id: JobId,
        kind: QueryKind,
        name: str,
        index: ChunkIndex,
        request: Request,
        chunk_sha256: Annotated[str | None, Header(alias=CHUNK_SHA_HEADER)] = None,
    ) -> dict[str, Any]:
        return await accept_chunk_request(service, config, job_id, kind, name, index,
                                          request, chunk_sha256)

    @router.post("/jobs/{job_id}/queries/{query_id}/files/{name}/finalize", tags=["inference"])
    def finalize_query_file(job_id: JobId, kind: QueryKind, name: str) -> dict[str, Any]:
        return service.uploads.finalize(job_id, kind, name)

    @router.post("/jobs/{job_id}/queries/{query_id}/finalize", tags=["inference"])
    def finalize_query_files(job_id: JobId, kind: QueryKind,
                             body: FinalizeIn) -> dict[str, Any]:
        return service.uploads.finalize_many(job_id, kind, body.names)


def _scoring_routes(router: APIRouter, service: CloudService) -> None:
    @router.post("/jobs/{job_id}/queries/{query_id}/score", tags=["inference"])
    def score(job_id: JobId, kind: QueryKind) -> dict[str, Any]:
        """Start scoring in a worker process (the web process never loads keys)."""
        return service.start_scoring(job_id, query_id_of(kind))

    @router.get("/jobs/{job_id}/queries/{query_id}/scores", tags=["inference"])
    def scores(job_id: JobId, kind: QueryKind) -> dict[str, Any]:
        """Manifest of the encrypted scores (files with SHA-256); 409 until scoring is done."""
        return service.scores_manifest(job_id, query_id_of(kind))

    @router.get("/jobs/{job_id}/queries/{query_id}/scores/files/{name}", tags=["inference"],
                response_class=FileResponse)
    def score_file(job_id: JobId, kind: QueryKind, name: str) -> FileResponse:
        return _file(service.score_file(job_id, query_id_of(kind), name))

    @router.delete("/jobs/{job_id}/queries/{query_id}", tags=["inference"])
    def delete_query(job_id: JobId, kind: QueryKind) -> dict[str, Any]:
        """Remove a query set, its ciphertexts and its scores."""
        service.delete_query(job_id, query_id_of(kind))
        return {"deleted": True, "query_id": query_id_of(kind)}


def create_app(config: ServiceConfig) -> FastAPI:
    """Build the FastAPI application for one data directory."""
    configure_logging(config)
    service = CloudService(config)
    app = FastAPI(
        title="MedBlindTuner cloud service",
        description="Trains a classifier head on CKKS-encrypted features. It never holds a "
                    "secret key; every job endpoint needs that job's bearer token.",
        version="1.0",
        lifespan=_lifespan(service, config),
    )
    app.state.service = service
    _install_refusals(app)
    _service_routes(app, service, config)
    # Every route below needs a job's token: they share one router and its error responses.
    router = APIRouter(responses=JOB_ERRORS)
    _training_routes(router, service)
    _refresh_routes(router, service)
    _upload_routes(router, service, config)
    _query_upload_routes(router, service, config)
    _scoring_routes(router, service)
    app.include_router(router)
    app.include_router(consortium_router(), responses=JOB_ERRORS)  # n hospitals' relay
    return app


def run_server(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Blocking: serve the app with uvicorn (one process; training happens in workers).

    Proxy headers (`X-Forwarded-For`) are trusted only from `config.forwarded_allow_ips`;
    by default from nobody, so a client cannot pick the address its quotas are charged to."""
    import uvicorn

    trusted = config.forwarded_allow_ips
    uvicorn.run(create_app(config), host=host, port=port, log_level="info",
                proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None)
