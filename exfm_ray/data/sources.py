"""Which stream to load: the synthetic generator, a shared real dataset, or a user's own file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.data.byo import load_byo
from exfm_ray.data.frappe import FOLDER as FRAPPE_FOLDER
from exfm_ray.data.frappe import frappe_stream
from exfm_ray.data.movielens import FOLDER as MOVIELENS_FOLDER
from exfm_ray.data.movielens import movielens_stream
from exfm_ray.data.rare import thin_positives
from exfm_ray.data.stream import Stream
from exfm_ray.data.synthetic import SyntheticConfig, synthetic_stream
from exfm_ray.errors import ConfigError

Dataset = Literal["synthetic", "movielens", "frappe", "byo"]


class SourceConfig(Config):
    dataset: Dataset = Field("synthetic", description="Which stream: synthetic, movielens, frappe or byo.")
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="Generator settings (dataset: synthetic)."
    )
    data_dir: Path | None = Field(
        None, description="Folder holding movielens_100k/ and frappe/ (dataset: movielens or frappe)."
    )
    data_path: Path | None = Field(None, description="The user's CSV/TSV/Parquet file (dataset: byo).")
    mapping_path: Path | None = Field(None, description="YAML mapping of the user's columns (dataset: byo).")
    num_windows: int = Field(10, ge=1, description="Equal-count windows for Frappe, which has no time.")
    num_tenants: int | None = Field(
        None, ge=1, description="MovieLens tenants (1..4, default 4: occupation groups, the rest in 'other')."
    )
    window_days: int = Field(7, ge=1, description="MovieLens window length in days (7: 31 weekly windows).")
    positive_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Rare-positive form: drop positives at random until about this share of rows is positive.",
    )
    thin_seed: int = Field(0, description="Seed of the positives dropped for positive_rate.")


def load_stream(cfg: SourceConfig) -> Stream:
    stream = _load(cfg)
    return stream if cfg.positive_rate is None else thin_positives(stream, cfg.positive_rate, cfg.thin_seed)


def _load(cfg: SourceConfig) -> Stream:
    if cfg.dataset == "synthetic":
        return synthetic_stream(cfg.synthetic)
    if cfg.dataset == "movielens":
        return movielens_stream(_dataset_dir(cfg, MOVIELENS_FOLDER), cfg.num_tenants, cfg.window_days)
    if cfg.dataset == "frappe":
        return frappe_stream(_dataset_dir(cfg, FRAPPE_FOLDER), cfg.num_windows)
    data_path = _existing(cfg.data_path, "data_path")
    mapping_path = _existing(cfg.mapping_path, "mapping_path")
    return load_byo(data_path, mapping_path)


def _dataset_dir(cfg: SourceConfig, folder: str) -> Path:
    if cfg.data_dir is None:
        raise ConfigError(f"field 'data_dir': dataset {cfg.dataset} needs data_dir, the folder holding {folder}/")
    path = Path(cfg.data_dir) / folder
    if not path.is_dir():
        raise ConfigError(f"field 'data_dir': {path} does not exist (dataset {cfg.dataset} reads {folder}/ there)")
    return path


def _existing(path: Path | None, field: str) -> Path:
    if path is None:
        raise ConfigError(f"field {field!r}: dataset byo needs {field}")
    if not Path(path).is_file():
        raise ConfigError(f"field {field!r}: no such file {path}")
    return Path(path)
