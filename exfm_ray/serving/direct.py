"""The reference path: the same HTTP API answered in one process, without Ray.

No multiplexing bound, no batching, no reload: each request runs its own forward pass on the
tenant's latest student, loaded once. It is the benchmark's baseline (served by plain uvicorn)
and what the Serve router's answers are compared with.
"""

from __future__ import annotations

import torch
from fastapi import FastAPI

from exfm_ray.serving.api import build_api
from exfm_ray.serving.config import ServeConfig
from exfm_ray.serving.histories import NewestStore
from exfm_ray.serving.rows import encode_rows
from exfm_ray.serving.schema import HealthResponse, PredictRequest, PredictResponse, TenantsResponse
from exfm_ray.serving.tenants import TenantModel, list_tenants, load_tenant
from exfm_ray.students.store import StudentStore


class DirectPredictor:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.store = StudentStore(config.store_root)
        self.histories = NewestStore(config.store_root)
        self.models: dict[str, TenantModel] = {}
        torch.set_num_threads(config.torch_threads)

    async def predict(self, tenant: str, request: PredictRequest) -> PredictResponse:
        model = self.models.get(tenant)
        if model is None:
            model = self.models[tenant] = load_tenant(self.store, tenant, self.histories)
        encoded = encode_rows(request.rows, model.spec, self.config.max_rows_per_request)
        probabilities = model.predict([encoded])
        return PredictResponse(
            tenant=tenant, version=model.version, probabilities=probabilities, store_version=model.store_version
        )

    async def tenants(self) -> TenantsResponse:
        return list_tenants(self.store)

    def health(self) -> HealthResponse:
        return HealthResponse(status="ok", loaded={t: m.version for t, m in self.models.items()})


def build_direct_api(config: ServeConfig) -> FastAPI:
    """The baseline server's app: `uvicorn.run(build_direct_api(config), ...)`."""
    return build_api(DirectPredictor(config), title="exfm students (in-process reference)")
