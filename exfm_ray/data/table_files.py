"""Reading one click-log file as an Arrow table: CSV/TSV/TXT or Parquet, optionally gzipped.
What the columns mean is the bring-your-own loader's business (byo.py); this only gets the cells."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from exfm_ray.errors import DataError

TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")


def read_table_file(path: Path) -> pa.Table:
    """Read a CSV/TSV/TXT or Parquet file (optionally .gz). Text cells stay strings; '' marks missing."""
    if not path.exists():
        raise DataError(f"no such file: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    kind = suffixes[-2] if gz and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if kind in PARQUET_SUFFIXES:
        source = io.BytesIO(gzip.decompress(path.read_bytes())) if gz else path
        try:
            return pq.read_table(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if kind in TEXT_SUFFIXES:
        sep = "\t" if kind == ".tsv" else _sniff_separator(path, gz)
        try:
            # Everything as text: the loader decides per role how to parse, and "NA" stays a value.
            frame = pd.read_csv(path, sep=sep, dtype=str, na_filter=False, compression="gzip" if gz else None)
        except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot parse as delimited text ({exc})") from None
        return pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    raise DataError(f"{path}: unsupported file type; use {TEXT_SUFFIXES + PARQUET_SUFFIXES}, optionally + .gz")


def _sniff_separator(path: Path, gz: bool) -> str:
    with gzip.open(path, "rt") if gz else path.open() as fh:
        header = fh.readline()
    return "\t" if "\t" in header and "," not in header else ","
