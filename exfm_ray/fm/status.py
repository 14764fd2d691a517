"""What the FM group reports about itself: a typed message, so its callers (the DAS, the whole-loop
supervisor, `exfm fm status`) read the version they get, not a dict they re-validate."""

from __future__ import annotations

from pydantic import BaseModel, Field

from exfm_ray.fm.registry import FMVersion


class GangStatus(BaseModel):
    gang: int = Field(description="Index of the gang (one replica of the sharded FM).")
    status: str = Field(description="starting, ready, rebuilding, failed or stopped.")
    version: str | None = Field(description="FM version its ranks hold.")
    ranks: int = Field(description="Rank actors of the gang.")
    in_flight: int = Field(description="Label calls running on it now.")
    rebuilds: int = Field(description="Times it was rebuilt after losing a rank.")
    error: str = Field(description="Last failure, empty if none.")
    plan: dict[str, str] = Field(description="Sharding type per table.")


class GroupStatus(BaseModel):
    name: str = Field(description="Name of the group's supervisor actor.")
    version: FMVersion | None = Field(description="FM version the group labels with; None before the first.")
    ready: bool = Field(description="Whether a gang can take calls.")
    gangs: list[GangStatus] = Field(description="One entry per gang.")
    num_shards: int = Field(description="Ranks per gang.")
    rows_labeled: int = Field(description="Rows labeled since the group started.")
    calls: int = Field(description="Label calls answered.")
    failed_calls: int = Field(description="Label calls that failed.")
    uptime_s: float = Field(description="Seconds since the group started.")

    @property
    def version_name(self) -> str | None:
        return self.version.version if self.version else None
