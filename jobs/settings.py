"""Deployment settings, read once from the environment here in jobs/ and passed down."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXFM_")

    data_dir: Path | None = Field(None, description="Folder with movielens_100k/ and frappe/ (EXFM_DATA_DIR).")
    ray_address: str | None = Field(None, description="Ray cluster address; unset = a local Ray (EXFM_RAY_ADDRESS).")
    storage: Path = Field(
        Path("runs/store"),
        description="Shared storage root: FM registry, augmented windows, tenants, published students "
        "(EXFM_STORAGE); serving reads <storage>/students.",
    )
    serve_fast_ingress: bool = Field(
        True,
        description="Start a local Ray with Serve's HAProxy ingress and throughput mode "
        "(EXFM_SERVE_FAST_INGRESS); see docs/benchmarks.md for what each setting buys.",
    )

    def resolved_data_dir(self) -> Path | None:
        """EXFM_DATA_DIR, else the team's ../shared/data beside the checkout, if present."""
        if self.data_dir is not None:
            return self.data_dir
        beside = REPO.parent / "shared" / "data"
        return beside if beside.is_dir() else None
