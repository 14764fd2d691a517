"""HTTP request and response bodies of the student service (they make the OpenAPI docs).

A row carries sparse ids per feature and dense values by name, as the tenant's StudentMeta names
them. Types are strict (an id is a JSON integer, a dense value a finite JSON number): a string or a
float where an id belongs is a 422, not a silent cast. Checks that need the tenant's model (which
features, id ranges, request size) are in `rows.py`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

# The routes, here beside the bodies: a client (the CLI's curl line, the benches) needs them without
# the server's imports (torch).
PREDICT_PATH = "/v1/tenants/{tenant}/predict"
TENANTS_PATH = "/v1/tenants"
HEALTH_PATH = "/v1/health"

FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PredictRow(ApiModel):
    sparse: dict[str, list[StrictInt]] = Field(
        description="Ids per sparse feature, e.g. {'user_id': [12], 'ad_id': [7]}; every feature of the tenant."
    )
    dense: dict[str, FiniteFloat] = Field(
        default_factory=dict, description="Dense values by name, e.g. {'bid': 0.4}; every dense input of the tenant."
    )


class PredictRequest(ApiModel):
    rows: list[PredictRow] = Field(min_length=1, description="Rows to score (at least one).")


class PredictResponse(ApiModel):
    tenant: str = Field(description="Tenant whose student answered.")
    version: str = Field(description="Checkpoint version of the student that answered.")
    probabilities: list[float] = Field(description="Predicted probability per row, in request order.")
    store_version: int | None = Field(
        None, description="LoopFM store version whose histories the student read (null: it reads none)."
    )


class TenantInfo(ApiModel):
    tenant: str = Field(description="Tenant id.")
    version: str = Field(description="Latest published checkpoint version.")
    published_at: float = Field(description="Unix time the version was published.")
    features: list[str] = Field(description="Sparse features a row must carry.")
    dense: list[str] = Field(description="Dense values a row must carry.")


class TenantsResponse(ApiModel):
    tenants: list[TenantInfo] = Field(description="Every tenant with a published checkpoint.")


class HealthResponse(ApiModel):
    status: str = Field(description="'ok' when the replica answers.")
    loaded: dict[str, str] = Field(description="Tenant -> version of the models this replica holds.")
