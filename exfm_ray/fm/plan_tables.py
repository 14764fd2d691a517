"""The tables `exfm plan` plans: the user's list (YAML/JSON) or a layout that reaches a parameter count."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from exfm_ray.configbase import Config, read_yaml
from exfm_ray.errors import ConfigError

if TYPE_CHECKING:
    from exfm_ray.fm.plan import PlanSpec

SMALL_TABLE_DECAY = 0.8  # each small table holds 0.8x the rows of the previous one
LARGE_TABLE_NAMES = ("user_id", "ad_id", "advertiser_id", "page_id")


class TableSpec(Config):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Table (and feature) name.")
    rows: int = Field(ge=1, description="Number of embedding rows (ids).")
    dim: int | None = Field(
        None, gt=0, multiple_of=4, description="Embedding dim (FBGEMM needs a multiple of 4); default embedding_dim."
    )


def load_tables(path: str | Path) -> list[dict[str, Any]]:
    """Read a table list from YAML or JSON: a list of {name, rows, dim?}, or a mapping with key `tables`."""
    data = read_yaml(path, expect=object)
    if isinstance(data, dict) and set(data) == {"tables"}:
        data = data["tables"]
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise ConfigError(f"{path}: expected a list of tables ({{name, rows, dim}}) or a mapping with key 'tables'")
    return data


def fm_table_layout(spec: PlanSpec, embedding_params: int) -> list[TableSpec]:
    """Tables that add up to about `embedding_params`: a few very large id tables + a tail of smaller ones.

    `num_large_tables` equal tables (user_id, ad_id, advertiser_id, page_id, id_5, ...) hold
    `large_share` of the parameters; the other tables (cat_01, ...) share the rest, each 0.8x the
    previous one, at least 1 row each.
    """
    dim = spec.embedding_dim
    total_rows = max(1, embedding_params // dim)
    num_small = spec.num_tables - spec.num_large_tables
    large_share = spec.large_share if num_small else 1.0
    large_rows = max(1, int(total_rows * large_share) // spec.num_large_tables)
    tables = [
        TableSpec(name=LARGE_TABLE_NAMES[i] if i < len(LARGE_TABLE_NAMES) else f"id_{i + 1}", rows=large_rows, dim=dim)
        for i in range(spec.num_large_tables)
    ]
    weights = [SMALL_TABLE_DECAY**i for i in range(num_small)]
    small_rows = total_rows - large_rows * spec.num_large_tables
    tables += [
        TableSpec(name=f"cat_{i + 1:02d}", rows=max(1, int(small_rows * w / sum(weights))), dim=dim)
        for i, w in enumerate(weights)
    ]
    return tables
