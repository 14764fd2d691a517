"""The HTTP API (FastAPI) in front of a predictor: the Ray Serve router or the in-process reference.

Both servers share this app, so the benchmark compares the same routes, validation and JSON.
Errors: unknown tenant -> 404; a body pydantic refuses, or rows that do not fit the tenant's
student -> 422 with `detail[].loc` naming the field and row (FastAPI's format for both).
"""

from __future__ import annotations

from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from exfm_ray.errors import TenantNotFound
from exfm_ray.serving.rows import RowError
from exfm_ray.serving.schema import (
    HEALTH_PATH,
    PREDICT_PATH,
    TENANTS_PATH,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    TenantsResponse,
)

_ERRORS = {
    404: {"description": "The tenant has no published checkpoint."},
    422: {"description": "The body, or a row for this tenant's student, is invalid; `detail[].loc` names it."},
}


class Predictor(Protocol):
    async def predict(self, tenant: str, request: PredictRequest) -> PredictResponse: ...

    async def tenants(self) -> TenantsResponse: ...

    def health(self) -> HealthResponse: ...


def build_api(predictor: Predictor, *, title: str = "exfm students") -> FastAPI:
    api = FastAPI(
        title=title,
        description="Per-tenant student ranking models distilled from the ExFM foundation model.",
        version="1",
    )

    @api.exception_handler(TenantNotFound)
    async def _not_found(_: Request, exc: TenantNotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @api.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the offending input, and a NaN there breaks the JSON reply.
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    @api.exception_handler(RowError)
    async def _bad_rows(_: Request, exc: RowError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": exc.detail()})

    @api.post(PREDICT_PATH, response_model=PredictResponse, responses=_ERRORS, summary="Score rows for a tenant")
    async def predict(tenant: str, request: PredictRequest) -> Response:
        answer = await predictor.predict(tenant, request)
        # A Response skips FastAPI's re-validation of the returned model: the hot path pays once.
        return Response(answer.model_dump_json(), media_type="application/json")

    @api.get(TENANTS_PATH, response_model=TenantsResponse, summary="Served tenants and their latest versions")
    async def tenants() -> TenantsResponse:
        return await predictor.tenants()

    @api.get(HEALTH_PATH, response_model=HealthResponse, summary="Liveness probe")
    async def health() -> HealthResponse:
        return predictor.health()

    return api
