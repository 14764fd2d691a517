"""Shared by the data-source tests: a stream's rows in one table, and a column's value counts."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def all_rows(stream) -> pa.Table:
    return pa.concat_tables(stream.windows)


def value_counts(column) -> dict:
    return {v["values"]: v["counts"] for v in pc.value_counts(column).to_pylist()}
